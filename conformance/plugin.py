"""The pytest plugin of the conformance suite: options, backend selection, verdicts, reports.

Each test is one case at one level (``<level>/<case>``). Its outcome becomes a verdict here:
an exception :class:`~conformance.backends.base.NotSupported` is ``not-supported`` (a pytest
skip), :class:`~conformance.results.ConformanceFailure` is ``fail``, any other exception
``error``; then the backend's expectations apply (waivers turn fail/error into ``waived``, shown
as xfail; a must-pass case that does not pass fails). Measured errors and bounds travel with each
report (``user_properties``), so they survive pytest-xdist, and the controller writes the reports.
"""

from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch

from conformance import arch, levels, report
from conformance.backends import UnknownBackend, load_backend, selected_name
from conformance.backends.base import Backend, LoadedCheckpoint, NotSupported
from conformance.cases import Case, NoCases, cases_under, catalog_cases
from conformance.results import (
    EXPECTATIONS_DIR,
    LEVELS,
    CaseResult,
    ConformanceFailure,
    Expectations,
    ExpectationsError,
    Verdict,
    case_id,
    final_verdict,
    load_expectations,
    summarize,
)
from ctref.errors import CTRefError

GENERATION_JOBS = min(4, os.cpu_count() or 1)
RESULT_PROPERTY = "ctref_result"
MEASURED_PROPERTY = "ctref_measured"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctref conformance")
    group.addoption(
        "--backend",
        default=None,
        help="engine adapter to run (built-ins: reference, compressed-tensors, transformers, "
        "torch-kernels, trtllm, vllm; or an entry point of group ctref.backends); default "
        "$CTREF_BACKEND, else reference",
    )
    group.addoption("--device", default="cpu", help="device the engine runs on (default cpu)")
    group.addoption(
        "--cases",
        default=None,
        help="run the case directories under this folder instead of the fixture catalog",
    )
    group.addoption(
        "--expectations",
        default=None,
        help="folder holding must-pass.txt and waivers.toml for the backend (default "
        "conformance/expectations/<backend>/; a vendor keeps theirs beside their adapter)",
    )
    group.addoption(
        "--report-dir",
        default=None,
        help="write junit.xml, results.json and certificate.md into this folder",
    )


class EngineLoadError(RuntimeError):
    """The engine failed to load the case's checkpoint (an earlier level saw the traceback)."""


