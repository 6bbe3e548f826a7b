"""The ``transformers`` backend: Hugging Face transformers loading a model-level fixture.

``AutoModelForCausalLM.from_pretrained(dir)`` with its defaults, as a user calls it: the
checkpoint's dtype, compressed-tensors' quantizer in compressed mode (decompressed on the first
forward pass, then activations fake-quantized by the library's forward). The adapter reads back
what the loaded model holds: each module's ``quantization_scheme`` (config), the loading report
(inventory: unexpected keys were not consumed, missing and mismatched ones left parameters at
their initial values), each module's weight after decompression (weights), each module's own
forward (layer) and the logits (model).

MoE experts stored per expert (``experts.<e>.gate_proj``) live in transformers 5 as fused
parameters (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]), dequantized at
load and run without quantization: the adapter reads their weights from those slices, reports
them unquantized, and has no per-expert kernel to offer the layer level.

transformers loads whole models only: a layer fixture (no ``architectures`` in ``config.json``)
is not-supported. The engine is imported inside :meth:`TransformersBackend.load`.
"""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import ctref
from conformance.backends.base import Inventory, NotSupported, ResolvedModule


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise NotSupported(f"transformers is not installed ({error})") from None


class TransformersBackend:
    name = "transformers"
    scheme_table = None

    def engine_version(self) -> str:
        return _transformers().__version__

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> TransformersCheckpoint:
        transformers = _transformers()
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        if not config.get("architectures"):
            raise NotSupported("transformers loads whole models; this checkpoint holds modules only")
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model, info = transformers.AutoModelForCausalLM.from_pretrained(
                    checkpoint, output_loading_info=True
                )
            except (ValueError, NotImplementedError) as refusal:
                raise NotSupported(f"from_pretrained refuses: {_one_line(refusal)}") from None
        model.to(device).eval()
        return TransformersCheckpoint(model, info, ctref.open_checkpoint(checkpoint, module_classes=module_classes))


_EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
"""A per-expert checkpoint module, which transformers 5 keeps in fused expert parameters."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400]


class TransformersCheckpoint:
    def __init__(self, model: Any, info: Mapping[str, Any], layout: ctref.Checkpoint) -> None:
        self.model = model
        self.info = info
        self.layout = layout
        """ctref's reading, used only for the checkpoint's module and tensor names."""
        self._decompressed = False

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise NotSupported(
                f"the loaded model has no module {name} (transformers builds another layout)"
            ) from None

    def _decompress(self) -> None:
        """compressed-tensors decompresses on the first forward pass; run one."""
        if not self._decompressed:
            with torch.no_grad():
                self.model(torch.zeros(1, 1, dtype=torch.long, device=self.model.device))
            self._decompressed = True

    def _fused_expert(self, name: str) -> torch.Tensor | None:
        """The slice of a fused expert parameter holding a per-expert module's weight, or None."""
        match = _EXPERT.match(name)
        if match is None:
            return None
        try:
            experts = self.model.get_submodule(match["experts"])
        except AttributeError:
            return None
        index, proj = int(match["index"]), match["proj"]
        if proj == "down_proj":
            fused = getattr(experts, "down_proj", None)
            return None if not isinstance(fused, torch.Tensor) else fused[index]
        fused = getattr(experts, "gate_up_proj", None)
        if not isinstance(fused, torch.Tensor):
            return None
        half = fused.shape[1] // 2
        return fused[index, :half] if proj == "gate_proj" else fused[index, half:]

    def modules(self) -> Mapping[str, ResolvedModule]:
        resolved = {}
        for info in self.layout.modules():
            try:
                module = self.model.get_submodule(info.name)
            except AttributeError:
                if self._fused_expert(info.name) is not None:
                    resolved[info.name] = ResolvedModule(scheme=None)
                continue
            scheme = getattr(module, "quantization_scheme", None)
            resolved[info.name] = ResolvedModule(
                scheme=None if scheme is None else scheme.model_dump(mode="json"),
                format=None if scheme is None or scheme.format is None else str(getattr(scheme.format, "value", scheme.format)),
            )
        return resolved

    def inventory(self) -> Inventory:
        names = set(self.layout.tensor_names())
        unconsumed = set(self.info.get("unexpected_keys", ())) | {
            key for key, *_ in self.info.get("mismatched_keys", ())
        }
        uninitialized = set(self.info.get("missing_keys", ())) | {
            key for key, *_ in self.info.get("mismatched_keys", ())
        }
        return Inventory(consumed=frozenset(names - unconsumed), uninitialized=frozenset(uninitialized))

    def effective_weight(self, module: str) -> torch.Tensor:
        self._decompress()
        fused = self._fused_expert(module)
        if fused is not None:
            return fused.detach()
        weight = getattr(self._module(module), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise NotSupported(f"{module} holds no `weight` after loading (another layout)")
        return weight.detach()

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        self._decompress()
        if self._fused_expert(module) is not None:
            raise NotSupported(f"{module} lives in fused expert parameters: no per-expert kernel")
        layer = self._module(module)
        if not isinstance(layer, torch.nn.Linear):
            raise NotSupported(f"{module} is a {type(layer).__name__}, not a Linear")
        with torch.no_grad():
            batch = inputs.to(self.model.device, self.model.dtype).unsqueeze(0)
            return layer(batch).squeeze(0)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._decompress()
        with torch.no_grad():
            return self.model(input_ids.to(self.model.device)).logits

    def close(self) -> None:
        self.layout.close()
