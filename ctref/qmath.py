"""Quantization math that every format shares (ct-format.md §2).

This is the one place that knows which scale / zero-point element applies to which weight
element for each strategy (tensor, channel, group, tensor_group, block, with ``g_idx``), how a
value is quantized (clamp, round half to even, the division's dtype) and dequantized (``(q - zp)
* scale`` in the scale's dtype), and how scales and zero points are derived from a tensor's range.
Formats only add their storage layout on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctref import fpcodes
from ctref.config import QuantArgs
from ctref.errors import CTRefError

FLOAT_MAX = {8: 448.0, 6: 7.5, 4: 6.0}
"""Largest finite magnitude of each float element type: E4M3, E2M3, E2M1 (§2.1)."""


@dataclass(frozen=True)
class QParams:
    """The quantization parameters of one weight: what a format stores beside the codes."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


def q_range(args: QuantArgs) -> tuple[float, float]:
    """The closed range of quantized values: signed ints, or ± the float type's maximum."""
    if args.type == "int":
        return float(-(2 ** (args.num_bits - 1))), float(2 ** (args.num_bits - 1) - 1)
    top = FLOAT_MAX[args.num_bits]
    return -top, top


def code_dtype(args: QuantArgs) -> torch.dtype:
    """The dtype in which quantized values of ``args`` are stored unpacked (§3.2)."""
    if args.type == "float":
        return torch.float8_e4m3fn if args.num_bits == 8 else torch.uint8
    if args.num_bits <= 8:
        return torch.int8
    return torch.int16 if args.num_bits <= 16 else torch.int32


def is_mx(args: QuantArgs) -> bool:
    """MX schemes: float 4/6/8-bit groups of 32 with E8M0 (uint8) scales."""
    return (
        args.type == "float"
        and args.num_bits in (4, 6, 8)
        and args.group_size == 32
        and args.scale_dtype == torch.uint8
    )


