"""``nvfp4-pack-quantized``: FP4 (E2M1) nibbles, fp8 group-16 scales, a dividing global scale.

Stored per module (ct-format.md §3.4): ``weight_packed`` uint8 (..., N, K/2), two codes a byte
(:func:`ctref.fpcodes.pack_fp4`); ``weight_scale`` ``float8_e4m3fn`` (..., N, K/16);
``weight_global_scale`` float32 (1,) for ``tensor_group`` (absent for plain ``group``). Decoding is
the 0.20.0 arithmetic: scale to bf16, divided by the (1,)-shaped fp32 global scale (so the division
promotes to fp32; a 0-d global scale would keep bf16), the product in fp32, then bf16 — whatever
the model dtype was. There is no ``weight_shape``: K is twice the packed width.

W4A4 (NVFP4) checkpoints also carry ``input_global_scale`` (float32 (1,)) for the tensor_group
input activations; it belongs to the activation arguments, which a weight format is not given, so
the reader checks it (with :func:`read_global_scale`).

This module also holds what the FP4/FP6/FP8 MX formats share with it: the argument and column
checks, the global-scale and FP4 readers, and the overflow guard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ctref import compute, fpcodes, qmath
from ctref.compute import fused
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import (
    FLOAT_DTYPES,
    TensorSpec,
    register,
    require,
    require_args,
    require_finite,
)

OUTPUT_DTYPE = torch.bfloat16
"""NVFP4 and MX formats decode to bf16 whatever the model dtype (§0 fact 7, §3.5–3.7)."""


def check_float_args(
    args: QuantArgs | None, format_name: str, bits: int, strategies: tuple[str, ...]
) -> QuantArgs:
    """The weight args, refused unless they are symmetric float ``bits`` with a group strategy."""
    args = require_args(args, format_name)
    if args.type != "float" or args.num_bits != bits:
        raise CTRefError(
            f"format '{format_name}' stores {bits}-bit float weights, but the args say "
            f"{args.num_bits}-bit {args.type}",
            key="weights",
        )
    if not args.symmetric:
        raise CTRefError(f"format '{format_name}' is symmetric only", key="weights.symmetric")
    if args.strategy not in strategies:
        raise CTRefError(
            f"format '{format_name}' takes strategy {' or '.join(strategies)}, "
            f"not '{args.strategy}'",
            key="weights.strategy",
        )
    return args


def split_shape(shape: Sequence[int], *, tensor: str) -> tuple[tuple[int, ...], int, int]:
    """``(lead, N, K)`` of a weight shape ``(..., N, K)``; fewer than two dimensions is an error."""
    if len(shape) < 2:
        raise CTRefError(
            f"expected at least two dimensions (..., N, K), found shape {tuple(shape)}",
            tensor=tensor,
        )
    *lead, rows, cols = shape
    return tuple(lead), rows, cols


def check_columns(cols: int, args: QuantArgs, codes_per_unit: int, *, tensor: str) -> None:
    """K must fill whole groups (the writer refuses ragged ones) and whole packing units."""
    if cols <= 0 or cols % args.group_size or cols % codes_per_unit:
        raise CTRefError(
            f"K = {cols} columns must be a positive multiple of the group size "
            f"{args.group_size} and of {codes_per_unit} (codes per packing unit)",
            tensor=tensor,
        )


def check_weight(weight: torch.Tensor, args: QuantArgs, codes_per_unit: int) -> None:
    """A weight to encode: a float tensor (..., N, K) whose K fits groups and packing units."""
    if weight.dtype not in FLOAT_DTYPES:
        raise CTRefError(f"expected a float weight, found {weight.dtype}", tensor="weight")
    _, _, cols = split_shape(weight.shape, tensor="weight")
    check_columns(cols, args, codes_per_unit, tensor="weight")


def read_global_scale(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A global scale (``weight_global_scale`` or ``input_global_scale``): fp32, (1,), > 0.

    It divides the local scales, so zero, negative, NaN or Inf would silently wreck every value.
    The (1,) shape is part of the arithmetic (a 0-d one would change the promotion).
    """
    scale = require(tensors, name, (torch.float32,), (1,))
    value = float(scale[0])
    if not value > 0 or value == float("inf"):
        raise CTRefError(
            f"must be a finite positive number (it divides), found {value}", tensor=name
        )
    return scale


