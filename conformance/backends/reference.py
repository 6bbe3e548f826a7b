"""The ``reference`` backend: ctref itself, run as if it were an engine.

It must pass every case: it proves the harness (the levels, the bounds, the stored expectations
of each case) rather than ctref, whose own tests live in ``tests/``. It computes layers in
float32, as a CPU engine would, so the layer level really compares two computations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

import ctref
from conformance import oracle
from conformance.backends.base import Inventory, NotSupported, ResolvedModule

COMPUTE_DTYPE = torch.float32


class ReferenceBackend:
    name = "reference"
    scheme_table = None

    def engine_version(self) -> str:
        return ctref.__version__

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> ReferenceCheckpoint:
        if device != "cpu":
            raise NotSupported(f"the reference backend runs on the CPU, not {device}")
        return ReferenceCheckpoint(ctref.open_checkpoint(checkpoint, module_classes=module_classes))


class ReferenceCheckpoint:
    def __init__(self, checkpoint: ctref.Checkpoint) -> None:
        self.checkpoint = checkpoint

    def modules(self) -> Mapping[str, ResolvedModule]:
        return {
            info.name: ResolvedModule(
                scheme=None if info.scheme is None else info.scheme.to_dict(), format=info.format
            )
            for info in self.checkpoint.modules()
        }

    def inventory(self) -> Inventory:
        """Every tensor of a weight-bearing or attention module is read. Deliberately left out:
        activation parameters no scheme asks for, and tensors of no module the format defines."""
        checkpoint = self.checkpoint
        consumed: set[str] = set()
        ignored: dict[str, str] = {}
        for info in checkpoint.modules():
            consumed.update(info.tensor_names)
        for module in {*(info.name for info in checkpoint.modules()), *checkpoint.attention_modules()}:
            params = checkpoint.activation_params(module)
            for local in params.unexpected:
                name = f"{module}.{params.legacy.get(local, local)}"
                consumed.discard(name)
                ignored[name] = "no scheme of this module quantizes it"
            consumed.update(f"{module}.{params.legacy.get(local, local)}" for local in params.found)
        consumed.difference_update(ignored)
        for name in set(checkpoint.tensor_names()) - consumed - set(ignored):
            ignored[name] = "belongs to no weight-bearing or attention module"
        return Inventory(consumed=frozenset(consumed), ignored=ignored)

    def effective_weight(self, module: str) -> torch.Tensor:
        return self.checkpoint.dequantize(module)

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        return oracle.layer_output(self.checkpoint, module, inputs, COMPUTE_DTYPE)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return oracle.reference_logits(self.checkpoint, input_ids, COMPUTE_DTYPE)

    def close(self) -> None:
        self.checkpoint.close()
