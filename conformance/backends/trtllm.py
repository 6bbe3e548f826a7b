"""The ``trtllm`` backend: TensorRT-LLM's PyTorch backend, driven through its public entry points.

Three paths (engines.md §1c, §4), each TensorRT-LLM's own code; nothing here answers for it:

* **parser probe** (config level): ``ModelConfig.load_hf_quant_config(quantization_config,
  "CUTLASS")`` and, for several config groups, ``update_quant_config_from_compressed_tensors``
  with the module names. Its ``QuantAlgo`` per module is the label; ``conformance/expected/
  trtllm.toml`` says which label is right. A ``ValueError``/``NotImplementedError`` is a
  refusal (label None); any other exception is the parser breaking (verdict ``error``).
* **module path** (weights, layer levels): ``Linear(in_features, out_features, dtype,
  quant_config=QuantConfig(quant_algo=...))``, ``load_weights([tensors])``,
  ``post_load_weights()``, forward on CUDA. The QuantAlgo is the parser's; where the parser
  refuses, the module-level mapping of engines.md §4 (:data:`MODULE_ALGOS`) drives the kernel
  that TensorRT-LLM has for the scheme (FP8 per-tensor, int4 AWQ-style, weight-only). The
  checkpoint's tensors are converted to TensorRT-LLM's names and layouts by :data:`CONVERTERS`.
* **whole model** (model level): ``LLM(model=dir)`` in one process, context logits of one
  prompt.

Without ``tensorrt_llm`` every case is not-supported with the reason; the conversions, the
expected tables and the architecture rows are plain data and functions, tested on the CPU.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ctref
from conformance.backends.base import Inventory, NotSupported, ResolvedModule
from conformance.levels import scheme_key
from ctref import packing, qmath
from ctref.config import QuantArgs

MOE_BACKEND = "CUTLASS"
REFUSALS = (ValueError, NotImplementedError)
"""What TensorRT-LLM's parser raises to refuse a scheme; anything else is a crash."""
SINGLE_PROCESS = {"TLLM_WORKER_USE_SINGLE_PROCESS": "1"}


