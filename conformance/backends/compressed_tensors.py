"""The ``compressed-tensors`` backend: the peer library's own decompression, model-free.

Two of the library's paths are exercised, as a user would call them without an inference engine:

* **per checkpoint** (weights and inventory levels): ``CompressedTensorsDequantizer.process`` over
  every tensor of the checkpoint, the library's model-free converter (it re-infers formats and
  matches targets on names);
* **per module** (config and layer levels): the scheme the library's matching picks for each
  module (``match_targets`` priority over ``config_groups``, ``ignore``), the format
  ``decompress_module`` would use, ``Compressor.decompress`` of that module's tensors, then an
  ``nn.Linear`` initialized for the scheme (``initialize_module_for_quantization``) so its forward
  fake-quantizes activations as the library does, in float32.

The library's explicit refusals are ``not-supported``: a config it will not parse, a
``ValueError`` from a decompressor (ragged groups, pre-0.9.4 int8 zero points), a format it has no
compressor for (sparse, marlin-24), online transforms the adapter does not run. Anything else it
raises is an ``error``; a weight it leaves compressed, or decodes wrongly, is a ``fail``.

A checkpoint alone does not say which class a module has; the harness passes the fixture's
module classes, as a model would have them. The library is imported inside
:meth:`CompressedTensorsBackend.load`: without it, every case is not-supported.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import ctref
from conformance.backends.base import Inventory, NotSupported, ResolvedModule

DISTRIBUTION = "compressed-tensors"
COMPUTE_DTYPE = torch.float32
_TORCH_CLASSES = {"Module": torch.nn.Module, "Linear": torch.nn.Linear, "Embedding": torch.nn.Embedding}


def _library() -> Any:
    try:
        return importlib.import_module("compressed_tensors")
    except ImportError as error:
        raise NotSupported(f"compressed-tensors is not installed ({error})") from None


class CompressedTensorsBackend:
    name = "compressed-tensors"
    scheme_table = None

    def engine_version(self) -> str:
        _library()
        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:
            return "unknown"

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> CompressedTensorsCheckpoint:
        _library()
        from compressed_tensors.quantization import QuantizationConfig

        config_json = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        section = config_json.get("quantization_config") or config_json.get("compression_config")
        try:
            config = QuantizationConfig.model_validate(section)
        except ValueError as refusal:  # pydantic.ValidationError is a ValueError
            raise NotSupported(
                f"compressed-tensors {self.engine_version()} refuses this quantization_config: "
                f"{_first_line(str(refusal))}"
            ) from None
        return CompressedTensorsCheckpoint(checkpoint, config, device, module_classes)


def _first_line(text: str) -> str:
    return " ".join(text.split())[:400]


class CompressedTensorsCheckpoint:
    def __init__(
        self, directory: Path, config: Any, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> None:
        self.directory = directory
        self.config = config
        self.device = device
        self.layout = ctref.open_checkpoint(directory, module_classes=module_classes)
        """ctref's reading, used only for the layout: module names, tensors, classes."""
        self._dequantized: dict[str, torch.Tensor] | None = None
        self._consumed: set[str] = set()

    # ------------------------------------------------------------------ reading

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (safe_open is no dict)
        return tensors

    def _stand_in(self, module: str) -> torch.nn.Module:
        """An instance whose class chain carries the module's class names (torch's own classes
        for ``Linear``, ``Embedding``, ``Module``), for the library's class-name matching."""
        cls: type[torch.nn.Module] = torch.nn.Module
        for name in reversed(self.layout.class_names(module)):
            known = _TORCH_CLASSES.get(name)
            cls = known if known is not None and issubclass(known, cls) else type(name, (cls,), {})
        instance = cls.__new__(cls)
        torch.nn.Module.__init__(instance)
        return instance

    def _scheme(self, module: str) -> Any | None:
        """The library's choice for one module: ``match_targets`` priority, ``ignore`` applied."""
        from compressed_tensors.utils.match import is_match, match_targets

        target_to_scheme: OrderedDict[str, Any] = OrderedDict()
        for scheme in self.config.config_groups.values():
            for target in scheme.targets:
                target_to_scheme[target] = scheme
        stand_in = self._stand_in(module)
        if not is_match(module, stand_in, list(target_to_scheme), self.config.ignore):
            return None
        return target_to_scheme[match_targets(module, stand_in, list(target_to_scheme))[0]]

    def _format(self, scheme: Any) -> str:
        """What ``decompress_module`` uses: the scheme's format, else the inferred one."""
        from compressed_tensors.compressors.format import infer_module_format

        fmt = scheme.format or infer_module_format(torch.nn.Linear, scheme)
        return getattr(fmt, "value", fmt)

    # ------------------------------------------------------------------ levels

    def modules(self) -> Mapping[str, ResolvedModule]:
        resolved = {}
        for info in self.layout.modules():
            scheme = self._scheme(info.name)
            resolved[info.name] = ResolvedModule(
                scheme=None if scheme is None else scheme.model_dump(mode="json"),
                format=None if scheme is None else self._format(scheme),
            )
        return resolved

    def _checkpoint_dequantized(self) -> dict[str, torch.Tensor]:
        """The whole checkpoint through ``CompressedTensorsDequantizer.process`` (float32 out)."""
        if self._dequantized is None:
            from compressed_tensors.entrypoints.convert import (
                CompressedTensorsDequantizer,
            )

            remaining = self._tensors()
            names = set(remaining)
            converter = CompressedTensorsDequantizer(self.directory, dtype=torch.float32)
            try:
                output = converter.process(remaining)  # pops what it decompresses
            except KeyError as missing:
                raise RuntimeError(
                    f"CompressedTensorsDequantizer: missing compression parameter {missing}"
                ) from None
            except ValueError as refusal:
                raise NotSupported(f"CompressedTensorsDequantizer refuses: {refusal}") from None
            popped = names - set(remaining)
            copied = {name for name in remaining if name in output}
            self._consumed = popped | copied
            self._dequantized = output
        return self._dequantized

    def inventory(self) -> Inventory:
        from compressed_tensors.quantization.quant_metadata import KVCacheScaleType

        self._checkpoint_dequantized()
        kv_scales = {kind.value for kind in KVCacheScaleType}
        ignored = {
            name: "the dequantizer writes a dense checkpoint without KV-cache quantization"
            for name in self.layout.tensor_names()
            if name.rpartition(".")[2] in kv_scales
        }
        return Inventory(consumed=frozenset(self._consumed - set(ignored)), ignored=ignored)

    def effective_weight(self, module: str) -> torch.Tensor:
        """The converter's dense weight; a module it left compressed yields what it left (the
        stored root tensor), which the weights level reports."""
        refusal = self._refusal(module)
        if refusal is not None:
            raise NotSupported(refusal)
        output = self._checkpoint_dequantized()
        if f"{module}.weight" in output:
            return output[f"{module}.weight"]
        return output[f"{module}.weight_packed"]

    def _refusal(self, module: str) -> str | None:
        """Why the library cannot decode a module at all, or None."""
        from compressed_tensors.compressors import BaseCompressor

        info = self.layout.module_info(module)
        if info.sparsity_format is not None or info.format == "marlin-24":
            return (
                f"compressed-tensors {version(DISTRIBUTION)} has no {info.sparsity_format or info.format} "
                "decompressor"
            )
        scheme = self._scheme(module)
        if scheme is not None and self._format(scheme) not in BaseCompressor.registered_names():
            return f"compressed-tensors has no '{self._format(scheme)}' compressor"
        return None

    def _module_weight(self, module: str, scheme: Any) -> torch.Tensor:
        """``Compressor.decompress`` of one module's tensors (the per-module path)."""
        from compressed_tensors.compressors import BaseCompressor

        tensors = self.layout.module_tensors(module)
        if scheme is None:
            return tensors["weight"]
        compressor = BaseCompressor.get_value_from_registry(self._format(scheme))
        names = compressor.compression_param_names(scheme)
        try:
            return compressor.decompress({n: tensors[n] for n in names if n in tensors}, scheme)["weight"]
        except ValueError as refusal:
            raise NotSupported(f"{compressor.__name__} refuses: {refusal}") from None

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.initialize import (
            initialize_module_for_quantization,
        )

        refusal = self._refusal(module)
        if refusal is not None:
            raise NotSupported(refusal)
        if self.layout.config.transform_config is not None:
            raise NotSupported("the adapter does not run transform_config's online transforms")
        scheme = self._scheme(module)
        weight = self._module_weight(module, scheme)
        tensors = self.layout.module_tensors(module)
        bias = tensors.get("bias")
        layer = torch.nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, dtype=COMPUTE_DTYPE
        )
        if scheme is not None:
            initialize_module_for_quantization(layer, scheme, force_zero_point=False)
            for name, parameter in layer.named_parameters():
                if name.startswith(("input_", "output_")) and name in tensors:
                    parameter.data = tensors[name].to(parameter.dtype).reshape(parameter.shape)
            layer.quantization_status = QuantizationStatus.DECOMPRESSED
        with torch.no_grad():
            layer.weight.copy_(weight.to(COMPUTE_DTYPE))
            if bias is not None:
                layer.bias.copy_(bias.to(COMPUTE_DTYPE))
            # (batch, tokens, features), as a model calls it: the library's per-token
            # quantization takes a 2-D input's first dimension for a batch.
            batch = inputs.to(self.device, COMPUTE_DTYPE).unsqueeze(0)
            return layer.to(self.device)(batch).squeeze(0)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotSupported(
            "compressed-tensors decompresses checkpoints; running a model is the transformers "
            "backend's job"
        )

    def close(self) -> None:
        self.layout.close()
