"""The ``torch-kernels`` backend: a GPU engine built on PyTorch's production low-precision kernels.

ctref reads the checkpoint (config, inventory: as the reference backend); the layer and model
levels run each quantized Linear through the first kernel of ``conformance/arch_support.toml``
(rows ``backend = "torch-kernels"``) that serves its scheme and format on this device and whose
layout the module fits:

* ``scaled_mm-tensorwise`` / ``scaled_mm-rowwise``: ``torch._scaled_mm`` (cuBLASLt) on FP8 e4m3
  weights and activations, per-tensor or per-row/per-token fp32 scales;
* ``scaled_mm-blockwise``: ``torch.nn.functional.scaled_mm`` with 1x128 activation and 128x128
  weight scales, in the layout cuBLASLt demands (:func:`blockwise_scale_operands`);
* ``int4pack_mm``: tinygemm (``torch._weight_int4pack_mm``) for symmetric int4 groups in bf16;
* ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32, exact), scales applied in float32;
* ``dequant-matmul``: ctref's decode on the device (fused by torch.compile for large weights),
  activations fake-quantized by :mod:`ctref.forward`, then ``matmul`` in the activation dtype:
  where the device has no kernel for the scheme (NVFP4 and MX on sm90) or the layout does not fit.

Activations are quantized the way an engine does it, in float32 with the format's divisor
(``(qmax - qmin) / 2``: 448 for FP8, 127.5 for int8). :meth:`TorchKernelsCheckpoint.kernel_report`
says which kernel ran each module and why a fallback was taken. The effective weight (weights
level) is the kernel's weight operand dequantized in float32 through :func:`ctref.qmath.dequantize`,
so a wrong layout conversion shows there too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import ctref
from conformance import arch, levels, oracle
from conformance.backends.base import NotSupported
from conformance.backends.reference import ReferenceCheckpoint
from ctref import packing, qmath, transforms
from ctref.config import QuantArgs
from ctref.forward import quantize_activation

BACKEND = "torch-kernels"
FP8 = torch.float8_e4m3fn
BLOCK = 128
"""The block side of the block-wise FP8 kernel (1x128 activations, 128x128 weights)."""
TINYGEMM_GROUPS = (32, 64, 128, 256)


class Unfit(Exception):
    """The module's layout does not fit the kernel (message: why); the next kernel is tried."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad2(tensor: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """``tensor`` (r, c) zero-padded (or ``value``-padded) to (rows, cols); fp8 pads through bytes."""
    pad = (0, cols - tensor.shape[1], 0, rows - tensor.shape[0])
    if pad == (0, 0, 0, 0):
        return tensor.contiguous()
    if tensor.dtype == FP8:
        return F.pad(tensor.view(torch.uint8), pad, value=0).view(FP8)
    return F.pad(tensor, pad, value=value)


def _divisor(args: QuantArgs) -> float:
    """The symmetric quantizer's divisor ``(qmax - qmin) / 2`` of the format."""
    low, high = qmath.q_range(args)
    return (high - low) / 2


