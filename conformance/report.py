"""The three reports of a conformance run: JUnit XML, a JSON results file, a Markdown certificate.

All three are written from the same list of :class:`~conformance.results.CaseResult` and the same
environment record, into one folder (``nox -s certify`` uses ``reports/<backend>/``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import conformance
from conformance import arch
from conformance.backends.base import Backend, NotSupported
from conformance.results import (
    LEVELS,
    CaseResult,
    Expectations,
    RunSummary,
    Verdict,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKS = {
    Verdict.PASS: "pass",
    Verdict.FAIL: "FAIL",
    Verdict.ERROR: "ERROR",
    Verdict.WAIVED: "waived",
    Verdict.NOT_SUPPORTED: "n/s",
}


def environment(backend: Backend, device: str) -> dict[str, Any]:
    """Who ran what where: suite version and commit, backend and engine version, torch, CUDA,
    GPU name and architecture (``none`` on a CPU run)."""
    try:
        engine = backend.engine_version()
    except NotSupported as missing:
        engine = f"not available ({missing})"
    gpu = {"name": "none", "arch": "none"}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        gpu = {"name": torch.cuda.get_device_name(index), "arch": f"sm{major}{minor}"}
    return {
        "suite_version": conformance.__version__,
        "suite_commit": _git_commit(),
        "backend": backend.name,
        "backend_version": engine,
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _git_commit() -> str:
    """HEAD of the suite's checkout, ``+dirty`` with local changes; ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_all(
    directory: Path,
    results: Sequence[CaseResult],
    expectations: Expectations,
    *,
    backend: Backend,
    device: str,
    duration_s: float,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    env = environment(backend, device)
    summary = summarize(results, expectations)
    ordered = sorted(results, key=lambda r: (r.case, LEVELS.index(r.level), r.id))
    (directory / "junit.xml").write_text(junit_xml(ordered, env, duration_s), encoding="utf-8")
    (directory / "results.json").write_text(
        json.dumps(results_json(ordered, env, summary, expectations, duration_s), indent=2),
        encoding="utf-8",
    )
    (directory / "certificate.md").write_text(
        certificate(ordered, env, summary, expectations, duration_s), encoding="utf-8"
    )


def results_json(
    results: Sequence[CaseResult],
    env: dict[str, Any],
    summary: RunSummary,
    expectations: Expectations,
    duration_s: float,
) -> dict[str, Any]:
    return {
        "environment": env,
        "duration_s": round(duration_s, 2),
        "conformant": summary.conformant,
        "counts": summary.counts,
        "stale_waivers": [vars(w) for w in summary.stale_waivers],
        "unmatched_must_pass": list(summary.unmatched_must_pass),
        "unexpected_passes": [r.id for r in results if arch.is_unexpected_pass(r.verdict, r.message)],
        "must_pass": list(expectations.must_pass),
        "cases": [result.to_dict() for result in results],
    }


def junit_xml(results: Sequence[CaseResult], env: dict[str, Any], duration_s: float) -> str:
    """One ``testsuite`` per backend, one ``testcase`` per case and level (classname = level)."""
    counts = {v: sum(r.verdict is v for r in results) for v in Verdict}
    suite = ET.Element(
        "testsuite",
        name=f"ctref-conformance.{env['backend']}",
        tests=str(len(results)),
        failures=str(counts[Verdict.FAIL]),
        errors=str(counts[Verdict.ERROR]),
        skipped=str(counts[Verdict.NOT_SUPPORTED] + counts[Verdict.WAIVED]),
        time=f"{duration_s:.3f}",
        timestamp=env["date"],
    )
    properties = ET.SubElement(suite, "properties")
    for key, value in _flat(env).items():
        ET.SubElement(properties, "property", name=key, value=str(value))
    for result in results:
        testcase = ET.SubElement(
            suite, "testcase", classname=result.level, name=result.case, time=f"{result.duration_s:.3f}"
        )
        props = ET.SubElement(testcase, "properties")
        ET.SubElement(props, "property", name="verdict", value=result.verdict.value)
        for key, value in _flat({"measured": result.measured, "bound": result.bound}).items():
            ET.SubElement(props, "property", name=key, value=str(value))
        if result.verdict is Verdict.FAIL:
            ET.SubElement(testcase, "failure", message=_first_line(result.message)).text = result.message
        elif result.verdict is Verdict.ERROR:
            ET.SubElement(testcase, "error", message=_first_line(result.message)).text = result.message
        elif result.verdict in (Verdict.NOT_SUPPORTED, Verdict.WAIVED):
            ET.SubElement(testcase, "skipped", message=f"{result.verdict.value}: {result.message}")
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def support_matrix(results: Sequence[CaseResult]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[Verdict, int]]]:
    """Verdict counts per (format, level): rows are formats, columns levels with results."""
    cells: dict[tuple[str, str], dict[Verdict, int]] = {}
    for result in results:
        for fmt in result.formats or ("?",):
            cell = cells.setdefault((fmt, result.level), {})
            cell[result.verdict] = cell.get(result.verdict, 0) + 1
    formats = sorted({fmt for fmt, _ in cells})
    levels = [level for level in LEVELS if any(level == lv for _, lv in cells)]
    return formats, levels, cells