def read_fp4_packed(tensors: Mapping[str, torch.Tensor], args: QuantArgs) -> torch.Tensor:
    """``weight_packed`` (..., N, K/2) uint8, checked; K = 2 × packed width."""
    packed = require(tensors, "weight_packed", (torch.uint8,))
    _, _, width = split_shape(packed.shape, tensor="weight_packed")
    check_columns(2 * width, args, 2, tensor="weight_packed")
    return packed


ROW_BLOCK_ELEMENTS = 1 << 20
"""Weight elements decoded per block. A block's intermediates (a few MiB) stay in cache: a
4096×4096 NVFP4 decode on two CPU threads takes about 35 ms instead of 115 ms in whole-tensor
steps; much smaller blocks lose that again to per-operation overhead."""


@fused
def _dequantize_values(
    stored: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    *,
    to_values: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
    dtype: torch.dtype,
    args: QuantArgs,
) -> torch.Tensor:
    return qmath.dequantize(
        to_values(stored, dtype), scale, args=args, global_scale=global_scale, out_dtype=OUTPUT_DTYPE
    )


def dequantize_values(
    stored: torch.Tensor,
    to_values: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
    dtype: torch.dtype,
    cols: int,
    scale: torch.Tensor,
    args: QuantArgs,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bf16 weight (..., N, cols) of ``stored`` codes (..., N, W).

    ``to_values(rows, dtype)`` (a module-level function, so that a compiled decode is reused)
    turns stored rows into element values of ``cols`` columns; :func:`ctref.qmath.dequantize`
    scales them. Large weights run as one fused kernel (:mod:`ctref.compute`); otherwise a block
    of rows at a time, so the eager intermediates stay in cache. ``scale`` is already checked
    against the weight shape (per expert, or one 2-D scale shared by all experts).
    """
    if compute.wants_compile(stored):
        return _dequantize_values(
            stored, scale, global_scale, to_values=to_values, dtype=dtype, args=args
        )
    *lead, rows, width = stored.shape
    stored_rows = stored.reshape(-1, width)
    scale_rows = scale.expand(*lead, rows, scale.shape[-1]).reshape(-1, scale.shape[-1])
    weight = torch.empty((stored_rows.shape[0], cols), dtype=OUTPUT_DTYPE, device=stored.device)
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, stored_rows.shape[0], step):
        block = slice(start, start + step)
        weight[block] = _dequantize_values(
            stored_rows[block], scale_rows[block], global_scale,
            to_values=to_values, dtype=dtype, args=args,
        )
    return weight.reshape(*lead, rows, cols)


def check_finite_output(
    weight: torch.Tensor,
    scale: torch.Tensor,
    element_bits: int,
    scale_name: str,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Refuse a decoded weight holding Inf/NaN, scanned for only when the scales allow overflow.

    The largest effective scale × the element type's largest value bounds every output; below
    bf16's maximum nothing can overflow and the full scan is skipped.
    """
    largest = float(scale.abs().amax()) if scale.numel() else 0.0
    if global_scale is not None:
        largest /= float(global_scale[0])
    bound = largest * qmath.FLOAT_MAX[element_bits]
    if bound >= torch.finfo(OUTPUT_DTYPE).max and not bool(torch.isfinite(weight).all()):
        raise CTRefError(
            f"effective scales up to {largest:g} overflow bf16: the decoded weight would hold Inf",
            tensor=scale_name,
        )
    return weight


def _scale_dtype(args: QuantArgs) -> torch.dtype:
    """fp8 E4M3 unless the args name another float type (the writer's ``scale.to`` rule)."""
    dtype = args.scale_dtype or torch.float8_e4m3fn
    if not dtype.is_floating_point:
        raise CTRefError(
            f"NVFP4 scales are floats (float8_e4m3fn), not {dtype}", key="weights.scale_dtype"
        )
    return dtype


@register
class Nvfp4PackQuantized:
    names = ("nvfp4-pack-quantized",)
    strategies = ("tensor_group", "group")

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """Packed codes, fp8 scales and (tensor_group) the global scale; ``layout`` is unused."""
        args = check_float_args(args, self.names[0], 4, self.strategies)
        lead, rows, cols = split_shape(weight_shape, tensor="weight")
        check_columns(cols, args, 2, tensor="weight")
        specs = [
            TensorSpec("weight_packed", (torch.uint8,), (*lead, rows, cols // 2)),
            TensorSpec(
                "weight_scale", (_scale_dtype(args),), qmath.param_shape(args, weight_shape)
            ),
        ]
        if args.strategy == "tensor_group":
            specs.append(TensorSpec("weight_global_scale", (torch.float32,), (1,)))
        return specs

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = check_float_args(args, self.names[0], 4, self.strategies)
        global_scale = None
        if args.strategy == "tensor_group":
            global_scale = read_global_scale(tensors, "weight_global_scale")
        elif "weight_global_scale" in tensors:
            raise CTRefError(
                "present, but strategy 'group' has no global scale (only tensor_group does); "
                "the writer would have divided by it",
                tensor="weight_global_scale",
            )
        scale = require(tensors, "weight_scale", (_scale_dtype(args),))
        require_finite(scale, "weight_scale")
        scale = scale.to(OUTPUT_DTYPE)
        packed = read_fp4_packed(tensors, args)
        cols = 2 * packed.shape[-1]
        qmath.check_param(scale, args, (*packed.shape[:-1], cols), name="weight_scale")
        # FP4 values are exact in either dtype: decode them straight into the product's dtype.
        compute_dtype = OUTPUT_DTYPE if global_scale is None else torch.float32
        weight = dequantize_values(
            packed, fpcodes.unpack_fp4_values, compute_dtype, cols, scale, args, global_scale
        )
        return check_finite_output(weight, scale, 4, "weight_scale", global_scale)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = check_float_args(args, self.names[0], 4, self.strategies)
        check_weight(weight, args, 2)
        qparams = qparams or qmath.qparams_for(weight, args)
        if qparams.scale.dtype != _scale_dtype(args):
            raise CTRefError(
                f"expected {_scale_dtype(args)} scales (as qmath.qparams_for gives them), "
                f"found {qparams.scale.dtype}",
                tensor="weight_scale",
            )
        qmath.check_param(qparams.scale, args, weight.shape, name="weight_scale")
        if args.strategy == "tensor_group":
            if qparams.global_scale is None:
                raise CTRefError(
                    "required for strategy 'tensor_group'", tensor="weight_global_scale"
                )
            read_global_scale({"weight_global_scale": qparams.global_scale}, "weight_global_scale")
        elif qparams.global_scale is not None:
            raise CTRefError("strategy 'group' has no global scale", tensor="weight_global_scale")
        # The writer holds the (fp8-valued) scale in the model dtype and casts it only on save;
        # the division's dtype follows from that (fp32 with a global scale, else the model's).
        values = qmath.quantize(
            weight, qparams.scale.to(weight.dtype), args=args, global_scale=qparams.global_scale
        )
        stored = {
            "weight_packed": fpcodes.pack_fp4(fpcodes.encode(values, 4)),
            "weight_scale": qparams.scale,
        }
        if qparams.global_scale is not None:
            stored["weight_global_scale"] = qparams.global_scale
        return stored
