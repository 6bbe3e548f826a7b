"""The backend protocol: what an engine adapter answers, one method per conformance level.

An adapter opens a checkpoint with its engine (:meth:`Backend.load`) and answers questions about
what the engine made of it. Every method may raise :class:`NotSupported` with a reason: the
engine lacks that capability (a format, a scheme, a whole level), and the verdict is
``not-supported`` rather than ``fail``. An adapter imports its engine lazily, inside ``load``, so
a missing engine is a ``NotSupported`` for every case, never an import crash at collection.

Vendors implement this protocol in their own package and register the class under the entry-point
group ``ctref.backends`` (see ``conformance/backends/__init__.py``); nothing here needs editing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


class NotSupported(Exception):
    """The engine cannot do what a case asks; the message says what and why (the verdict's reason)."""


@dataclass(frozen=True)
class ResolvedModule:
    """How an engine resolved one module of the checkpoint (the config level).

    ``scheme`` is the scheme the engine applies, as a compressed-tensors ``QuantizationScheme``
    dict (``weights`` / ``input_activations`` / ``output_activations``; pydantic's
    ``model_dump()`` fits), or None for a module the engine leaves unquantized. ``format`` is the
    compression format it decodes the weight with. Engines that map schemes to an enum of their
    own (TensorRT-LLM's ``QuantAlgo``, vLLM's scheme classes) give its value as ``label``; the
    expected value comes from the backend's table in ``conformance/expected/``.
    """

    scheme: Mapping[str, Any] | None
    format: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Inventory:
    """What the engine did with the checkpoint's tensors (the inventory level).

    Every checkpoint tensor must be in ``consumed`` (read into the engine's model) or in
    ``ignored`` (deliberately left out, with the reason); ``consumed`` names only tensors the
    checkpoint holds; ``uninitialized`` lists engine parameters no checkpoint tensor set, i.e. left
    at their initial value.
    """

    consumed: frozenset[str]
    ignored: Mapping[str, str] = field(default_factory=dict)
    uninitialized: frozenset[str] = frozenset()


class LoadedCheckpoint(Protocol):
    """A checkpoint as one engine loaded it."""

    def modules(self) -> Mapping[str, ResolvedModule]:
        """Every weight-bearing module of the checkpoint the engine knows, by checkpoint name."""
        ...

    def inventory(self) -> Inventory:
        ...

    def effective_weight(self, module: str) -> torch.Tensor:
        """The dense (N, K) weight the engine computes with, in the dtype it keeps it."""
        ...

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        """The engine's kernel for one module on ``inputs`` (M, K): the layer output (M, N).

        Activation quantization, bias and the engine's compute dtype included; the output's dtype
        is the compute dtype the bound is chosen for.
        """
        ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the whole model, for model-level fixtures."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class Backend(Protocol):
    """An engine adapter. ``name`` is what ``--backend`` selects."""

    name: str
    scheme_table: str | None
    """Stem of ``conformance/expected/<table>.toml`` for engines with a scheme enum, else None."""

    def engine_version(self) -> str:
        """The engine's version string; NotSupported if the engine is not installed."""
        ...

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> LoadedCheckpoint:
        """Open ``checkpoint`` with the engine on ``device`` (``cpu``; ``cuda`` for GPU backends).

        ``module_classes`` gives each module's class and ancestor class names as the fixture's
        model defines them (class-name targets such as ``"Linear"`` match on them). Engines that
        build the model themselves know their classes and may ignore it.
        """
        ...