def _cell(counts: dict[Verdict, int] | None) -> str:
    if not counts:
        return "–"
    order = (Verdict.FAIL, Verdict.ERROR, Verdict.WAIVED, Verdict.PASS, Verdict.NOT_SUPPORTED)
    return " ".join(f"{counts[v]} {MARKS[v]}" for v in order if counts.get(v))


def certificate(
    results: Sequence[CaseResult],
    env: dict[str, Any],
    summary: RunSummary,
    expectations: Expectations,
    duration_s: float,
) -> str:
    verdict = "CONFORMANT" if summary.conformant else "NOT CONFORMANT"
    lines = [
        f"# ctref conformance certificate: `{env['backend']}`",
        "",
        (
            f"**{verdict}**: every case must end pass, not-supported or waived, every must-pass "
            "case must pass, and no waiver may be stale."
        ),
        "",
        "| | |",
        "|---|---|",
        f"| backend | `{env['backend']}` {env['backend_version']} |",
        f"| suite | ctref conformance {env['suite_version']}, commit `{env['suite_commit']}` |",
        f"| torch / CUDA | {env['torch']} / {env['cuda']} |",
        f"| device / GPU | {env['device']} / {env['gpu']['name']} ({env['gpu']['arch']}) |",
        f"| Python / platform | {env['python']} / {env['platform']} |",
        f"| date / duration | {env['date']} / {duration_s:.1f} s |",
        f"| verdicts | {', '.join(f'{n} {v}' for v, n in summary.counts.items())} |",
        "",
        "## Support matrix (format × level)",
        "",
        (
            "Each cell counts the cases of that format by verdict "
            "(`n/s` = not supported: the engine refused, with a reason)."
        ),
        "",
    ]
    formats, levels, cells = support_matrix(results)
    lines.append("| format | " + " | ".join(levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for fmt in formats:
        lines.append(f"| `{fmt}` | " + " | ".join(_cell(cells.get((fmt, lv))) for lv in levels) + " |")
    failing = [r for r in results if r.verdict in (Verdict.FAIL, Verdict.ERROR)]
    if failing:
        lines += ["", "## Failures and errors", ""]
        for result in failing:
            message = result.message.replace("\n", "\n  ")
            lines.append(f"- `{result.id}` **{result.verdict.value}**: {message}")
    waived = [r for r in results if r.verdict is Verdict.WAIVED]
    if waived:
        lines += ["", "## Waived", ""]
        lines += [f"- `{r.id}`: {_first_line(r.message)}" for r in waived]
    unsupported = [r for r in results if r.verdict is Verdict.NOT_SUPPORTED]
    if unsupported:
        lines += ["", "## Not supported", ""]
        lines += [f"- `{r.id}`: {_first_line(r.message)}" for r in unsupported]
    unexpected = [r for r in results if arch.is_unexpected_pass(r.verdict, r.message)]
    if unexpected:
        lines += ["", "## Unexpected passes (`conformance/arch_support.toml` says this GPU lacks the kernel: fix the table)", ""]
        lines += [f"- `{r.id}`: {_first_line(r.message)}" for r in unexpected]
    if summary.stale_waivers:
        lines += ["", "## Stale waivers (match no case: remove them)", ""]
        lines += [f"- `{w.pattern}`: {w.reason} ({w.link})" for w in summary.stale_waivers]
    if summary.unmatched_must_pass:
        lines += ["", "## Must-pass entries that matched no case", ""]
        lines += [f"- `{p}`" for p in summary.unmatched_must_pass]
    lines += [
        "",
        (
            "Bounds: `ctref/tolerances.toml` (derivation beside each row); measured errors and "
            "the bound of every case are in `results.json`."
        ),
        "",
    ]
    return "\n".join(lines)