def _tensorrt_llm() -> Any:
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as error:
        raise NotSupported(
            f"tensorrt_llm is not installed ({error}); TensorRT-LLM ships wheels on NVIDIA's own "
            "index only (engines.md §1f)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tensor conversion: compressed-tensors names and layouts -> TensorRT-LLM's (engines.md §1b)

Tensors = Mapping[str, torch.Tensor]


def fp8_per_tensor(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``FP8`` (FP8QDQLinearMethod): scalar scales; no ``input_scale`` means dynamic inputs."""
    out = {"weight": tensors["weight"], "weight_scale": tensors["weight_scale"].float().reshape(())}
    if "input_scale" in tensors:
        out["input_scale"] = tensors["input_scale"].float().reshape(())
    return out


def fp8_rowwise(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``FP8_PER_CHANNEL_PER_TOKEN``: the ``[N, 1]`` channel scale flattened to ``[N]``."""
    return {
        "weight": tensors["weight"],
        "weight_scale": tensors["weight_scale"].float().reshape(-1),
    }


def fp8_block(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``FP8_BLOCK_SCALES``: same names, ``[⌈N/128⌉, ⌈K/128⌉]`` float32 scales."""
    return {"weight": tensors["weight"], "weight_scale": tensors["weight_scale"].float()}


def invert_global_scale(scale: torch.Tensor) -> torch.Tensor:
    """``1 / g`` as TensorRT-LLM stores NVFP4 second-level scales (a zero stays zero)."""
    scale = scale.float()
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale).reshape(())


def nvfp4(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``NVFP4``: ``weight_packed`` -> ``weight`` (same bytes), ``weight_global_scale`` ->
    ``weight_scale_2 = 1/g``, ``input_global_scale`` -> ``input_scale = 1/g``; ``weight_scale``
    (fp8, unswizzled) kept (``normalize_compressed_tensors_nvfp4_names``)."""
    out = {
        "weight": tensors["weight_packed"],
        "weight_scale": tensors["weight_scale"],
        "weight_scale_2": invert_global_scale(tensors["weight_global_scale"]),
    }
    if "input_global_scale" in tensors:
        out["input_scale"] = invert_global_scale(tensors["input_global_scale"])
    return out


def int4_codes(tensors: Tensors, layout: str) -> torch.Tensor:
    """Signed int4 codes (N, K) of a ``pack-quantized`` weight (ctref's unpacking)."""
    rows, cols = (int(v) for v in tensors["weight_shape"].tolist())
    return packing.unpack(tensors["weight_packed"], 4, cols, layout).reshape(rows, cols)


def pack_int4_along_n(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (N, K) two per int8 byte along N: row 2i in the low nibble, row 2i+1
    in the high one -> (N/2, K). TensorRT-LLM's int4 weight layout before its preprocessing."""
    if codes.shape[0] % 2:
        raise NotSupported(f"TensorRT-LLM packs int4 rows in pairs; N={codes.shape[0]} is odd")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_along_n(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_along_n`: (N/2, K) int8 -> signed codes (N, K)."""
    raw = packed.view(torch.uint8).to(torch.int16)
    # A nibble's two's complement value: flip the sign bit, then take 8 away.
    low, high = ((raw & 0xF) ^ 8) - 8, ((raw >> 4) ^ 8) - 8
    return torch.stack([low, high], dim=1).flatten(0, 1).to(torch.int8)


def w4a16_awq(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``W4A16_AWQ`` (module level, engines.md §4): codes re-packed along N, group scales [N, K/g]
    as stored, ``pre_quant_scale`` of ones (the VANILLA mode requires one)."""
    codes = int4_codes(tensors, layout)
    scale = tensors["weight_scale"]
    return {
        "weight": pack_int4_along_n(codes),
        "weight_scale": scale,
        "pre_quant_scale": torch.ones(codes.shape[1], dtype=scale.dtype),
    }


def weight_only(tensors: Tensors, args: QuantArgs, layout: str) -> dict[str, torch.Tensor]:
    """``W8A16`` / ``W4A16`` per channel: int8 [N, K] or int4 packed along N [N/2, K], scale [N]."""
    scale = tensors["weight_scale"].reshape(-1)
    if args.num_bits == 4:
        return {"weight": pack_int4_along_n(int4_codes(tensors, layout)), "weight_scale": scale}
    weight = tensors.get("weight")
    if weight is None:
        rows, cols = (int(v) for v in tensors["weight_shape"].tolist())
        weight = packing.unpack(tensors["weight_packed"], 8, cols, layout).reshape(rows, cols)
    return {"weight": weight, "weight_scale": scale}


CONVERTERS: dict[str, Callable[[Tensors, QuantArgs, str], dict[str, torch.Tensor]]] = {
    "FP8": fp8_per_tensor,
    "FP8_PER_CHANNEL_PER_TOKEN": fp8_rowwise,
    "FP8_BLOCK_SCALES": fp8_block,
    "NVFP4": nvfp4,
    "W4A16_AWQ": w4a16_awq,
    "W4A16": weight_only,
    "W8A16": weight_only,
}
"""Per QuantAlgo, the conversion to the names and layouts its Linear method loads."""


@dataclass(frozen=True)
class ModuleAlgo:
    """A scheme TensorRT-LLM's Linear runs although its compressed-tensors parser refuses it."""

    scheme: str
    """Glob over the scheme key."""
    formats: tuple[str, ...]
    algo: str


MODULE_ALGOS = (
    ModuleAlgo("W float8 tensor sym | A float8 tensor sym *", ("float-quantized",), "FP8"),
    ModuleAlgo("W int4 group* sym | A none", ("pack-quantized",), "W4A16_AWQ"),
    ModuleAlgo("W int4 channel sym | A none", ("pack-quantized",), "W4A16"),
    ModuleAlgo(
        "W int8 channel sym | A none",
        ("pack-quantized", "int-quantized", "naive-quantized"),
        "W8A16",
    ),
)
"""engines.md §4's module-level mapping for schemes the parser rejects (tried in order)."""


def module_algo(key: str, fmt: str | None) -> str | None:
    """The module-level QuantAlgo of engines.md §4 for a scheme key and format, or None."""
    return next(
        (m.algo for m in MODULE_ALGOS if fnmatch.fnmatchcase(key, m.scheme) and fmt in m.formats),
        None,
    )


# ---------------------------------------------------------------------------------------------
# The parser probe


@dataclass(frozen=True)
class ParserAnswer:
    """What TensorRT-LLM's compressed-tensors parser made of a ``quantization_config``."""

    quant_algo: str | None = None
    group_size: int | None = None
    kv_cache_quant_algo: str | None = None
    exclude_modules: tuple[str, ...] = ()
    per_module: Mapping[str, str] | None = None
    """Multi-group checkpoints: QuantAlgo per module name (absent: unquantized)."""
    refusal: str | None = None
    crash: str | None = None
    quant_config: Any = None
    """The QuantConfig itself, for ``is_module_excluded_from_quantization``."""


def _name(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", getattr(value, "name", value)))


def probe_parser(
    quantization_config: Mapping[str, Any], module_names: Sequence[str]
) -> ParserAnswer:
    """Run TensorRT-LLM's parser on a checkpoint's ``quantization_config``."""
    from tensorrt_llm._torch.model_config import ModelConfig

    config = dict(quantization_config)
    try:
        quant_config, _ = ModelConfig.load_hf_quant_config(config, MOE_BACKEND)
        per_module = None
        if len(config.get("config_groups") or {}) > 1:
            per_module = _per_module_algos(config, module_names)
    except REFUSALS as refusal:
        return ParserAnswer(refusal=f"{type(refusal).__name__}: {_one_line(refusal)}")
    except Exception as crash:  # noqa: BLE001 - the parser breaking is the finding
        return ParserAnswer(crash=f"{type(crash).__name__}: {_one_line(crash)}")
    return ParserAnswer(
        quant_algo=_name(quant_config.quant_algo),
        group_size=quant_config.group_size,
        kv_cache_quant_algo=_name(quant_config.kv_cache_quant_algo),
        exclude_modules=tuple(quant_config.exclude_modules or ()),
        per_module=per_module,
        quant_config=quant_config,
    )


def _per_module_algos(
    config: Mapping[str, Any], module_names: Sequence[str]
) -> dict[str, str] | None:
    """The multi-group map of ``update_quant_config_from_compressed_tensors`` (main only)."""
    try:
        from tensorrt_llm.models.quant_config_utils import (
            update_quant_config_from_compressed_tensors,
        )
    except ImportError:
        return None  # before 2026-05: one group read, the others dropped (engines.md §1a)
    from tensorrt_llm.models.modeling_utils import QuantConfig

    layer_configs = update_quant_config_from_compressed_tensors(QuantConfig(), config, module_names)
    return {name: _name(layer.quant_algo) for name, layer in (layer_configs or {}).items()}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400]


# ---------------------------------------------------------------------------------------------
# The backend


class TensorRTLLMBackend:
    name = "trtllm"
    scheme_table = "trtllm"

    def engine_version(self) -> str:
        return _tensorrt_llm().__version__

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> TensorRTLLMCheckpoint:
        _tensorrt_llm()
        layout = ctref.open_checkpoint(checkpoint, module_classes=module_classes)
        config = layout.model_config.get("quantization_config") or {}
        answer = probe_parser(config, [info.name for info in layout.modules()])
        return TensorRTLLMCheckpoint(checkpoint, layout, answer, device)


class TensorRTLLMCheckpoint:
    def __init__(
        self, directory: Path, layout: ctref.Checkpoint, answer: ParserAnswer, device: str
    ) -> None:
        self.directory = directory
        self.layout = layout
        """ctref's reading, for module names, classes and tensors (converted for the Linear)."""
        self.answer = answer
        self.device = device
        self._linears: dict[str, Any] = {}

    # ------------------------------------------------------------------ config

    def label(self, module: str) -> str | None:
        """The QuantAlgo TensorRT-LLM gives a module, as its parser and exclusion rules say."""
        answer = self.answer
        if answer.crash is not None:
            raise RuntimeError(f"TensorRT-LLM's compressed-tensors parser crashed: {answer.crash}")
        if answer.refusal is not None:
            return None
        if answer.per_module is not None:
            return answer.per_module.get(module)
        if "Linear" not in self.layout.class_names(module):
            return None
        if answer.quant_config.is_module_excluded_from_quantization(module):
            return None
        return answer.quant_algo

    def modules(self) -> Mapping[str, ResolvedModule]:
        return {
            info.name: ResolvedModule(scheme=None, label=self.label(info.name))
            for info in self.layout.modules()
        }

    def inventory(self) -> Inventory:
        raise NotSupported(
            "TensorRT-LLM's loader reports no per-tensor consumption (its mappers fuse, rename "
            "and drop tensors silently)"
        )

    # ------------------------------------------------------------------ module path

    def _algo(self, module: str) -> str:
        """The parser's QuantAlgo, else engines.md §4's module-level one; NotSupported if none."""
        info = self.layout.module_info(module)
        if self.layout.config.transform_config is not None:
            raise NotSupported("TensorRT-LLM does not read transform_config (no online transforms)")
        if info.sparsity_format is not None:
            raise NotSupported(f"TensorRT-LLM ignores sparsity_config ({info.sparsity_format})")
        label = self.label(module)
        if label is None and info.scheme is not None:
            label = module_algo(scheme_key(info.scheme), info.format)
            if label is None:
                why = self.answer.refusal or "no QuantAlgo for this scheme"
                raise NotSupported(
                    f"TensorRT-LLM has no Linear method for '{scheme_key(info.scheme)}' ({why}; "
                    "engines.md §4: asymmetric, act-order, 2:4, W4A8 per-token and INT8 W8A8 are unsupported)"
                )
        if label is not None and label not in CONVERTERS:
            raise NotSupported(f"TensorRT-LLM's {label} has no Linear method (engines.md §1b)")
        return label or "NO_QUANT"

    def _linear(self, module: str) -> Any:
        """TensorRT-LLM's ``Linear`` for one checkpoint module, weights loaded, on CUDA."""
        if module in self._linears:
            return self._linears[module]
        if not self.device.startswith("cuda"):
            raise NotSupported("TensorRT-LLM's Linear kernels run on CUDA only")
        from tensorrt_llm._torch.modules.linear import Linear
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization.mode import QuantAlgo

        algo = self._algo(module)
        info = self.layout.module_info(module)
        tensors = self.layout.module_tensors(module)
        bias = tensors.get("bias")
        if algo == "NO_QUANT":
            quant_config, loaded = None, {"weight": tensors["weight"]}
        else:
            args = info.scheme.weights
            group = args.group_size if args.strategy in ("group", "tensor_group") else None
            if algo == "FP8_BLOCK_SCALES":
                group = args.block_structure[1]
            quant_config = QuantConfig(
                quant_algo=QuantAlgo[algo], group_size=group, has_zero_point=False
            )
            loaded = CONVERTERS[algo](tensors, args, self.layout.config.packing_layout)
        if bias is not None:
            loaded["bias"] = bias
        rows, cols = info.weight_shape
        linear = Linear(
            in_features=cols,
            out_features=rows,
            bias=bias is not None,
            dtype=compute_dtype(tensors),
            quant_config=quant_config,
        )
        linear.load_weights([loaded])
        if hasattr(linear, "post_load_weights"):
            linear.post_load_weights()
        self._linears[module] = linear.to(self.device).eval()
        return self._linears[module]

    def effective_weight(self, module: str) -> torch.Tensor:
        """The FP8 Linears keep ``weight`` and ``weight_scale`` as loaded on sm89/sm90; other
        methods interleave, swizzle or pad their parameters after loading."""
        linear = self._linear(module)
        algo = self._algo(module)
        if algo == "NO_QUANT":
            return linear.weight.detach()
        if (
            algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES")
            or _sm(self.device) >= 100
        ):
            raise NotSupported(
                f"{algo}'s post-load parameters are transformed (interleaved, swizzled, rescaled "
                "or padded): its weight is compared through the layer outputs"
            )
        args = self.layout.module_info(module).scheme.weights
        codes = linear.weight.detach().float()
        scale = linear.weight_scale.detach().float()
        shape = qmath.param_shape(args, tuple(codes.shape))
        return qmath.dequantize(codes, scale.reshape(shape), args=args)

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        layer = self._linear(module)
        dtype = compute_dtype(self.layout.module_tensors(module))
        with torch.inference_mode():
            return layer.forward(inputs.to(self.device, dtype))

    # ------------------------------------------------------------------ whole model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``LLM(model=dir)`` in this process; the context logits of the prompt."""
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        if not self.device.startswith("cuda"):
            raise NotSupported("TensorRT-LLM runs whole models on CUDA only")
        os.environ.update(SINGLE_PROCESS)
        llm = LLM(
            model=str(self.directory),
            backend="pytorch",
            skip_tokenizer_init=True,
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.1),
            cuda_graph_config=None,
            max_batch_size=1,
            max_seq_len=int(input_ids.shape[-1]) + 1,
        )
        try:
            params = SamplingParams(max_tokens=1, return_context_logits=True)
            output = llm.generate([input_ids[0].tolist()], params)[0]
            return output.context_logits.unsqueeze(0)
        finally:
            llm.shutdown()

    def close(self) -> None:
        self._linears.clear()
        self.layout.close()


def _sm(device: str) -> int:
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return 10 * major + minor


def compute_dtype(tensors: Tensors) -> torch.dtype:
    """The Linear's activation dtype: the module's half-precision scale (or weight) dtype, the
    model dtype the checkpoint was written from; bf16 where the scales are fp8/fp32 (NVFP4)."""
    for name in ("weight_scale", "weight"):
        tensor = tensors.get(name)
        if tensor is not None and tensor.dtype in (torch.bfloat16, torch.float16):
            return tensor.dtype
    return torch.bfloat16