def param_shape(args: QuantArgs, observed_shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """The shape of the scale (and zero point) of a tensor of ``observed_shape`` (§2.3, §4).

    Weights are ``(..., N, K)``: stacked 3-D expert weights carry their leading dimensions on
    every per-row strategy. Activations are observed over their last dimensions (``(K,)`` for an
    input, ``(heads, seq, head_dim)`` for attention). A tensor-strategy parameter is ``(1,)``.
    A dimension the caller does not know (None) stays unknown in the result.
    """
    shape = tuple(observed_shape)
    strategy = args.strategy
    if strategy == "tensor":
        return (1,)
    if strategy in ("group", "tensor_group") and len(shape) >= 1:
        return (*shape[:-1], _cdiv(shape[-1], args.group_size))
    if strategy == "channel" and len(shape) >= 2:
        return (*shape[:-1], 1)
    if strategy == "block" and len(shape) >= 2:
        block_rows, block_cols = args.block_structure
        *lead, rows, cols = shape
        return (*lead, _cdiv(rows, block_rows), _cdiv(cols, block_cols))
    if strategy == "attn_head" and len(shape) >= 3:
        return (shape[-3], 1, 1)
    raise CTRefError(
        f"strategy '{strategy}' has no stored parameter for a tensor of shape {shape}",
        key="strategy",
    )


def _cdiv(value: int | None, divisor: int) -> int | None:
    return None if value is None else -(-value // divisor)


def check_param(
    param: torch.Tensor, args: QuantArgs, weight_shape: Sequence[int], *, name: str
) -> None:
    """Raise unless ``param`` has the shape the strategy defines for ``weight_shape``.

    A 3-D expert weight may also carry 2-D parameters shared by all experts.
    """
    expected = param_shape(args, weight_shape)
    shared = expected[len(weight_shape) - 2 :] if len(weight_shape) > 2 else expected
    if tuple(param.shape) not in (expected, shared):
        raise CTRefError(
            f"expected shape {expected} for strategy '{args.strategy}' of a weight "
            f"{tuple(weight_shape)}, found {tuple(param.shape)}",
            tensor=name,
        )


def check_g_idx(g_idx: torch.Tensor, args: QuantArgs, cols: int, *, name: str) -> None:
    """Raise unless ``g_idx`` assigns each of ``cols`` columns to a valid group (§2.4)."""
    groups = math.ceil(cols / args.group_size)
    if g_idx.dim() != 1 or g_idx.shape[0] != cols:
        raise CTRefError(f"expected shape ({cols},), found {tuple(g_idx.shape)}", tensor=name)
    if g_idx.dtype not in (torch.int32, torch.int64):
        raise CTRefError(f"expected an integer dtype (int32), found {g_idx.dtype}", tensor=name)
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= groups:
        raise CTRefError(
            f"group indices must lie in [0, {groups - 1}], found [{low}, {high}]", tensor=name
        )
    sizes = torch.bincount(g_idx.to(torch.int64), minlength=groups)
    expected = torch.full_like(sizes, args.group_size)
    expected[-1] = cols - args.group_size * (groups - 1)
    if not torch.equal(sizes, expected):
        group = int((sizes != expected).nonzero()[0])
        raise CTRefError(
            f"each group holds {args.group_size} columns, but group {group} is assigned "
            f"{int(sizes[group])}",
            tensor=name,
        )


def g_idx_is_placeholder(g_idx: torch.Tensor | None) -> bool:
    """An uninitialised ``g_idx`` (all -1) means contiguous groups (§2.4)."""
    return g_idx is not None and bool((g_idx == -1).all())


def broadcast(
    param: torch.Tensor,
    args: QuantArgs,
    weight_shape: Sequence[int],
    g_idx: torch.Tensor | None = None,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """View a weight and its per-strategy parameter so that they broadcast element-wise.

    Returns ``(view_shape, param_view)``: reshape the weight to ``view_shape`` and combine it
    with ``param_view``; reshape the result back to ``weight_shape``. Divisible groups and blocks
    stay views; act-order groups and ragged edges gather the parameter to the full shape.
    """
    shape = tuple(weight_shape)
    *lead, rows, cols = shape
    strategy = args.strategy
    if strategy in ("tensor", "channel", "token", "attn_head"):
        return shape, param
    if strategy in ("group", "tensor_group"):
        size = args.group_size
        if g_idx is not None and not g_idx_is_placeholder(g_idx):
            return shape, param.index_select(-1, g_idx.to(torch.int64).to(param.device))
        if cols % size == 0:
            return (*lead, rows, cols // size, size), param.unsqueeze(-1)
        return shape, param.repeat_interleave(size, dim=-1)[..., :cols]
    if strategy == "block":
        block_rows, block_cols = args.block_structure
        if rows % block_rows == 0 and cols % block_cols == 0:
            view = (*lead, rows // block_rows, block_rows, cols // block_cols, block_cols)
            return view, param.unsqueeze(-1).unsqueeze(-3)
        full = param.repeat_interleave(block_rows, dim=-2)[..., :rows, :]
        return shape, full.repeat_interleave(block_cols, dim=-1)[..., :cols]
    raise CTRefError(f"strategy '{strategy}' does not apply to weights", key="strategy")


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """``scale / global_scale``: the global scale divides (§0 fact 7); a (1,) fp32 promotes."""
    return scale if global_scale is None else scale / global_scale


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    args: QuantArgs,
    g_idx: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(q - zp) * scale``, computed in the (effective) scale's dtype as the format defines.

    ``q`` holds quantized values (ints, or floats on the element grid). The result has the
    scale's dtype unless ``out_dtype`` says otherwise (NVFP4 and MX: bf16).
    """
    shape = tuple(q.shape)
    scale = effective_scale(scale, global_scale)
    view, scale_view = broadcast(scale, args, shape, g_idx)
    values = q.reshape(view).to(scale.dtype)
    if zero_point is not None:
        values = values - broadcast(zero_point, args, shape, g_idx)[1].to(scale.dtype)
    values = (values * scale_view).reshape(shape)
    return values if out_dtype is None else values.to(out_dtype)


def round_to_type(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Clamp to the type's range, then round: half to even for ints, RNE casts for floats.

    The result keeps ``x``'s dtype (values on the integer or float-element grid), except FP8
    which is returned as ``float8_e4m3fn``.
    """
    low, high = q_range(args)
    clamped = torch.clamp(x, low, high)
    if args.type == "int":
        return torch.round(clamped)
    if args.num_bits == 8:
        return clamped.to(torch.float8_e4m3fn)
    return fpcodes.round_to_grid(clamped, args.num_bits)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    args: QuantArgs,
    g_idx: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to codes as the writer does (§2.2).

    ``x / scale`` runs in the promoted dtype of the two (the weight dtype on the library's CPU
    path; fp32 when a global scale is present), the zero point is added in ``x``'s dtype, then
    :func:`round_to_type`. Ints come back as :func:`code_dtype`, FP8 as ``float8_e4m3fn``, FP4
    and FP6 as float values on their grid.
    """
    shape = tuple(x.shape)
    scale = effective_scale(scale, global_scale)
    view, scale_view = broadcast(scale, args, shape, g_idx)
    scaled = x.reshape(view) / scale_view
    if zero_point is not None:
        scaled = scaled + broadcast(zero_point, args, shape, g_idx)[1].to(x.dtype)
    codes = round_to_type(scaled, args).reshape(shape)
    if args.type == "int":
        return codes.to(code_dtype(args))
    return codes


def observe_min_max(
    x: torch.Tensor, args: QuantArgs, g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter minimum and maximum of a weight, shaped like its scale (min-max observer)."""
    shape = tuple(x.shape)
    *lead, rows, cols = shape
    strategy = args.strategy
    if strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if strategy == "channel":
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        size = args.group_size
        groups = math.ceil(cols / size)
        if g_idx is not None and not g_idx_is_placeholder(g_idx):
            index = g_idx.to(torch.int64).expand(*lead, rows, cols)
            low = x.new_full((*lead, rows, groups), math.inf)
            high = x.new_full((*lead, rows, groups), -math.inf)
            return (
                low.scatter_reduce(-1, index, x, "amin"),
                high.scatter_reduce(-1, index, x, "amax"),
            )
        # A ragged last group is padded with values that cannot be its minimum or maximum.
        width = (*lead, rows, groups * size)
        low = _pad_to(x, width, math.inf).reshape(*lead, rows, groups, size)
        high = _pad_to(x, width, -math.inf).reshape(*lead, rows, groups, size)
        return low.amin(dim=-1), high.amax(dim=-1)
    if strategy == "block":
        block_rows, block_cols = args.block_structure
        grid_rows, grid_cols = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
        # Padding with zeros is what the writer does (§2.3); min/max are clamped to include 0.
        padded = _pad_to(x, (*lead, grid_rows * block_rows, grid_cols * block_cols))
        blocks = padded.reshape(*lead, grid_rows, block_rows, grid_cols, block_cols)
        return blocks.amin(dim=(-3, -1)), blocks.amax(dim=(-3, -1))
    raise CTRefError(f"strategy '{strategy}' does not apply to weights", key="strategy")


def _pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """``x`` padded at the end of each dimension up to ``shape`` with ``value``."""
    pads: list[int] = []
    for have, want in zip(reversed(x.shape), reversed(shape)):
        pads += [0, want - have]
    return torch.nn.functional.pad(x, pads, value=value) if any(pads) else x


def global_scale_for(x: torch.Tensor) -> torch.Tensor:
    """The tensor_group global scale ``448 * 6 / amax`` in fp32, shape (1,) (§2.2)."""
    amax = x.abs().amax().to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    scale = (FLOAT_MAX[8] * FLOAT_MAX[4] / amax).reshape(1)
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


def scale_eps(dtype: torch.dtype) -> float:
    """What a zero scale is replaced by: 0.125 for fp8 scales, the dtype's eps, else 1 (§2.2)."""
    if dtype == torch.float8_e4m3fn:
        return 0.125
    if dtype.is_floating_point:
        return torch.finfo(dtype).eps
    return 1.0


def calculate_qparams(
    min_vals: torch.Tensor,
    max_vals: torch.Tensor,
    args: QuantArgs,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from observed ranges, as the writer derives them (§2.2).

    The range always includes 0. Symmetric: ``amax / ((qmax - qmin) / 2)`` (int4: amax/7.5), or
    the MX power-of-two rule. Asymmetric: ``(max - min) / (qmax - qmin)`` and
    ``zp = round(clamp(qmin - min / scale))`` (FP8 too; FP4/FP6 have no asymmetric form). A
    global scale multiplies, ``scale_dtype`` rounds, zero scales become eps. The zero point is
    ``None`` for symmetric args.
    """
    min_vals = torch.minimum(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.maximum(max_vals, torch.zeros_like(max_vals))
    low, high = q_range(args)
    span = high - low
    zero_point = None
    if args.symmetric:
        amax = torch.maximum(min_vals.abs(), max_vals.abs())
        if is_mx(args):
            scales = fpcodes.mx_scale(amax, args.num_bits)
        else:
            scales = amax / (span / 2)
    else:
        if args.type == "float" and args.num_bits in (4, 6):
            raise CTRefError("asymmetric quantization is not defined for FP4/FP6", key="symmetric")
        scales = (max_vals - min_vals) / span
        zero_point = torch.clamp(low - min_vals / scales, low, high)
    if global_scale is not None:
        scales = global_scale * scales
    if args.scale_dtype is not None and not is_mx(args):
        scales = round_to_dtype(scales, args.scale_dtype)
    eps = scale_eps(args.scale_dtype if args.scale_dtype is not None else scales.dtype)
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype), scales)
    if zero_point is not None:
        zero_point = round_to_dtype(zero_point, args.zp_dtype, keep_dtype=False)
    return scales, zero_point


def round_to_dtype(
    x: torch.Tensor, dtype: torch.dtype, *, keep_dtype: bool = True
) -> torch.Tensor:
    """Clamp to ``dtype``'s range and cast (rounding half to even for ints)."""
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        rounded = torch.clamp(x, info.min, info.max).to(dtype)
    else:
        info = torch.iinfo(dtype)
        rounded = torch.round(torch.clamp(x, info.min, info.max)).to(dtype)
    return rounded.to(x.dtype) if keep_dtype else rounded


def qparams_for(x: torch.Tensor, args: QuantArgs, g_idx: torch.Tensor | None = None) -> QParams:
    """Quantization parameters for weight ``x`` under ``args``, as a min-max observer derives them.

    The global scale exists for ``tensor_group`` only. Scales come back in ``x``'s dtype except
    where a float ``scale_dtype`` says otherwise (the writer stores NVFP4 scales as fp8).
    """
    global_scale = global_scale_for(x) if args.strategy == "tensor_group" else None
    low, high = observe_min_max(x, args, g_idx)
    scale, zero_point = calculate_qparams(low, high, args, global_scale)
    if args.scale_dtype is not None and args.scale_dtype.is_floating_point and not is_mx(args):
        scale = scale.to(args.scale_dtype)
    return QParams(scale, zero_point, global_scale, g_idx)
