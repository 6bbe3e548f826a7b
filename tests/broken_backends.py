"""Backends for the proofs that the conformance suite discriminates, and the cases they run on.

* **Broken backends** are the reference backend with one real-world bug planted (each cites its
  row of the bug catalog in anchors-and-bugs.md Part 2): the suite must fail them, naming what is
  wrong.
* **Legitimate variants** compute the same thing another valid way (another accumulation order,
  bf16 math, a split-K GPU-like reduction): the suite must pass them.
* **Bug cases** are tiny checkpoints, each written with ctref's encoders to expose one bug.

Every broken backend decodes the checkpoint itself with ctref's formats after mutating what it
read, exactly where the real engines went wrong (reading the storage, resolving the config).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ckpt_helpers import encode, quant_config, write_checkpoint

import ctref
from conformance.backends.base import Inventory, ResolvedModule
from conformance.backends.reference import ReferenceBackend, ReferenceCheckpoint
from conformance.levels import expected_label
from ctref import matching, packing, qmath
from ctref.config import QuantArgs, QuantScheme
from ctref.formats import get_format
from ctref.forward import linear, quantize_activation

BF16 = torch.bfloat16

# ---------------------------------------------------------------------------------------------
# Bug cases: name -> writer(directory)

INT4_ASYM_GROUP = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}
INT4_ACTORDER = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "actorder": "group"}
FP8_BLOCK = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [16, 16]}
FP8_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor"}
FP8_TENSOR_INPUT = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel"}
INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
NVFP4 = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": 16,
    "scale_dtype": "torch.float8_e4m3fn",
    "zp_dtype": "torch.float8_e4m3fn",
}
ATTN = "model.layers.0.self_attn"
MLP = "model.layers.0.mlp"


def _weight(rows: int, cols: int, seed: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * 0.05).to(dtype)


def _group(fmt: str, weights: dict[str, Any], targets: list[str], inputs: dict[str, Any] | None = None):
    group: dict[str, Any] = {"targets": targets, "weights": weights, "format": fmt}
    if inputs is not None:
        group["input_activations"] = inputs
    return group


def write_int4_asym(directory: Path) -> None:
    """W4A16 asym group 16: zero points packed along N (B1, A4); N = 24 is not a multiple of 8."""
    name = f"{MLP}.down_proj"
    tensors = encode(name, _weight(24, 64, 1), "pack-quantized", INT4_ASYM_GROUP)
    config = quant_config({"group_0": _group("pack-quantized", INT4_ASYM_GROUP, ["Linear"])})
    write_checkpoint(directory, tensors, config)


def write_int4_actorder(directory: Path) -> None:
    """Legacy act-order: ``weight_g_idx`` a random permutation of the groups (C1-C3), 0.18."""
    name = f"{MLP}.gate_proj"
    weight = _weight(16, 64, 2)
    g_idx = torch.arange(64, dtype=torch.int32) // 16
    g_idx = g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    args = QuantArgs.from_dict(INT4_ACTORDER, key="weights")
    stored = get_format("pack-quantized").encode(weight, args, qparams=qmath.qparams_for(weight, args, g_idx))
    tensors = {f"{name}.{local}": t for local, t in stored.items()}
    config = quant_config({"group_0": _group("pack-quantized", INT4_ACTORDER, ["Linear"])}, version="0.18.0")
    write_checkpoint(directory, tensors, config)


def write_fp8_block_ragged(directory: Path) -> None:
    """FP8 block 16x16 with N = 40, K = 56: ragged last block row and column (D6, E3)."""
    name = f"{ATTN}.o_proj"
    tensors = encode(name, _weight(40, 56, 4), "float-quantized", FP8_BLOCK)
    config = quant_config({"group_0": _group("float-quantized", FP8_BLOCK, ["Linear"])})
    write_checkpoint(directory, tensors, config)


def write_nvfp4(directory: Path) -> None:
    """NVFP4A16 with a global scale far from 1 (F1) and distinct per-block scales (A5)."""
    name = f"{MLP}.up_proj"
    tensors = encode(name, _weight(16, 64, 5) * 0.01, "nvfp4-pack-quantized", NVFP4)
    config = quant_config({"group_0": _group("nvfp4-pack-quantized", NVFP4, ["Linear"])})
    write_checkpoint(directory, tensors, config)


def write_w8a8_int8(directory: Path) -> None:
    """INT8 W8A8: int8 channel weights, int8 per-token dynamic inputs (O1; trt column 7)."""
    name = f"{MLP}.down_proj"
    tensors = encode(name, _weight(16, 64, 6), "int-quantized", INT8_CHANNEL)
    config = quant_config({"group_0": _group("int-quantized", INT8_CHANNEL, ["Linear"], INT8_TOKEN)})
    write_checkpoint(directory, tensors, config)


def write_regex_ignore(directory: Path) -> None:
    """W4A16 for every Linear except the ones an ``re:`` ignore entry names (J2)."""
    args = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16}
    tensors = encode(f"{MLP}.up_proj", _weight(16, 32, 7), "pack-quantized", args)
    tensors[f"{MLP}.gate_proj.weight"] = _weight(16, 32, 8)
    config = quant_config(
        {"group_0": _group("pack-quantized", args, ["Linear"])}, ignore=["re:.*gate_proj$"]
    )
    write_checkpoint(directory, tensors, config)


def write_fused_qkv(directory: Path) -> None:
    """Static FP8 per-tensor q/k/v whose magnitudes differ 1 : 4 : 1/8 (G1, G2)."""
    tensors: dict[str, torch.Tensor] = {}
    for index, (proj, magnitude) in enumerate((("q_proj", 1.0), ("k_proj", 4.0), ("v_proj", 0.125))):
        name = f"{ATTN}.{proj}"
        tensors |= encode(name, _weight(16, 32, 10 + index) * magnitude, "float-quantized", FP8_TENSOR)
        tensors[f"{name}.input_scale"] = torch.tensor([0.01 * (index + 1)], dtype=BF16)
    group = _group("float-quantized", FP8_TENSOR, ["Linear"], FP8_TENSOR_INPUT)
    write_checkpoint(directory, tensors, quant_config({"group_0": group}))


BUG_CASES: dict[str, Callable[[Path], None]] = {
    "int4_asym_group16": write_int4_asym,
    "int4_actorder_group16": write_int4_actorder,
    "fp8_block16_ragged": write_fp8_block_ragged,
    "nvfp4a16": write_nvfp4,
    "w8a8_int8": write_w8a8_int8,
    "w4a16_regex_ignore": write_regex_ignore,
    "fp8_fused_qkv": write_fused_qkv,
}


def write_bug_cases(root: Path) -> Path:
    """Every bug case under ``root/<name>``; returns ``root`` (a ``--cases`` folder)."""
    for name, write in BUG_CASES.items():
        write(root / name)
    return root


# ---------------------------------------------------------------------------------------------
# Broken backends


class MutatingCheckpoint(ReferenceCheckpoint):
    """The reference, except that each module's stored tensors pass through ``mutate`` (what a
    buggy engine reads) before ctref's format decodes them."""

    def __init__(self, checkpoint: ctref.Checkpoint, backend: BrokenBackend) -> None:
        super().__init__(checkpoint)
        self.backend = backend

    def effective_weight(self, module: str) -> torch.Tensor:
        info = self.checkpoint.module_info(module)
        tensors = self.backend.mutate(info, self.checkpoint.module_tensors(module))
        if self.backend.decode is not None:
            return self.backend.decode(info, tensors)
        args = info.scheme.weights if info.scheme is not None else None
        return get_format(info.format).decode(tensors, args, layout=self.checkpoint.config.packing_layout)

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        info = self.checkpoint.module_info(module)
        from conformance import oracle

        return linear(
            inputs.to(torch.float32),
            self.effective_weight(module),
            bias=self.checkpoint.bias(module),
            input_args=None if info.scheme is None else info.scheme.input_activations,
            input_params=oracle.input_params(self.checkpoint, module),
            compute_dtype=torch.float32,
        )


