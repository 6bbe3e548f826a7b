"""GPU architectures: which kernel runs where, the ``not-supported (arch)`` verdict, GPU pinning.

* :func:`device_arch` names the device (``sm90``; ``cpu``).
* :func:`load_table` reads ``arch_support.toml``: for each backend label (a TensorRT-LLM
  ``QuantAlgo``, a vLLM scheme class, a torch-kernels kernel) the kernels and the architectures
  they run on, each row citing its source.
* :func:`expected_label` maps a module's scheme key (``conformance.levels.scheme_key``), format
  and sparsity to the label a backend's table ``conformance/expected/<table>.toml`` expects.
* :func:`gate` decides a case: supported, or ``not-supported (arch)`` because no kernel of a
  module's label runs on this GPU; :func:`apply_gate` turns a verdict into the gated one and
  reports a pass the table says is impossible (the table is wrong then, not the engine).
* :func:`pin_xdist_worker` gives each pytest-xdist worker one GPU through
  ``CUDA_VISIBLE_DEVICES`` (worker ``gw<i>`` takes the ``i mod n``-th visible device). Load this
  module as a plugin (``pytest -p conformance.arch``) and it runs before any test touches CUDA.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from conformance.results import Verdict

TABLE_PATH = Path(__file__).parent / "arch_support.toml"
EXPECTED_TABLES = Path(__file__).parent / "expected"
ARCH_PREFIX = "(arch)"
"""How a gated verdict's message starts: the verdict reads ``not-supported: (arch) ...``."""
UNEXPECTED_PASS = "unexpected pass"
WORKER_ENV = "PYTEST_XDIST_WORKER"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


class ArchTableError(ValueError):
    """A malformed ``arch_support.toml`` or expected table; the message names the row."""


def device_arch(device: str) -> str:
    """``sm<major><minor>`` of a CUDA device (``sm90`` for an H100), ``cpu`` for the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"sm{major}{minor}"


# ---------------------------------------------------------------------------------------------
# The architecture table


@dataclass(frozen=True)
class Kernel:
    """One row of ``arch_support.toml``: a kernel serving a backend's label on some archs."""

    backend: str
    label: str
    kernel: str
    archs: tuple[str, ...]
    source: str
    schemes: tuple[str, ...] = ()
    """Scheme-key globs the kernel serves (torch-kernels selection); empty for gated backends."""
    formats: tuple[str, ...] = ()
    """Compression formats it reads; empty means any."""

    def serves(self, key: str, fmt: str | None) -> bool:
        return any(fnmatch.fnmatchcase(key, glob) for glob in self.schemes) and (
            not self.formats or fmt in self.formats
        )


@dataclass(frozen=True)
class ArchTable:
    architectures: tuple[str, ...]
    gated_levels: Mapping[str, tuple[str, ...]]
    kernels: tuple[Kernel, ...]

    def kernels_for(self, backend: str, label: str) -> list[Kernel]:
        return [k for k in self.kernels if k.backend == backend and k.label == label]

    def select(self, backend: str, key: str, fmt: str | None, arch: str) -> Kernel | None:
        """The first kernel of ``backend`` serving this scheme and format on ``arch``."""
        return next(
            (
                k
                for k in self.kernels
                if k.backend == backend and arch in k.archs and k.serves(key, fmt)
            ),
            None,
        )


@cache
def load_table(path: Path = TABLE_PATH) -> ArchTable:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    architectures = tuple(data["architectures"])
    known = {*architectures, "cpu"}
    kernels = []
    for index, row in enumerate(data.get("kernel", [])):
        where = f"{path.name}: kernel[{index}] ({row.get('backend')} {row.get('label')})"
        missing = [k for k in ("backend", "label", "kernel", "archs", "source") if k not in row]
        if missing:
            raise ArchTableError(f"{where}: needs {', '.join(missing)}")
        unknown = set(row["archs"]) - known
        if unknown:
            raise ArchTableError(
                f"{where}: unknown architectures {sorted(unknown)}; known {sorted(known)}"
            )
        kernels.append(
            Kernel(
                backend=row["backend"],
                label=row["label"],
                kernel=row["kernel"],
                archs=tuple(row["archs"]),
                source=row["source"],
                schemes=tuple(row.get("schemes", ())),
                formats=tuple(row.get("formats", ())),
            )
        )
    gated = {name: tuple(levels) for name, levels in data.get("gated_levels", {}).items()}
    return ArchTable(architectures, gated, tuple(kernels))


# ---------------------------------------------------------------------------------------------
# Expected labels


@dataclass(frozen=True)
class LabelRow:
    """One ``[[map]]`` row of an expected table. ``formats`` / ``sparsity`` (optional) restrict
    it to modules stored in those compression / sparsity formats (``none`` = not sparse)."""

    scheme: str
    label: str | None
    formats: tuple[str, ...] | None
    sparsity: tuple[str, ...] | None

    def matches(self, key: str, fmt: str | None, sparsity: str | None) -> bool:
        return (
            fnmatch.fnmatchcase(key, self.scheme)
            and (self.formats is None or fmt in self.formats)
            and (self.sparsity is None or (sparsity or "none") in self.sparsity)
        )