class Harness:
    """Per-process state: the backend, its expectations, the cases and the loaded checkpoints."""

    def __init__(self, config: pytest.Config, backend: Backend, expectations: Expectations) -> None:
        self.config = config
        self.backend = backend
        self.expectations = expectations
        self.device: str = config.getoption("--device")
        self._loaded: dict[str, LoadedCheckpoint | Exception] = {}
        self.results: list[CaseResult] = []
        self.started = time.time()

    @cached_property
    def device_arch(self) -> str:
        """The device's architecture (``sm90``, ``cpu``); asked once a test runs, after the
        xdist worker is pinned to its GPU."""
        return arch.device_arch(self.device)

    def gate(self, case: Case, level: str) -> arch.Gate | None:
        """Whether this device lacks a kernel for one of the case's modules at ``level``
        (``conformance/arch_support.toml``), for backends with an expected table."""
        if self.backend.scheme_table is None:
            return None
        try:
            infos = levels.reference(case).modules()
        except CTRefError:
            return None  # the reference rejects the checkpoint: the levels report that
        modules = [
            arch.ModuleKey(i.name, levels.scheme_key(i.scheme), i.format, i.sparsity_format)
            for i in infos
        ]
        return arch.gate(self.backend.name, self.backend.scheme_table, level, self.device_arch, modules)

    def kernels(self, case: Case) -> dict[str, str] | None:
        """Which kernel ran each module, for backends that say (``kernel_report()``)."""
        report_of = getattr(self._loaded.get(case.name), "kernel_report", None)
        return None if report_of is None else report_of()

    @cached_property
    def cases(self) -> list[Case]:
        root = self.config.getoption("--cases")
        try:
            if root is not None:
                return cases_under(Path(root))
            return catalog_cases(generate=not _is_worker(self.config), jobs=GENERATION_JOBS)
        except NoCases as error:
            raise pytest.UsageError(str(error)) from None

    def load(self, case: Case) -> LoadedCheckpoint:
        """The case's checkpoint as the engine loaded it. Tests run case by case (see
        :func:`pytest_collection_modifyitems`), so one case is held at a time: loading the next
        closes the previous one; a refusal is remembered like a load."""
        if case.name not in self._loaded:
            self.close()
            try:
                self._loaded[case.name] = self.backend.load(
                    case.directory, device=self.device, module_classes=case.module_classes
                )
            except NotSupported as refusal:
                self._loaded[case.name] = refusal
            except Exception as failure:
                # The first level reports the engine's own traceback; later ones a short error.
                self._loaded[case.name] = EngineLoadError(f"{type(failure).__name__}: {failure}")
                raise
        loaded = self._loaded[case.name]
        if isinstance(loaded, Exception):
            # A fresh exception each time: re-raising one instance grows its traceback.
            raise type(loaded)(str(loaded))
        return loaded

    def close(self) -> None:
        for loaded in self._loaded.values():
            if not isinstance(loaded, Exception):
                loaded.close()
        self._loaded.clear()

    # The hooks below run in the process that reports: the xdist controller, or a plain run.

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.started = time.time()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == RESULT_PROPERTY:
                self.results.append(CaseResult.from_dict(json.loads(value)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _is_worker(self.config) or not self.results:
            return
        summary = summarize(self.results, self.expectations)
        write = terminalreporter.write_line
        terminalreporter.section(f"ctref conformance: {self.backend.name}")
        write(", ".join(f"{count} {verdict}" for verdict, count in summary.counts.items()))
        gated = sum(r.message.startswith(arch.ARCH_PREFIX) for r in self.results)
        if gated:
            write(f"{gated} of the not-supported are not-supported (arch) on this device")
        for result in self.results:
            if arch.is_unexpected_pass(result.verdict, result.message):
                write(f"UNEXPECTED PASS {result.id}: {result.message}")
        for waiver in summary.stale_waivers:
            write(f"STALE waiver (matches no case): {waiver.pattern}: {waiver.reason} ({waiver.link})")
        for pattern in summary.unmatched_must_pass:
            write(f"must-pass entry matches no case run: {pattern}")
        write("conformant" if summary.conformant else "NOT conformant")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        directory = self.config.getoption("--report-dir")
        if _is_worker(self.config) or directory is None:
            return
        report.write_all(
            Path(directory),
            self.results,
            self.expectations,
            backend=self.backend,
            device=self.device,
            duration_s=time.time() - self.started,
        )


_HARNESS = pytest.StashKey[Harness]()


def harness_of(config: pytest.Config) -> Harness:
    return config.stash[_HARNESS]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (issue 6: GPU backends)")
    if _is_worker(config):
        arch.pin_xdist_worker()  # one GPU per worker, before anything initializes CUDA
    name = selected_name(config.getoption("--backend"))
    try:
        backend = load_backend(name)
    except UnknownBackend as error:
        raise pytest.UsageError(str(error)) from None
    folder = config.getoption("--expectations")
    try:
        expectations = load_expectations(Path(folder) if folder else EXPECTATIONS_DIR / backend.name)
    except ExpectationsError as error:
        raise pytest.UsageError(str(error)) from None
    harness = Harness(config, backend, expectations)
    config.stash[_HARNESS] = harness
    config.pluginmanager.register(harness, "ctref-conformance-harness")
    if _is_worker(config):
        # One thread per xdist worker: workers already fill the cores, and OpenMP threads
        # spinning against each other make small tensor ops an order of magnitude slower.
        torch.set_num_threads(1)
    else:
        _ = harness.cases  # generate the catalog's cases once, before any xdist worker starts
    # All levels of a case on one worker: the engine loads each checkpoint once.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _HARNESS in config.stash:
        harness_of(config).close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    harness = harness_of(config)
    try:
        version = harness.backend.engine_version()
    except NotSupported as missing:
        version = f"not available ({missing})"
    return [f"ctref conformance: backend {harness.backend.name} {version}, device {harness.device}"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    harness = harness_of(metafunc.config)
    level = _level_of(metafunc.module)
    cases = [c for c in harness.cases if level != "model" or c.kind == "model"]
    metafunc.parametrize(
        "case",
        [pytest.param(c, id=c.name, marks=pytest.mark.xdist_group(c.name)) for c in cases],
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run case by case, every level of a case in a row, so the engine holds one checkpoint."""
    levels = {level: index for index, level in enumerate(LEVELS)}

    def order(item: pytest.Item) -> tuple[str, int]:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        name = case.name if isinstance(case, Case) else ""
        return name, levels.get(_level_of(item.module), len(levels))

    items.sort(key=order)


def _level_of(module: Any) -> str:
    return module.__name__.rpartition(".")[2].removeprefix("test_")


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Harness:
    return harness_of(request.config)


@pytest.fixture
def record(request: pytest.FixtureRequest):
    """``record(measured=..., bound=...)``: numbers that go into every report, pass or fail."""

    def put(**values: Any) -> None:
        request.node.user_properties.append((MEASURED_PROPERTY, json.dumps(values, default=str)))

    return put


def _classify(excinfo: pytest.ExceptionInfo[BaseException] | None) -> tuple[Verdict, str]:
    if excinfo is None:
        return Verdict.PASS, ""
    error = excinfo.value
    if isinstance(error, NotSupported):
        return Verdict.NOT_SUPPORTED, str(error)
    if isinstance(error, ConformanceFailure):
        return Verdict.FAIL, str(error)
    if isinstance(error, pytest.skip.Exception):
        return Verdict.NOT_SUPPORTED, str(error.msg)
    return Verdict.ERROR, f"{type(error).__name__}: {error}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    test_report: pytest.TestReport = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    decisive = call.when == "call" or (call.when == "setup" and call.excinfo is not None)
    if not isinstance(case, Case) or not decisive:
        return
    harness = harness_of(item.config)
    level = _level_of(item.module)
    identifier = case_id(level, case.name)
    raw, message = _classify(call.excinfo)
    raw, message = arch.apply_gate(harness.gate(case, level), raw, message)
    verdict, message = final_verdict(raw, message, identifier, harness.expectations)
    measured: dict[str, Any] = {}
    for key, value in item.user_properties:
        if key == MEASURED_PROPERTY:
            measured.update(json.loads(value))
    kernels = harness.kernels(case) if level in ("layer", "model") else None
    if kernels:
        measured.setdefault("measured", {})["kernels"] = kernels
    result = CaseResult(
        id=identifier,
        level=level,
        case=case.name,
        verdict=verdict,
        message=message,
        measured=measured.get("measured", {}),
        bound=measured.get("bound", {}),
        formats=case.formats,
        duration_s=call.duration,
    )
    test_report.user_properties.append((RESULT_PROPERTY, json.dumps(result.to_dict())))
    location = (str(item.path), item.location[1] or 0)
    if verdict is Verdict.PASS:
        test_report.outcome = "passed"
        test_report.longrepr = None
    elif verdict is Verdict.NOT_SUPPORTED:
        test_report.outcome = "skipped"
        test_report.longrepr = (*location, f"not-supported: {message}")
    elif verdict is Verdict.WAIVED:
        test_report.outcome = "skipped"
        test_report.wasxfail = message
    else:
        test_report.outcome = "failed"
        if raw is not verdict or test_report.longrepr is None:
            test_report.longrepr = f"{verdict.value}: {message}"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")