@dataclass
class BrokenBackend(ReferenceBackend):
    """A reference backend with one planted bug. ``exposed_by`` is the bug case that shows it."""

    bug: str = ""
    exposed_by: str = ""
    mutate: Callable[[ctref.ModuleInfo, dict[str, torch.Tensor]], dict[str, torch.Tensor]] = (
        lambda info, tensors: tensors
    )
    decode: Callable[[ctref.ModuleInfo, dict[str, torch.Tensor]], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.name = f"broken-{self.bug}"

    def load(self, checkpoint: Path, *, device: str, module_classes=None) -> MutatingCheckpoint:
        return MutatingCheckpoint(ctref.open_checkpoint(checkpoint, module_classes=module_classes), self)


def _swap_nibbles(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A5: the high nibble taken for the even element (uint8 FP4 codes)."""
    packed = tensors.get("weight_packed")
    if packed is None or packed.dtype != torch.uint8:
        return tensors
    return {**tensors, "weight_packed": (packed >> 4) | (packed << 4)}


def _zero_point_plus_one(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A4 / trap 1: zero points read in the unsigned convention (off by one level after the
    writer's rounding), repacked as the file stores them."""
    args = info.scheme.weights
    rows = info.weight_shape[-2]
    zero_point = packing.unpack_along_rows(tensors["weight_zero_point"], args.num_bits, rows)
    high = 2 ** (args.num_bits - 1) - 1
    shifted = torch.clamp(zero_point.to(torch.int16) + 1, max=high).to(torch.int8)
    return {**tensors, "weight_zero_point": packing.pack_along_rows(shifted, args.num_bits)}


def _drop_g_idx(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """C1-C3: ``weight_g_idx`` not applied; columns take contiguous groups."""
    return {k: v for k, v in tensors.items() if k != "weight_g_idx"}


def _transpose_scale(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E1-style layout bug: the (N, G) scale's memory read column-major."""
    scale = tensors["weight_scale"]
    return {**tensors, "weight_scale": scale.t().contiguous().reshape(scale.shape)}


def _invert_global_scale(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F1: the NVFP4 global scale treated as a multiplier (ModelOpt's convention)."""
    if "weight_global_scale" not in tensors:
        return tensors
    return {**tensors, "weight_global_scale": 1.0 / tensors["weight_global_scale"]}


def _misaligned_blocks(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """D6: block size derived as N // n_blocks (and K // n_blocks) instead of block_structure:
    on a ragged edge every block after the first is shifted."""
    codes, scale = tensors["weight"], tensors["weight_scale"]
    rows, cols = codes.shape
    block_rows, block_cols = rows // scale.shape[0], cols // scale.shape[1]
    row_index = torch.clamp(torch.arange(rows) // block_rows, max=scale.shape[0] - 1)
    col_index = torch.clamp(torch.arange(cols) // block_cols, max=scale.shape[1] - 1)
    full = scale[row_index][:, col_index]
    return (codes.to(torch.float32) * full.to(torch.float32)).to(scale.dtype)


def _int8_as_fp8(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trt column 7: int8 W8A8 routed to the FP8 path; the int8 bytes read as e4m3."""
    weight = tensors["weight"]
    if weight.dtype != torch.int8:
        return tensors
    return {**tensors, "weight": weight.view(torch.float8_e4m3fn)}


class Int8AsFp8Backend(BrokenBackend):
    """A TensorRT-LLM-like backend that maps schemes to ``QuantAlgo`` without checking the type."""

    scheme_table = "trtllm"

    def load(self, checkpoint: Path, *, device: str, module_classes=None) -> MutatingCheckpoint:
        return Int8AsFp8Checkpoint(ctref.open_checkpoint(checkpoint, module_classes=module_classes), self)

    def decode_int8_as_fp8(self, info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The FP8 path's dequantization, ``fp8(weight) * scale``, with no check of the codes."""
        scale = tensors["weight_scale"]
        return (tensors["weight"].to(torch.float32) * scale.to(torch.float32)).to(scale.dtype)


class Int8AsFp8Checkpoint(MutatingCheckpoint):
    def modules(self) -> Mapping[str, ResolvedModule]:
        resolved = {}
        for name, module in super().modules().items():
            scheme = self.checkpoint.module_info(name).scheme
            as_float = scheme and dataclasses.replace(
                scheme,
                weights=scheme.weights and dataclasses.replace(scheme.weights, type="float"),
                input_activations=scheme.input_activations
                and dataclasses.replace(scheme.input_activations, type="float"),
            )
            resolved[name] = dataclasses.replace(module, label=expected_label("trtllm", as_float))
        return resolved


class RegexIgnoreIgnoredCheckpoint(ReferenceCheckpoint):
    """J2: ``re:`` ignore entries compared as literal names, so they never match: ignored
    modules are built quantized, fake-quantizing their float weight with the group's scheme, and
    their quantization parameters are never loaded."""

    def _engine_scheme(self, module: str) -> QuantScheme | None:
        config = self.checkpoint.config
        literal = dataclasses.replace(config, ignore=tuple(e for e in config.ignore if not e.startswith("re:")))
        resolved = matching.resolve_scheme(literal, module, self.checkpoint.class_names(module))
        return None if resolved is None else resolved[1]

    def modules(self) -> Mapping[str, ResolvedModule]:
        resolved = dict(super().modules())
        for name in resolved:
            scheme = self._engine_scheme(name)
            if scheme is not None and self.checkpoint.module_info(name).scheme is None:
                resolved[name] = ResolvedModule(scheme=scheme.to_dict(), format=matching.resolve_format(self.checkpoint.config, scheme))
        return resolved

    def _wrongly_quantized(self) -> list[str]:
        return [
            info.name
            for info in self.checkpoint.modules()
            if info.scheme is None and self._engine_scheme(info.name) is not None
        ]

    def inventory(self) -> Inventory:
        inventory = super().inventory()
        missing = {f"{name}.weight_scale" for name in self._wrongly_quantized()}
        return dataclasses.replace(inventory, uninitialized=frozenset(missing))

    def effective_weight(self, module: str) -> torch.Tensor:
        weight = super().effective_weight(module)
        scheme = self._engine_scheme(module)
        if module not in self._wrongly_quantized() or scheme is None:
            return weight
        args = scheme.weights
        qparams = qmath.qparams_for(weight, args)
        codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args)
        return qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=args)

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs.to(torch.float32), self.effective_weight(module), compute_dtype=torch.float32)


class RegexIgnoreIgnoredBackend(ReferenceBackend):
    name = "broken-regex-ignore-ignored"
    bug = "regex-ignore-ignored"
    exposed_by = "w4a16_regex_ignore"

    def load(self, checkpoint: Path, *, device: str, module_classes=None) -> RegexIgnoreIgnoredCheckpoint:
        return RegexIgnoreIgnoredCheckpoint(ctref.open_checkpoint(checkpoint, module_classes=module_classes))


def _shared_fused_scale(checkpoint: ctref.Checkpoint):
    """G1: q/k/v fused into one layer that keeps q_proj's weight scale for every shard."""

    def mutate(info: ctref.ModuleInfo, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parent, _, proj = info.name.rpartition(".")
        if proj not in ("k_proj", "v_proj"):
            return tensors
        return {**tensors, "weight_scale": checkpoint.read(f"{parent}.q_proj.weight_scale")}

    return mutate


class SharedFusedScaleBackend(BrokenBackend):
    def load(self, checkpoint: Path, *, device: str, module_classes=None) -> MutatingCheckpoint:
        opened = ctref.open_checkpoint(checkpoint, module_classes=module_classes)
        self.mutate = _shared_fused_scale(opened)
        return MutatingCheckpoint(opened, self)


def broken_backends() -> list[BrokenBackend | ReferenceBackend]:
    """Every planted bug, each with the case that exposes it."""
    int8 = Int8AsFp8Backend(bug="int8-routed-as-fp8", exposed_by="w8a8_int8", mutate=_int8_as_fp8)
    int8.decode = int8.decode_int8_as_fp8
    return [
        BrokenBackend(bug="wrong-nibble-order", exposed_by="nvfp4a16", mutate=_swap_nibbles),
        BrokenBackend(bug="zero-point-off-by-one", exposed_by="int4_asym_group16", mutate=_zero_point_plus_one),
        BrokenBackend(bug="g-idx-ignored", exposed_by="int4_actorder_group16", mutate=_drop_g_idx),
        BrokenBackend(bug="scale-transposed", exposed_by="int4_asym_group16", mutate=_transpose_scale),
        BrokenBackend(bug="nvfp4-global-scale-multiplied", exposed_by="nvfp4a16", mutate=_invert_global_scale),
        BrokenBackend(bug="block-scales-misaligned-on-ragged-edge", exposed_by="fp8_block16_ragged", decode=_misaligned_blocks),
        int8,
        RegexIgnoreIgnoredBackend(),
        SharedFusedScaleBackend(bug="one-scale-for-fused-shards", exposed_by="fp8_fused_qkv"),
    ]


# ---------------------------------------------------------------------------------------------
# Legitimate variants: the same numbers computed another valid way


class VariantCheckpoint(ReferenceCheckpoint):
    """The reference's effective weights, held in ``storage`` dtype; layers computed by
    ``compute(x, weight)`` after quantizing activations in ``activation_dtype``."""

    def __init__(self, checkpoint: ctref.Checkpoint, backend: LegitimateVariant) -> None:
        super().__init__(checkpoint)
        self.backend = backend

    def effective_weight(self, module: str) -> torch.Tensor:
        return super().effective_weight(module).to(self.backend.storage)

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        from conformance import oracle

        info = self.checkpoint.module_info(module)
        x = inputs.to(self.backend.activation_dtype)
        args = None if info.scheme is None else info.scheme.input_activations
        if args is not None:
            stored = oracle.input_params(self.checkpoint, module)
            x = quantize_activation(
                x,
                args,
                scale=stored.get("input_scale"),
                zero_point=stored.get("input_zero_point"),
                global_scale=stored.get("input_global_scale"),
            )
        out = self.backend.compute(x, self.effective_weight(module))
        bias = self.checkpoint.bias(module)
        return out if bias is None else out + bias.to(out.dtype)


@dataclass
class LegitimateVariant(ReferenceBackend):
    """A backend that computes what the reference defines, in another legitimate way."""

    variant: str = ""
    storage: torch.dtype = BF16
    activation_dtype: torch.dtype = torch.float32
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda x, w: x @ w.T

    def __post_init__(self) -> None:
        self.name = f"legitimate-{self.variant}"

    def load(self, checkpoint: Path, *, device: str, module_classes=None) -> VariantCheckpoint:
        return VariantCheckpoint(ctref.open_checkpoint(checkpoint, module_classes=module_classes), self)


def _reversed_chunks(x: torch.Tensor, w: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """fp32, K summed in chunks of 16 from the last chunk to the first."""
    x, w = x.to(torch.float32), w.to(torch.float32)
    out = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float32)
    for start in reversed(range(0, x.shape[-1], chunk)):
        out += x[..., start : start + chunk] @ w[:, start : start + chunk].T
    return out


def _bfloat16_math(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 operands and output, fp32 accumulation inside the GEMM (as ATen's CPU bf16 GEMM)."""
    return x.to(BF16) @ w.to(BF16).T


def _split_k_fp16(x: torch.Tensor, w: torch.Tensor, splits: int = 4) -> torch.Tensor:
    """A GPU-like GEMM: fp16 operands, K split four ways, fp32 partials added in a scrambled
    order (atomics), fp16 output."""
    x16, w16 = x.to(torch.float16).to(torch.float32), w.to(torch.float16).to(torch.float32)
    bounds = torch.linspace(0, x.shape[-1], splits + 1).long().tolist()
    partials = [x16[..., a:b] @ w16[:, a:b].T for a, b in itertools.pairwise(bounds)]
    out = torch.zeros_like(partials[0])
    for index in (2, 0, 3, 1)[: len(partials)]:
        out += partials[index]
    return out.to(torch.float16)


def legitimate_variants() -> list[LegitimateVariant]:
    return [
        LegitimateVariant(variant="reversed-accumulation", compute=_reversed_chunks),
        LegitimateVariant(variant="bfloat16-math", activation_dtype=BF16, compute=_bfloat16_math),
        LegitimateVariant(variant="gpu-like-split-k-fp16", storage=torch.float16, compute=_split_k_fp16),
    ]