@cache
def expected_rows(table: str) -> tuple[LabelRow, ...]:
    """``conformance/expected/<table>.toml`` in order; ``label = "refuse"`` becomes None."""
    path = EXPECTED_TABLES / f"{table}.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    rows = []
    for index, row in enumerate(data["map"]):
        if "scheme" not in row or "label" not in row or "source" not in row:
            raise ArchTableError(f"{path.name}: map[{index}] needs scheme, label and source")
        rows.append(
            LabelRow(
                scheme=row["scheme"],
                label=None if row["label"] == "refuse" else row["label"],
                formats=tuple(row["formats"]) if "formats" in row else None,
                sparsity=tuple(row["sparsity"]) if "sparsity" in row else None,
            )
        )
    return tuple(rows)


def matching_row(
    table: str, key: str, *, fmt: str | None = None, sparsity: str | None = None
) -> LabelRow | None:
    """The first row of the table matching a module, or None."""
    return next((row for row in expected_rows(table) if row.matches(key, fmt, sparsity)), None)


def expected_label(
    table: str, key: str, *, fmt: str | None = None, sparsity: str | None = None
) -> str | None:
    """The label the table expects for a module; None means refuse, also for a scheme no row
    matches."""
    row = matching_row(table, key, fmt=fmt, sparsity=sparsity)
    return None if row is None else row.label


# ---------------------------------------------------------------------------------------------
# Gating


@dataclass(frozen=True)
class ModuleKey:
    """What gating needs of one module: name, scheme key, compression and sparsity format."""

    name: str
    key: str
    format: str | None
    sparsity: str | None = None


@dataclass(frozen=True)
class Gate:
    """Why a case cannot run on this architecture (the first module that cannot)."""

    module: str
    label: str
    arch: str
    kernels: tuple[Kernel, ...]

    @property
    def reason(self) -> str:
        where = "; ".join(
            f"{k.kernel} runs on {', '.join(k.archs) or 'no GPU'} [{k.source}]"
            for k in self.kernels
        )
        return f"{self.module}: {self.label} has no kernel on {self.arch} ({where})"


def gate(
    backend: str,
    table: str | None,
    level: str,
    arch: str,
    modules: Iterable[ModuleKey],
    arch_table: ArchTable | None = None,
) -> Gate | None:
    """The gate of a case at ``level``, or None when the architecture does not decide it: the
    backend has no expected table or gates not this level, or every module's label has a
    kernel on ``arch`` (or no row at all in ``arch_support.toml``)."""
    arch_table = arch_table or load_table()
    if table is None or level not in arch_table.gated_levels.get(backend, ()):
        return None
    for module in modules:
        label = expected_label(table, module.key, fmt=module.format, sparsity=module.sparsity)
        if label is None:
            continue
        kernels = arch_table.kernels_for(backend, label)
        if kernels and not any(arch in k.archs for k in kernels):
            return Gate(module.name, label, arch, tuple(kernels))
    return None


def apply_gate(gate_: Gate | None, verdict: Verdict, message: str) -> tuple[Verdict, str]:
    """The verdict on a gated case: a fail or error is ``not-supported (arch)``; the engine's own
    refusal keeps its reason; a pass stays a pass and says the table is wrong."""
    if gate_ is None or verdict is Verdict.NOT_SUPPORTED:
        return verdict, message
    if verdict is Verdict.PASS:
        return verdict, (
            f"{UNEXPECTED_PASS}: arch_support.toml says {gate_.reason}, yet the case passed; "
            "fix the table"
        )
    detail = f" (the engine: {message})" if message else ""
    return Verdict.NOT_SUPPORTED, f"{ARCH_PREFIX} {gate_.reason}{detail}"


def is_unexpected_pass(verdict: Verdict, message: str) -> bool:
    return verdict is Verdict.PASS and message.startswith(UNEXPECTED_PASS)


# ---------------------------------------------------------------------------------------------
# pytest-xdist: one GPU per worker


def worker_index(worker_id: str | None) -> int | None:
    """``gw3`` -> 3; None for the controller or a run without xdist."""
    match = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(match[1]) if match else None


def visible_devices(environ: Mapping[str, str], count: int) -> list[str]:
    """The devices a process may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``0..count-1``."""
    listed = environ.get(VISIBLE_ENV)
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def pin_xdist_worker(
    environ: MutableMapping[str, str] | None = None, count: int | None = None
) -> str | None:
    """Pin this xdist worker to one GPU (``CUDA_VISIBLE_DEVICES``); returns the device chosen,
    or None outside a worker or without GPUs. Must run before CUDA is initialized.

    ``count`` defaults to ``torch.cuda.device_count()``, which asks NVML and leaves CUDA
    uninitialized, so the variable set here still takes effect.
    """
    environ = os.environ if environ is None else environ
    index = worker_index(environ.get(WORKER_ENV))
    if index is None:
        return None
    devices = visible_devices(environ, torch.cuda.device_count() if count is None else count)
    if not devices:
        return None
    chosen = devices[index % len(devices)]
    environ[VISIBLE_ENV] = chosen
    return chosen


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """As a plugin (``-p conformance.arch``): pin the worker before any test runs."""
    pin_xdist_worker()
