"""The conformance harness itself: expectations and verdicts, backend selection, reports.

The end-to-end tests run ``pytest conformance`` in a subprocess on the bug cases of
tests/broken_backends.py (a few seconds each), selecting backends by environment variable and by
an entry point of a throw-away vendor package, as an engine vendor would.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from broken_backends import write_bug_cases

from conformance import report
from conformance.backends import (
    ENV_VAR,
    UnknownBackend,
    available,
    load_backend,
    selected_name,
)
from conformance.backends.base import NotSupported
from conformance.backends.reference import ReferenceBackend
from conformance.results import (
    CaseResult,
    Expectations,
    ExpectationsError,
    Verdict,
    Waiver,
    final_verdict,
    load_expectations,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --- expectations and verdicts ---------------------------------------------------------------


def write_expectations(folder: Path, must_pass: str = "", waivers: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "must-pass.txt").write_text(must_pass, encoding="utf-8")
    (folder / "waivers.toml").write_text(waivers, encoding="utf-8")
    return folder


WAIVERS = """
[[waiver]]
case = "weights/nvfp4*"
reason = "global scale inverted on this engine"
link = "https://example.org/bugs/1"

[[waiver]]
case = "layer/no-such-case"
reason = "fixed long ago"
link = "https://example.org/bugs/2"
"""


def test_expectations_parse_globs_comments_and_waivers(tmp_path):
    folder = write_expectations(tmp_path, "# comment\nconfig/*   # every config case\n\nweights/w4a16\n", WAIVERS)
    expectations = load_expectations(folder)
    assert expectations.must_pass == ("config/*", "weights/w4a16")
    assert [w.pattern for w in expectations.waivers] == ["weights/nvfp4*", "layer/no-such-case"]
    assert load_expectations(tmp_path / "absent") == Expectations()


def test_a_waiver_without_reason_or_link_is_refused_naming_the_file(tmp_path):
    folder = write_expectations(tmp_path, waivers='[[waiver]]\ncase = "layer/x"\nreason = "r"\n')
    with pytest.raises(ExpectationsError, match=r"waivers.toml: waiver\[0\] needs link"):
        load_expectations(folder)


def test_stale_waivers_and_unmatched_must_pass_entries_are_reported():
    expectations = Expectations(
        must_pass=("config/*", "model/absent-case"),
        waivers=(Waiver("weights/nvfp4*", "r", "l"), Waiver("layer/gone", "r", "l")),
    )
    ids = ["config/a", "weights/nvfp4a16", "layer/b"]
    assert [w.pattern for w in expectations.stale_waivers(ids)] == ["layer/gone"]
    assert expectations.unmatched_must_pass(ids) == ["model/absent-case"]
    results = [CaseResult(id=i, level=i.split("/")[0], case=i.split("/")[1], verdict=Verdict.PASS) for i in ids]
    summary = summarize(results, expectations)
    assert not summary.conformant  # a stale waiver, and a must-pass case that never ran
    assert summarize(results, Expectations()).conformant


@pytest.mark.parametrize(
    "raw, case, expected",
    [
        (Verdict.PASS, "weights/nvfp4a16", Verdict.PASS),
        (Verdict.FAIL, "weights/nvfp4a16", Verdict.WAIVED),
        (Verdict.ERROR, "weights/nvfp4a16", Verdict.WAIVED),
        (Verdict.FAIL, "layer/nvfp4a16", Verdict.FAIL),
        (Verdict.NOT_SUPPORTED, "layer/nvfp4a16", Verdict.NOT_SUPPORTED),
        (Verdict.NOT_SUPPORTED, "config/x", Verdict.FAIL),  # must-pass
        (Verdict.PASS, "config/x", Verdict.PASS),
    ],
)
def test_verdict_mapping(raw, case, expected):
    expectations = Expectations(must_pass=("config/*",), waivers=(Waiver("weights/nvfp4*", "known", "https://x"),))
    verdict, message = final_verdict(raw, "what happened", case, expectations)
    assert verdict is expected
    if expected is Verdict.WAIVED:
        assert "known" in message and "https://x" in message and "what happened" in message
    if raw is Verdict.NOT_SUPPORTED and expected is Verdict.FAIL:
        assert message.startswith("must-pass case ended not-supported")


def test_conformant_verdicts():
    assert {v for v in Verdict if v.conformant} == {Verdict.PASS, Verdict.NOT_SUPPORTED, Verdict.WAIVED}


# --- backend selection ----------------------------------------------------------------------


def test_option_beats_environment_beats_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert selected_name(None) == "reference"
    monkeypatch.setenv(ENV_VAR, "transformers")
    assert selected_name(None) == "transformers"
    assert selected_name("compressed-tensors") == "compressed-tensors"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(UnknownBackend, match="known: .*compressed-tensors.*reference.*transformers"):
        load_backend("no-such-engine")


def vendor_package(root: Path, name: str, target: str) -> Path:
    """A throw-away installed distribution registering ``name`` in group ctref.backends."""
    dist = root / "vendor_engine-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[ctref.backends]\n{name} = {target}\n")
    (root / "vendor_adapter.py").write_text(
        "import broken_backends\n"
        "from conformance.backends.reference import ReferenceBackend\n\n\n"
        "class VendorBackend(ReferenceBackend):\n"
        '    name = "vendor-echo"\n\n\n'
        "def broken():\n"
        '    backend = next(b for b in broken_backends.broken_backends() if b.bug == "wrong-nibble-order")\n'
        '    backend.name = "vendor-broken"\n'
        "    return backend\n"
    )
    return root


def test_entry_point_backend_is_found_without_editing_this_repository(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(vendor_package(tmp_path, "vendor-echo", "vendor_adapter:VendorBackend")))
    importlib.invalidate_caches()
    assert available()["vendor-echo"] == "vendor_adapter:VendorBackend"
    backend = load_backend("vendor-echo")
    assert isinstance(backend, ReferenceBackend) and backend.name == "vendor-echo"


@pytest.mark.parametrize("module_name, backend_class", [
    ("conformance.backends.transformers", "TransformersBackend"),
    ("conformance.backends.compressed_tensors", "CompressedTensorsBackend"),
])
def test_a_missing_engine_is_not_supported_never_an_import_crash(module_name, backend_class, monkeypatch, tmp_path):
    module = importlib.import_module(module_name)
    real = importlib.import_module

    def without_engines(name, *args, **kwargs):
        if name in ("transformers", "compressed_tensors"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_engines)
    backend = getattr(module, backend_class)()
    with pytest.raises(NotSupported, match="is not installed"):
        backend.engine_version()
    with pytest.raises(NotSupported, match="is not installed"):
        backend.load(tmp_path, device="cpu", module_classes={})


# --- reports --------------------------------------------------------------------------------


def sample_results() -> list[CaseResult]:
    return [
        CaseResult("config/a", "config", "a", Verdict.PASS, formats=("pack-quantized",)),
        CaseResult("weights/a", "weights", "a", Verdict.FAIL, "a.q_proj: 3 element(s) differ",
                   measured={"max_ulp": 7.0}, bound={"ulp": "0"}, formats=("pack-quantized",)),
        CaseResult("layer/b", "layer", "b", Verdict.NOT_SUPPORTED, "no FP4 kernel", formats=("nvfp4-pack-quantized",)),
        CaseResult("layer/c", "layer", "c", Verdict.WAIVED, "waived (known; https://x): boom", formats=("dense",)),
        CaseResult("inventory/c", "inventory", "c", Verdict.ERROR, "RuntimeError: boom", formats=("dense",)),
    ]


def test_reports_hold_every_case_with_environment_measurements_and_matrix(tmp_path):
    expectations = Expectations(waivers=(Waiver("layer/c", "known", "https://x"), Waiver("model/*", "old", "https://y")))
    report.write_all(tmp_path, sample_results(), expectations, backend=ReferenceBackend(), device="cpu", duration_s=1.5)
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    for key in ("suite_version", "suite_commit", "backend", "backend_version", "torch", "cuda", "gpu"):
        assert key in env, key
    assert env["backend"] == "reference" and env["gpu"] == {"name": "none", "arch": "none"}
    assert data["conformant"] is False and data["counts"]["fail"] == 1
    assert [w["pattern"] for w in data["stale_waivers"]] == ["model/*"]
    weights = next(c for c in data["cases"] if c["id"] == "weights/a")
    assert weights["verdict"] == "fail" and weights["measured"] == {"max_ulp": 7.0} and weights["bound"] == {"ulp": "0"}

    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert suite.get("tests") == "5" and suite.get("failures") == "1" and suite.get("errors") == "1"
    assert suite.get("skipped") == "2"
    failing = suite.find("testcase[@name='a'][@classname='weights']")
    assert failing.find("failure").get("message") == "a.q_proj: 3 element(s) differ"
    assert failing.find("properties/property[@name='measured.max_ulp']").get("value") == "7.0"
    assert suite.find("properties/property[@name='backend']").get("value") == "reference"

    certificate = (tmp_path / "certificate.md").read_text()
    assert "**NOT CONFORMANT**" in certificate
    assert "| format | config | inventory | weights | layer |" in certificate
    assert "| `pack-quantized` | 1 pass | – | 1 FAIL | – |" in certificate
    assert "| `nvfp4-pack-quantized` | – | – | – | 1 n/s |" in certificate
    assert "`model/*`" in certificate and "Stale waivers" in certificate


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bug_cases(tmp_path_factory) -> Path:
    return write_bug_cases(tmp_path_factory.mktemp("cases"))


def run_suite(*args: str, env: dict[str, str] | None = None, pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join(map(str, (*pythonpath, TESTS, REPO)))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )


def test_reference_run_selected_by_environment_writes_three_reports(bug_cases, tmp_path):
    out = tmp_path / "reports"
    # Empty expectations: the reference's own must-pass list names catalog cases this run lacks.
    result = run_suite(
        "--cases", str(bug_cases), "--report-dir", str(out), "--expectations", str(tmp_path),
        env={ENV_VAR: "reference"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ctref conformance: reference" in result.stdout and "\nconformant" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["backend"] == "reference" and data["conformant"]
    assert len(data["cases"]) == 7 * 4  # 7 layer cases x config/inventory/weights/layer
    assert all(case["verdict"] == "pass" for case in data["cases"])
    layer = next(c for c in data["cases"] if c["id"] == "layer/nvfp4a16")
    assert layer["measured"]["ratio"] < 0.1 and layer["bound"]["rel_frobenius"] > 0
    assert (out / "junit.xml").exists() and "**CONFORMANT**" in (out / "certificate.md").read_text()


def test_vendor_entry_point_run_fails_waives_and_reports_stale_waivers(bug_cases, tmp_path):
    vendor = vendor_package(tmp_path / "site", "vendor-broken", "vendor_adapter:broken")
    expectations = write_expectations(
        tmp_path / "expectations",
        must_pass="config/*\n",
        waivers=WAIVERS.replace("weights/nvfp4*", "layer/nvfp4a16"),
    )
    out = tmp_path / "reports"
    result = run_suite(
        "--backend", "vendor-broken", "--cases", str(bug_cases), "-k", "nvfp4a16 or int4_asym",
        "--expectations", str(expectations), "--report-dir", str(out), pythonpath=(vendor,),
    )
    assert result.returncode == 1, result.stdout[-3000:]
    data = json.loads((out / "results.json").read_text())
    verdicts = {case["id"]: case["verdict"] for case in data["cases"]}
    assert verdicts["weights/nvfp4a16"] == "fail"
    assert verdicts["layer/nvfp4a16"] == "waived"
    assert verdicts["config/nvfp4a16"] == "pass" and verdicts["weights/int4_asym_group16"] == "pass"
    assert [w["pattern"] for w in data["stale_waivers"]] == ["layer/no-such-case"]
    assert "STALE waiver (matches no case): layer/no-such-case" in result.stdout
    assert "NOT conformant" in result.stdout
    message = next(c["message"] for c in data["cases"] if c["id"] == "weights/nvfp4a16")
    assert "nibble order" in message
