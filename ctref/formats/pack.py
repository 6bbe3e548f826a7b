"""``pack-quantized``: integer codes of 1 to 8 bits bit-packed into int32 (ct-format.md §3.3).

Codes are packed along K (:mod:`ctref.packing`, dense or legacy layout by writer version);
``weight_shape`` gives the unpadded shape. Asymmetric group/channel zero points are packed the same
way but along N (int32, since 0.9.4); int8 zero points (tensor strategy, or older writers) are
stored as they are. Which one a file holds is told by the zero point's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import packing, qmath
from ctref.compute import fused
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import (
    TensorSpec,
    check_zero_point,
    qparam_tensors,
    quantize_codes,
    read_g_idx,
    read_scale,
    register,
    require,
    require_args,
    require_matrix,
    scale_dtypes,
)


def _zero_point_packed(args: QuantArgs) -> bool:
    return args.strategy in ("group", "channel")


@register
class PackQuantized:
    names = ("pack-quantized",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        args = require_args(args, self.names[0], types=(("int", None),))
        *lead, rows, cols = weight_shape
        bits = args.num_bits
        params = qmath.param_shape(args, weight_shape)
        specs = [
            TensorSpec(
                "weight_packed", (torch.int32,), (*lead, rows, packing.packed_width(cols, bits, layout))
            ),
            TensorSpec("weight_shape", (torch.int64,), (len(weight_shape),)),
            TensorSpec("weight_scale", scale_dtypes(args), params),
        ]
        if not args.symmetric:
            if _zero_point_packed(args):
                zp_shape = (*params[:-2], packing.packed_width(rows, bits, layout), params[-1])
                specs.append(TensorSpec("weight_zero_point", (torch.int32,), zp_shape))
            else:
                specs.append(TensorSpec("weight_zero_point", (torch.int8,), params))
        if args.legacy_group_actorder:
            specs.append(TensorSpec("weight_g_idx", (torch.int32,), (cols,), required=False))
        return specs

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = require_args(args, self.names[0], types=(("int", None),))
        packed = require(tensors, "weight_packed", (torch.int32,))
        shape = _weight_shape(tensors, packed)
        _check_width(packed, args.num_bits, shape[-1], layout, "weight_packed")
        scale = read_scale(tensors, args, shape)
        zero_point = None
        if not args.symmetric:
            zero_point = _read_zero_point(tensors, args, shape, layout)
        g_idx = read_g_idx(tensors, args, shape)
        return _dequantize_packed(
            packed, scale, zero_point, g_idx, args=args, length=shape[-1], layout=layout
        )

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = require_args(args, self.names[0], types=(("int", None),))
        codes, qparams = quantize_codes(weight, args, qparams)
        out = {
            "weight_packed": packing.pack(codes, args.num_bits, layout),
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
            **qparam_tensors(qparams),
        }
        if qparams.zero_point is not None:
            zero_point = qparams.zero_point.to(torch.int8)
            if _zero_point_packed(args):
                zero_point = packing.pack_along_rows(zero_point, args.num_bits, layout)
            out["weight_zero_point"] = zero_point
        return out


def _weight_shape(tensors: Mapping[str, torch.Tensor], packed: torch.Tensor) -> tuple[int, ...]:
    """The unpadded weight shape from ``weight_shape``, checked against ``weight_packed``."""
    stored = require(tensors, "weight_shape", (torch.int64, torch.int32))
    if stored.dim() != 1 or stored.numel() != packed.dim():
        raise CTRefError(
            f"expected {packed.dim()} entries (one per dimension of weight_packed), "
            f"found shape {tuple(stored.shape)}",
            tensor="weight_shape",
        )
    shape = tuple(int(v) for v in stored.tolist())
    require_matrix(shape, "weight_shape")
    if shape[:-1] != tuple(packed.shape[:-1]) or shape[-1] <= 0:
        raise CTRefError(
            f"weight_shape {list(shape)} does not fit weight_packed {tuple(packed.shape)}",
            tensor="weight_shape",
        )
    return shape


@fused
def _dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    *,
    args: QuantArgs,
    length: int,
    layout: str,
) -> torch.Tensor:
    """Unpack and dequantize in one fused pass for large weights (:mod:`ctref.compute`)."""
    codes = packing.unpack(packed, args.num_bits, length, layout)
    return qmath.dequantize(codes, scale, zero_point, args=args, g_idx=g_idx)


def _check_width(packed: torch.Tensor, bits: int, length: int, layout: str, name: str) -> None:
    """The last dimension must hold exactly the words ``length`` fields take in ``layout``."""
    expected = packing.packed_width(length, bits, layout)
    if packed.shape[-1] != expected:
        raise CTRefError(
            f"{length} values of {bits} bits take {expected} int32 words in the {layout} "
            f"layout, found {packed.shape[-1]}",
            tensor=name,
        )


def _read_zero_point(
    tensors: Mapping[str, torch.Tensor], args: QuantArgs, shape: Sequence[int], layout: str
) -> torch.Tensor:
    """Packed int32 zero points (along N) or plain int8 ones, decided by the stored dtype."""
    stored = require(tensors, "weight_zero_point", (torch.int32, torch.int8))
    if stored.dtype == torch.int8:
        check_zero_point(stored, args, shape)
        return stored
    if not _zero_point_packed(args):
        raise CTRefError(
            f"packed (int32) zero points exist for group/channel strategies only, "
            f"not '{args.strategy}'",
            tensor="weight_zero_point",
        )
    _check_width(stored.transpose(-1, -2), args.num_bits, shape[-2], layout, "weight_zero_point")
    zero_point = packing.unpack_along_rows(stored, args.num_bits, shape[-2], layout)
    qmath.check_param(zero_point, args, shape, name="weight_zero_point")
    return zero_point
