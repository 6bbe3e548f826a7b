"""The cases the suite runs: the fixture catalog's generated checkpoints with expected values.

A case is a checkpoint directory (``config.json`` + safetensors) with an ``expected/`` folder
(``ctref.fixtures.generate`` writes them): ``inputs.safetensors`` (layer inputs by module name;
``input_ids`` for a model), ``dense.safetensors`` (ctref's dense weights, ``<module>.weight``),
``outputs.safetensors`` (reference layer outputs by module name) and ``case.json`` (per-module
records: classes, format, scheme). Expected values a case lacks are computed from ctref live;
inputs it lacks are drawn from a seed fixed by the case and module name.

Cases come from the catalog (``fixtures/catalog.toml``), generated on demand into
``.fixtures-cache/<name>/<size>/`` (``layer``, and ``model`` for whole tiny models: case
``<name>.model``), or from ``--cases DIR``: every folder under DIR holding a ``config.json``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

EXPECTED_DIR = "expected"
GENERATED_TOKENS = 8
"""Rows of generated layer inputs (tokens), when a case ships none."""
MODEL_SUFFIX = ".model"


@dataclass(frozen=True)
class Case:
    """One generated checkpoint and its expected values."""

    name: str
    directory: Path
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """``expected/case.json`` (empty when absent)."""

    @property
    def kind(self) -> str:
        """``model`` for whole-model fixtures (logits are compared), else ``layer``."""
        if "size" in self.meta:
            return self.meta["size"]
        return "model" if "vocab_size" in self.model_config() else "layer"

    def model_config(self) -> dict[str, Any]:
        return json.loads((self.directory / "config.json").read_text(encoding="utf-8"))

    @cached_property
    def module_classes(self) -> dict[str, tuple[str, ...]]:
        """Each module's class and ancestor class names, as the fixture's model defines them."""
        return {
            name: tuple(record["classes"])
            for name, record in self.meta.get("modules", {}).items()
            if "classes" in record
        }

    @cached_property
    def formats(self) -> tuple[str, ...]:
        """The compression formats of its quantized modules (``dense`` if none), for the matrix."""
        records = self.meta.get("modules", {}).values()
        found = {r["format"] for r in records if r.get("weights") is not None}
        found |= {r["sparsity_format"] for r in records if r.get("sparsity_format")}
        if not records:
            found = set(_formats_from_checkpoint(self.directory, self.module_classes))
        return tuple(sorted(found)) or ("dense",)

    # ------------------------------------------------------------------ expected values

    def _file(self, stem: str) -> Mapping[str, torch.Tensor]:
        return _load_expected(self.directory / EXPECTED_DIR / f"{stem}.safetensors")

    def stored_dense(self, module: str) -> torch.Tensor | None:
        return self._file("dense").get(f"{module}.weight")

    def stored_output(self, module: str) -> torch.Tensor | None:
        return self._file("outputs").get(module)

    def layer_inputs(self, module: str, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """The case's inputs for ``module`` (M, K), else a fixed draw of N(0, 1) in ``dtype``."""
        stored = self._file("inputs").get(module)
        if stored is not None:
            return stored
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.name}/{module}".encode()))
        return torch.randn(GENERATED_TOKENS, in_features, generator=generator).to(dtype)

    def input_ids(self) -> torch.Tensor:
        """The model fixture's token ids (1, T), else a fixed draw below the vocabulary size."""
        stored = self._file("inputs").get("input_ids")
        if stored is not None:
            return stored
        generator = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        vocab = int(self.model_config()["vocab_size"])
        return torch.randint(0, vocab, (1, GENERATED_TOKENS), generator=generator)


def _formats_from_checkpoint(directory: Path, classes: Mapping[str, tuple[str, ...]]) -> list[str]:
    import ctref

    with ctref.open_checkpoint(directory, module_classes=classes) as checkpoint:
        return [info.format for info in checkpoint.modules() if info.scheme is not None]


@lru_cache(maxsize=16)
def _load_expected(path: Path) -> Mapping[str, torch.Tensor]:
    """An expected-values file (read once per process), or nothing when the case has none."""
    return load_file(str(path)) if path.exists() else {}


def load_case(directory: Path, name: str | None = None) -> Case:
    meta_path = directory / EXPECTED_DIR / "case.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return Case(name=name or directory.name, directory=directory, meta=meta)


def cases_under(root: Path) -> list[Case]:
    """Every case directory (one holding ``config.json``) below ``root``, sorted by name. A
    case is named by its path under ``root`` joined with ``.``, a final ``layer`` dropped: the
    generator's ``<name>/layer`` and ``<name>/model`` become ``<name>`` and ``<name>.model``."""
    found = []
    for path in root.rglob("config.json"):
        parts = path.parent.relative_to(root).parts
        name = ".".join(parts[:-1] if parts[-1:] == ("layer",) else parts) or root.name
        found.append(load_case(path.parent, name))
    return sorted(found, key=lambda case: case.name)


class NoCases(LookupError):
    """Nothing to run: the catalog cannot be loaded or generated, and no ``--cases`` folder."""


def catalog_cases(*, generate: bool, jobs: int = 1) -> list[Case]:
    """The catalog's cases (``<name>`` for the layer size, ``<name>.model`` for the model size),
    generated into ``.fixtures-cache/`` first when ``generate`` (unchanged ones are cached)."""
    try:
        from ctref.errors import CTRefError
        from ctref.fixtures import generate as generator
        from ctref.fixtures.catalog import load_catalog
    except ImportError as error:
        raise NoCases(f"the fixture catalog is not in this checkout ({error}); pass --cases DIR") from None
    try:
        catalog = load_catalog()
    except CTRefError as error:
        raise NoCases(f"cannot load the fixture catalog: {error}") from None
    out = generator.default_out()
    if generate:
        summary = generator.generate(out, jobs=jobs, catalog=catalog, log=_Quiet())
        if summary["failed"]:
            failed = "; ".join(f"{name}: {error}" for name, error in summary["failed"].items())
            raise NoCases(f"fixture generation failed: {failed}")
    cases = []
    for entry in catalog.cases:
        for size in entry.sizes:
            name = entry.name + (MODEL_SUFFIX if size == "model" else "")
            cases.append(load_case(out / entry.name / size, name))
    return cases


class _Quiet:
    """A log stream for the generator that keeps pytest's output clean."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