def _dynamic_scale(amax: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``amax / divisor`` in float32, never zero (an all-zero row quantizes to zeros)."""
    return (amax.float() / _divisor(args)).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``x / scale`` in float32, clamped to the format's range, cast (RNE) to e4m3."""
    high = qmath.q_range(args)[1]
    return (x.float() / scale).clamp(-high, high).to(FP8)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``round(x / scale)`` (half to even) in float32, clamped to the format's range."""
    low, high = qmath.q_range(args)
    return torch.round(x.float() / scale).clamp(low, high).to(torch.int8)


def activation_scale(x: torch.Tensor, args: QuantArgs, stored: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor or per-token float32 scale of ``x`` (M, K): stored (static) or observed."""
    if not args.dynamic:
        if stored is None:
            raise NotSupported("static activation quantization needs the stored input_scale")
        return stored.to(x.device, torch.float32).reshape(())
    if args.strategy == "token":
        return _dynamic_scale(x.abs().amax(dim=-1, keepdim=True), args)
    return _dynamic_scale(x.abs().amax(), args)


# ---------------------------------------------------------------------------------------------
# Kernels: each builder turns a module's stored tensors into kernel operands, or raises Unfit.


@dataclass(frozen=True)
class Prepared:
    """One module ready for its kernel."""

    label: str
    """The kernel row that runs it (``arch_support.toml``)."""
    note: str
    """Why earlier kernels were passed over (empty when the first choice fits)."""
    matmul: Callable[[torch.Tensor], torch.Tensor]
    """(M, K) transformed inputs on the device -> (M, N) without bias, float32 or the inputs' dtype."""
    weight: Callable[[], torch.Tensor]
    """The effective dense weight the kernel multiplies by (N, K)."""


@dataclass(frozen=True)
class Module:
    """What a builder needs of one module."""

    name: str
    info: ctref.ModuleInfo
    tensors: Mapping[str, torch.Tensor]
    """The module's stored tensors, on the device."""
    input_params: Mapping[str, torch.Tensor]
    layout: str
    """The checkpoint's packing layout (``dense`` or ``legacy``)."""

    @property
    def weight_args(self) -> QuantArgs:
        return self.info.scheme.weights

    @property
    def input_args(self) -> QuantArgs | None:
        return self.info.scheme.input_activations


def _fp8_weight(module: Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module.tensors.get("weight")
    scale = module.tensors.get("weight_scale")
    if weight is None or weight.dtype != FP8 or scale is None:
        raise Unfit("the weight is not stored as float8_e4m3fn codes with a weight_scale")
    return weight, scale.float()


def scaled_mm_operands(
    weight: torch.Tensor, scale: torch.Tensor, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat2`` (K', N') column-major and its scale: (1, N') row-wise or a 0-d per-tensor scale.

    cuBLASLt wants K and N multiples of 16: the weight is zero-padded (padded scales are 1).
    """
    rows, cols = weight.shape
    padded = _pad2(weight, _round_up(rows, 16), _round_up(cols, 16))
    if not rowwise:
        return padded.t(), scale.reshape(())
    per_row = scale.reshape(-1).expand(rows) if scale.numel() == 1 else scale.reshape(-1)
    row_scale = F.pad(per_row, (0, padded.shape[0] - rows), value=1.0).reshape(1, -1).contiguous()
    return padded.t(), row_scale


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The kernels' output dtype: the activation's half dtype, float32 for float32 inputs."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _build_scaled_mm(module: Module, rowwise: bool) -> tuple[Callable, Callable]:
    weight, scale = _fp8_weight(module)
    rows, cols = weight.shape
    args = module.input_args
    mat2, scale_b = scaled_mm_operands(weight, scale, rowwise)
    stored = module.input_params.get("input_scale")

    def matmul(x: torch.Tensor) -> torch.Tensor:
        scale_a = activation_scale(x, args, stored)
        if rowwise:
            scale_a = scale_a.expand(x.shape[0], 1).contiguous()
        codes = quantize_fp8(F.pad(x, (0, mat2.shape[0] - cols)), scale_a, args)
        out = torch._scaled_mm(
            codes, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=_out_dtype(x)
        )
        return out[:, :rows]

    def effective() -> torch.Tensor:
        """The codes times the kernel's scale operand: per row, or one scalar."""
        codes = mat2.t()[:rows, :cols].float()
        return codes * (scale_b[0, :rows, None] if rowwise else scale_b)

    return matmul, effective


def blockwise_scale_operands(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 128x128 block-scaled weight as ``F.scaled_mm`` takes it: ``mat2`` (K', N') column-major
    with K' and N' multiples of 128 (zero-padded), and the block scales (⌈K'/128⌉ rounded up to
    4, N'/128) with strides (1, rows): the transpose of a row-major (N'/128, 4·⌈·⌉) tensor.
    """
    rows, cols = weight.shape
    padded = _pad2(weight, _round_up(rows, BLOCK), _round_up(cols, BLOCK))
    n_blocks, k_blocks = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
    if tuple(scale.shape) != (n_blocks, k_blocks):
        raise Unfit(
            f"block scales {tuple(scale.shape)} do not tile the weight {tuple(weight.shape)}"
        )
    blocks = torch.ones(n_blocks, _round_up(k_blocks, 4), dtype=torch.float32, device=scale.device)
    blocks[:, :k_blocks] = scale
    return padded.t(), blocks.t()


def blockwise_activation_operands(
    x: torch.Tensor, args: QuantArgs, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, K) quantized per 1x128 group: codes (M', K') and scales (M', K'/128) stored
    column-major (strides (1, M')), M' a multiple of 16 (zero rows pad)."""
    rows = _round_up(x.shape[0], 16)
    padded = _pad2(x, rows, _round_up(cols, BLOCK))
    groups = padded.float().unflatten(-1, (-1, BLOCK))
    scale = _dynamic_scale(groups.abs().amax(dim=-1), args)
    codes = quantize_fp8(groups, scale.unsqueeze(-1), args).flatten(-2)
    return codes, scale.t().contiguous().t()


def _build_scaled_mm_blockwise(module: Module) -> tuple[Callable, Callable]:
    weight, scale = _fp8_weight(module)
    if tuple(module.weight_args.block_structure) != (BLOCK, BLOCK):
        raise Unfit(f"block {module.weight_args.block_structure} is not {BLOCK}x{BLOCK}")
    rows, cols = weight.shape
    mat2, scale_b = blockwise_scale_operands(weight, scale)
    args = module.input_args

    def matmul(x: torch.Tensor) -> torch.Tensor:
        codes, scale_a = blockwise_activation_operands(x, args, cols)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        out = F.scaled_mm(
            codes,
            mat2,
            scale_a,
            F.ScalingType.BlockWise1x128,
            scale_b,
            F.ScalingType.BlockWise128x128,
            output_dtype=out_dtype,
        )
        return out[: x.shape[0], :rows]

    def effective() -> torch.Tensor:
        codes = mat2.t()
        n_blocks, k_blocks = codes.shape[0] // BLOCK, codes.shape[1] // BLOCK
        dense = qmath.dequantize(
            codes.float(), scale_b.t()[:n_blocks, :k_blocks], args=module.weight_args
        )
        return dense[:rows, :cols]

    return matmul, effective


def int4pack_operands(
    codes: torch.Tensor, scale: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's inputs from signed int4 codes (N, K) and group scales (N, K/group).

    Stored values are ``q + 8`` (0..15); tinygemm dequantizes ``(u - 8) * scale + zero``, so the
    zero is 0. N is zero-padded to a multiple of 64 (padded codes 8, scale 1: value 0). Returns
    ``(values (N', K) int32, scales_and_zeros (K/group, N', 2) bf16)``.
    """
    rows = _round_up(codes.shape[0], 64)
    values = _pad2(codes.to(torch.int32) + 8, rows, codes.shape[1], value=8)
    scales = _pad2(scale, rows, scale.shape[1], value=1.0).t()
    return values, torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()


def tinygemm_pack(values: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """``_convert_weight_to_int4pack`` of 0..15 values (N, K): CUDA takes two per byte (even K in
    the high nibble), the CPU variant takes them as int32."""
    if values.is_cuda:
        packed = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(packed, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, inner_k_tiles)


def _build_int4pack(module: Module) -> tuple[Callable, Callable]:
    args = module.weight_args
    scale = module.tensors["weight_scale"]
    if scale.dtype != torch.bfloat16:
        raise Unfit(f"tinygemm takes bf16 scales, the checkpoint's are {scale.dtype}")
    rows, cols = (int(v) for v in module.tensors["weight_shape"].tolist())
    group = args.group_size
    inner_k_tiles = next((t for t in (8, 4, 2) if cols % (t * 16) == 0), None)
    if group not in TINYGEMM_GROUPS or cols % group or inner_k_tiles is None:
        raise Unfit(
            f"tinygemm needs K divisible by the group (32..256) and by 32; K={cols}, group {group}"
        )
    codes = packing.unpack(module.tensors["weight_packed"], 4, cols, module.layout)
    values, scales_and_zeros = int4pack_operands(codes, scale, group)
    packed = tinygemm_pack(values, inner_k_tiles)
    mm = torch._weight_int4pack_mm if values.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu

    def matmul(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise NotSupported(f"tinygemm computes in bf16, the inputs are {x.dtype}")
        return mm(x.contiguous(), packed, group, scales_and_zeros)[:, :rows]

    def effective() -> torch.Tensor:
        dense = qmath.dequantize(
            values.float() - 8, scales_and_zeros[..., 0].t().float(), args=args
        )
        return dense[:rows]

    return matmul, effective


def int_mm_operands(weight: torch.Tensor) -> torch.Tensor:
    """``mat2`` (K', N') column-major int8 for ``torch._int_mm``: K', N' multiples of 8, K' >= 16."""
    rows, cols = weight.shape
    return _pad2(weight, _round_up(rows, 8), _round_up(max(cols, 16), 8)).t()


def _build_int_mm(module: Module) -> tuple[Callable, Callable]:
    weight = module.tensors.get("weight")
    scale = module.tensors.get("weight_scale")
    if weight is None or weight.dtype != torch.int8 or scale is None:
        raise Unfit("the weight is not stored as int8 codes with a weight_scale")
    rows, cols = weight.shape
    mat2 = int_mm_operands(weight)
    # Per output row (1, N) or one scalar, applied to the int32 accumulator.
    weight_scale = scale.float().reshape(1, -1) if scale.numel() > 1 else scale.float().reshape(())
    args = module.input_args
    stored = module.input_params.get("input_scale")

    def matmul(x: torch.Tensor) -> torch.Tensor:
        scale_a = activation_scale(x, args, stored)
        # _int_mm wants more than 16 rows and K a multiple of 8: zero codes pad.
        codes = _pad2(
            quantize_int8(x, scale_a, args), max(32, _round_up(x.shape[0], 8)), mat2.shape[0]
        )
        accumulated = torch._int_mm(codes, mat2)[: x.shape[0], :rows]
        return accumulated.float() * scale_a * weight_scale

    def effective() -> torch.Tensor:
        codes = mat2.t()[:rows, :cols].float()
        return codes * (weight_scale.reshape(-1, 1) if weight_scale.dim() else weight_scale)

    return matmul, effective


BUILDERS: dict[str, Callable[[Module], tuple[Callable, Callable]]] = {
    "scaled_mm-tensorwise": functools.partial(_build_scaled_mm, rowwise=False),
    "scaled_mm-rowwise": functools.partial(_build_scaled_mm, rowwise=True),
    "scaled_mm-blockwise": _build_scaled_mm_blockwise,
    "int4pack_mm": _build_int4pack,
    "int_mm": _build_int_mm,
}
FALLBACK = "dequant-matmul"


# ---------------------------------------------------------------------------------------------
# The backend


class TorchKernelsBackend:
    name = BACKEND
    scheme_table = None

    def engine_version(self) -> str:
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        return f"torch {torch.__version__}{cuda}"

    def load(
        self, checkpoint: Path, *, device: str, module_classes: Mapping[str, Sequence[str]]
    ) -> TorchKernelsCheckpoint:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NotSupported(
                f"torch-kernels runs on {device}, and this machine has no CUDA device"
            )
        return TorchKernelsCheckpoint(
            ctref.open_checkpoint(checkpoint, module_classes=module_classes), device
        )


class TorchKernelsCheckpoint(ReferenceCheckpoint):
    """ctref's reading (config, inventory) with PyTorch's kernels computing the layers."""

    def __init__(self, checkpoint: ctref.Checkpoint, device: str) -> None:
        super().__init__(checkpoint)
        self.device = torch.device(device)
        self.arch = arch.device_arch(device)
        self._prepared: dict[str, Prepared] = {}
        self._transforms: dict[str, list[transforms.AppliedTransform]] = {}

    def kernel_report(self) -> dict[str, str]:
        """Which kernel ran each quantized module prepared so far (``label``, or ``label (why
        earlier kernels did not fit)``)."""
        return {
            name: f"{p.label} ({p.note})" if p.note else p.label
            for name, p in self._prepared.items()
            if self.checkpoint.module_info(name).scheme is not None
        }

    def _prepare(self, name: str) -> Prepared:
        if name not in self._prepared:
            self._prepared[name] = self._select(name)
        return self._prepared[name]

    def _select(self, name: str) -> Prepared:
        info = self.checkpoint.module_info(name)
        if (
            info.scheme is None
            or info.scheme.weights is None
            or info.sparsity_format is not None
            or len(info.weight_shape) != 2
        ):
            return self._fallback(name, "")
        module = Module(
            name=name,
            info=info,
            tensors=self.checkpoint.module_tensors(name, self.device),
            input_params={
                k: v.to(self.device) for k, v in oracle.input_params(self.checkpoint, name).items()
            },
            layout=self.checkpoint.config.packing_layout,
        )
        key = levels.scheme_key(info.scheme)
        skipped = []
        for kernel in arch.load_table().kernels:
            if kernel.backend != BACKEND or kernel.label not in BUILDERS:
                continue
            if self.arch not in kernel.archs or not kernel.serves(key, info.format):
                continue
            try:
                matmul, weight = BUILDERS[kernel.label](module)
            except Unfit as why:
                skipped.append(f"{kernel.label}: {why}")
                continue
            return Prepared(kernel.label, "; ".join(skipped), matmul, weight)
        return self._fallback(name, "; ".join(skipped))

    def _fallback(self, name: str, note: str) -> Prepared:
        """ctref's decode on the device, activations fake-quantized by ctref.forward."""
        weight = self.checkpoint.dequantize(name, self.device)
        args = oracle.input_args(self.checkpoint, name)
        stored = {
            k: v.to(self.device) for k, v in oracle.input_params(self.checkpoint, name).items()
        }

        def matmul(x: torch.Tensor) -> torch.Tensor:
            if args is not None:
                x = quantize_activation(
                    x,
                    args,
                    scale=stored.get("input_scale"),
                    zero_point=stored.get("input_zero_point"),
                    global_scale=stored.get("input_global_scale"),
                )
            return x @ weight.to(x.dtype).T

        return Prepared(FALLBACK, note, matmul, lambda: weight)

    def _input_transforms(self, name: str) -> list[transforms.AppliedTransform]:
        """The module's online input transforms, their matrices on the device."""
        if name not in self._transforms:
            found = []
            if self.checkpoint.config.transform_config is not None:
                weight = self.checkpoint.dequantize(name)
                for applied in oracle.online_input_transforms(self.checkpoint, name, weight):
                    moved = applied.runtime_weight.to(self.device)
                    found.append(dataclasses.replace(applied, runtime_weight=moved))
            self._transforms[name] = found
        return self._transforms[name]

    # ------------------------------------------------------------------ levels

    def effective_weight(self, module: str) -> torch.Tensor:
        return self._prepare(module).weight()

    def linear(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        prepared = self._prepare(module)
        x = inputs.to(self.device)
        for applied in self._input_transforms(module):
            x = transforms.apply_online(x, applied)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = prepared.matmul(flat)
        bias = self.checkpoint.bias(module, self.device)
        if bias is not None:
            out = out.float() + bias.float()
        return out.to(inputs.dtype).reshape(*inputs.shape[:-1], out.shape[-1])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The fixture's architecture on the device in the model's dtype, every Linear of the
        checkpoint computed by :meth:`linear` (its kernel, or the fallback for unquantized ones);
        fused MoE experts keep ctref's dense weights."""
        dtype = _model_dtype(self.checkpoint.model_config)
        model = oracle.reference_model(self.checkpoint, dtype).to(self.device)
        for info in levels.linear_modules(self.checkpoint):
            try:
                layer = model.get_submodule(info.name)
            except AttributeError:
                continue
            layer._forward_pre_hooks.clear()  # the reference's transforms and activation quantization
            layer.forward = functools.partial(self.linear, info.name)
        with torch.no_grad():
            return model(input_ids.to(self.device)).logits


def _model_dtype(model_config: Mapping[str, object]) -> torch.dtype:
    name = model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16"
    return getattr(torch, str(name))
