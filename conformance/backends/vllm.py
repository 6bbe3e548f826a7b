"""The ``vllm`` backend: vLLM's compressed-tensors integration, one layer at a time.

vLLM's own code decides everything (engines.md §2, §4):

* **scheme selection** (config level): ``CompressedTensorsConfig.from_config(quantization_config)``
  then ``get_scheme(layer, layer_name)`` for every module, with a stand-in layer whose class
  name is the module's (vLLM matches class-name targets by name). The scheme's class name is
  the label; ``conformance/expected/vllm.toml`` says which is right. ``NotImplementedError``
  ("no compatible scheme") and the capability check's ``RuntimeError`` are refusals (label
  None); a config ``from_config`` rejects makes the whole checkpoint not-supported; any other
  exception is vLLM breaking (verdict ``error``).
* **layer forward** (layer level): a ``ReplicatedLinear`` built with that config, each stored
  tensor given to its parameter's ``weight_loader``, ``process_weights_after_loading``, then
  forward on CUDA, in a single-rank distributed environment.

vLLM repacks weights for its kernels (Marlin, Machete, CUTLASS), so the weights level reads them
through the layer outputs; it exposes log-probabilities rather than logits, so the model level
is not-supported. Without ``vllm`` every case is not-supported with the reason.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import ctref
from conformance.backends.base import Inventory, NotSupported, ResolvedModule
from conformance.backends.trtllm import compute_dtype

CAPABILITY_REFUSAL = "not supported for the current GPU"
"""What ``_check_scheme_supported``'s RuntimeError says when the GPU is too old for a scheme."""
CONFIG_REFUSALS = (ValueError, NotImplementedError)


def _vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise NotSupported(
            f"vllm is not installed ({error}); its x86_64 wheel (321 MiB) pins its own torch "
            "(engines.md §0)"
        ) from None


def stand_in(classes: Sequence[str]) -> torch.nn.Module:
    """A module whose class is named as the checkpoint module's class (``Linear`` if unknown):
    all vLLM's target matching reads of a layer is ``type(layer).__name__``."""
    name = classes[0] if classes else "Linear"
    return type(name, (torch.nn.Module,), {})()


def scheme_label(config: Any, module: str, classes: Sequence[str]) -> tuple[str | None, str]:
    """``(class name of vLLM's scheme or None, why None)`` for one module."""
    try:
        scheme = config.get_scheme(layer=stand_in(classes), layer_name=module)
    except NotImplementedError as refusal:
        return None, f"NotImplementedError: {_one_line(refusal)}"
    except RuntimeError as refusal:
        if CAPABILITY_REFUSAL not in str(refusal):
            raise
        return None, f"RuntimeError: {_one_line(refusal)}"
    if scheme is None:
        return None, "vLLM leaves the module unquantized"
    return type(scheme).__name__, ""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400]


class VLLMBackend:
    name = "vllm"
    scheme_table = "vllm"

    def engine_version(self) -> str:
        return _vllm().__version__

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> VLLMCheckpoint:
        _vllm()
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        layout = ctref.open_checkpoint(checkpoint, module_classes=module_classes)
        section = layout.model_config.get("quantization_config") or {}
        try:
            config = CompressedTensorsConfig.from_config(dict(section))
        except CONFIG_REFUSALS as refusal:
            layout.close()
            raise NotSupported(
                f"vLLM refuses this quantization_config: {_one_line(refusal)}"
            ) from None
        return VLLMCheckpoint(layout, config, device)


_DISTRIBUTED_READY = False


def _single_rank_environment() -> None:
    """vLLM's layers read the tensor-parallel group: a world of one, once per process."""
    global _DISTRIBUTED_READY
    if _DISTRIBUTED_READY:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    rendezvous = Path(tempfile.mkdtemp(prefix="ctref-vllm-")) / "init"
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{rendezvous}"
    )
    initialize_model_parallel(1, 1)
    _DISTRIBUTED_READY = True


class VLLMCheckpoint:
    def __init__(self, layout: ctref.Checkpoint, config: Any, device: str) -> None:
        self.layout = layout
        """ctref's reading, for module names, classes and stored tensors."""
        self.config = config
        self.device = device
        self._layers: dict[str, Any] = {}

    def modules(self) -> Mapping[str, ResolvedModule]:
        resolved = {}
        for info in self.layout.modules():
            label, _ = scheme_label(self.config, info.name, self.layout.class_names(info.name))
            resolved[info.name] = ResolvedModule(scheme=None, label=label)
        return resolved

    def inventory(self) -> Inventory:
        raise NotSupported(
            "vLLM's loader reports no per-tensor consumption (weights are fused into "
            "qkv/gate_up parameters and repacked)"
        )

    def effective_weight(self, module: str) -> torch.Tensor:
        raise NotSupported(
            "vLLM repacks weights for its kernels (Marlin, Machete, CUTLASS): its weight is "
            "compared through the layer outputs"
        )

    def _layer(self, module: str) -> Any:
        """vLLM's ``ReplicatedLinear`` for one checkpoint module, loaded and processed."""
        if module in self._layers:
            return self._layers[module]
        if not self.device.startswith("cuda"):
            raise NotSupported("vLLM's compressed-tensors kernels run on CUDA")
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.linear import ReplicatedLinear
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        label, why = scheme_label(self.config, module, self.layout.class_names(module))
        info = self.layout.module_info(module)
        if label is None and info.scheme is not None:
            raise NotSupported(f"vLLM has no scheme for {module}: {why}")
        _single_rank_environment()
        tensors = self.layout.module_tensors(module)
        rows, cols = info.weight_shape
        torch.set_default_device(self.device)
        try:
            with set_current_vllm_config(VllmConfig()):
                layer = ReplicatedLinear(
                    cols,
                    rows,
                    bias="bias" in tensors,
                    params_dtype=compute_dtype(tensors),
                    quant_config=self.config,
                    prefix=module,
                )
                for local, tensor in tensors.items():
                    parameter = getattr(layer, local, None)
                    if parameter is None:
                        raise NotSupported(
                            f"vLLM's {label} layer has no parameter for {module}.{local}"
                        )
                    loader = getattr(parameter, "weight_loader", default_weight_loader)
                    loader(parameter, tensor.to(self.device))
                layer.quant_method.process_weights_after_loading(layer)
        finally:
            torch.set_default_device(None)
        self._layers[module] = layer
        return layer

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        layer = self._layer(module)
        dtype = compute_dtype(self.layout.module_tensors(module))
        with torch.inference_mode():
            output, _ = layer(inputs.to(self.device, dtype))
        return output

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotSupported(
            "vLLM's LLM API returns log-probabilities (prompt_logprobs), not logits; the model "
            "level compares logits"
        )

    def close(self) -> None:
        self._layers.clear()
        self.layout.close()
