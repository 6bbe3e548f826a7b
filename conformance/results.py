"""Verdicts, per-case results and the expectations (must-pass list, waivers) they are judged by.

A closed set of verdicts, as the Khronos CTS has: ``pass``; ``fail`` (the engine's numbers or
mapping are wrong); ``not-supported`` (the engine clearly refuses, with a reason); ``waived`` (a
failure covered by a waiver with a reason and a link); ``error`` (the engine or the harness broke:
an unexpected exception). A run conforms when every case is pass, not-supported or waived, every
must-pass case passes, and no waiver is stale.
"""

from __future__ import annotations

import enum
import fnmatch
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPECTATIONS_DIR = Path(__file__).parent / "expectations"
LEVELS = ("config", "inventory", "weights", "layer", "model")


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NOT_SUPPORTED = "not-supported"
    WAIVED = "waived"
    ERROR = "error"

    @property
    def conformant(self) -> bool:
        return self in (Verdict.PASS, Verdict.NOT_SUPPORTED, Verdict.WAIVED)


class ConformanceFailure(AssertionError):
    """The engine's answer is wrong (verdict ``fail``); the message names what is wrong."""


def case_id(level: str, case: str) -> str:
    """The id waivers and must-pass lists match: ``<level>/<case>`` (e.g. ``weights/w4a16_g128``)."""
    return f"{level}/{case}"


@dataclass(frozen=True)
class CaseResult:
    """One case at one level, as the reports show it."""

    id: str
    level: str
    case: str
    verdict: Verdict
    message: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    formats: tuple[str, ...] = ()
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "level": self.level,
            "case": self.case,
            "formats": list(self.formats),
            "verdict": self.verdict.value,
            "message": self.message,
            "measured": self.measured,
            "bound": self.bound,
            "duration_s": round(self.duration_s, 4),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseResult:
        return cls(
            id=d["id"],
            level=d["level"],
            case=d["case"],
            verdict=Verdict(d["verdict"]),
            message=d.get("message", ""),
            measured=d.get("measured", {}),
            bound=d.get("bound", {}),
            formats=tuple(d.get("formats", ())),
            duration_s=d.get("duration_s", 0.0),
        )


# ---------------------------------------------------------------------------------------------
# Expectations


@dataclass(frozen=True)
class Waiver:
    """A known failure: cases matching ``pattern`` (a glob over case ids) that fail or error are
    reported ``waived``. ``reason`` and ``link`` (an issue or bug URL) are required."""

    pattern: str
    reason: str
    link: str

    def matches(self, case: str) -> bool:
        return fnmatch.fnmatchcase(case, self.pattern)


@dataclass(frozen=True)
class Expectations:
    """A backend's expectations, kept as data in ``conformance/expectations/<backend>/``."""

    must_pass: tuple[str, ...] = ()
    """Globs over case ids; a matching case must end ``pass`` (not-supported or waived fail it)."""
    waivers: tuple[Waiver, ...] = ()

    def waiver_for(self, case: str) -> Waiver | None:
        return next((w for w in self.waivers if w.matches(case)), None)

    def must_pass_matches(self, case: str) -> bool:
        return any(fnmatch.fnmatchcase(case, pattern) for pattern in self.must_pass)

    def stale_waivers(self, case_ids: Iterable[str]) -> list[Waiver]:
        """Waivers that match none of the collected cases."""
        ids = list(case_ids)
        return [w for w in self.waivers if not any(w.matches(case) for case in ids)]

    def unmatched_must_pass(self, case_ids: Iterable[str]) -> list[str]:
        """Must-pass entries that match no collected case (a missing case is not a pass)."""
        ids = list(case_ids)
        return [p for p in self.must_pass if not any(fnmatch.fnmatchcase(c, p) for c in ids)]


class ExpectationsError(ValueError):
    """A malformed must-pass list or waiver file; the message names the file and entry."""


def load_expectations(folder: Path) -> Expectations:
    """A backend's ``must-pass.txt`` (one glob per line, ``#`` comments) and ``waivers.toml``
    (``[[waiver]]`` tables with ``case``, ``reason``, ``link``) in ``folder``; both optional."""
    must_pass: list[str] = []
    must_pass_file = folder / "must-pass.txt"
    if must_pass_file.exists():
        for line in must_pass_file.read_text(encoding="utf-8").splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                must_pass.append(entry)
    waivers: list[Waiver] = []
    waiver_file = folder / "waivers.toml"
    if waiver_file.exists():
        try:
            data = tomllib.loads(waiver_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ExpectationsError(f"{waiver_file}: not valid TOML ({error})") from None
        for index, entry in enumerate(data.get("waiver", [])):
            missing = [key for key in ("case", "reason", "link") if not entry.get(key)]
            if missing:
                raise ExpectationsError(
                    f"{waiver_file}: waiver[{index}] needs {', '.join(missing)} "
                    "(a waiver without a reason and a link is not a waiver)"
                )
            waivers.append(Waiver(entry["case"], entry["reason"], entry["link"]))
    return Expectations(tuple(must_pass), tuple(waivers))


def final_verdict(
    raw: Verdict, message: str, case: str, expectations: Expectations
) -> tuple[Verdict, str]:
    """Apply the expectations to a raw verdict: waivers cover fail/error; a must-pass case that
    does not pass fails, saying why."""
    if raw in (Verdict.FAIL, Verdict.ERROR):
        waiver = expectations.waiver_for(case)
        if waiver is not None:
            return Verdict.WAIVED, f"waived ({waiver.reason}; {waiver.link}): {message}"
    if expectations.must_pass_matches(case) and raw is not Verdict.PASS:
        what = raw.value if raw is not Verdict.WAIVED else "waived"
        return Verdict.FAIL, f"must-pass case ended {what}: {message}"
    return raw, message


@dataclass(frozen=True)
class RunSummary:
    """Counts and the conformance decision of a whole run."""

    counts: dict[str, int]
    stale_waivers: tuple[Waiver, ...]
    unmatched_must_pass: tuple[str, ...]

    @property
    def conformant(self) -> bool:
        failing = self.counts.get(Verdict.FAIL.value, 0) + self.counts.get(Verdict.ERROR.value, 0)
        return failing == 0 and not self.stale_waivers and not self.unmatched_must_pass


def summarize(results: Sequence[CaseResult], expectations: Expectations) -> RunSummary:
    counts = {verdict.value: 0 for verdict in Verdict}
    for result in results:
        counts[result.verdict.value] += 1
    ids = [result.id for result in results]
    return RunSummary(
        counts=counts,
        stale_waivers=tuple(expectations.stale_waivers(ids)),
        unmatched_must_pass=tuple(expectations.unmatched_must_pass(ids)),
    )
