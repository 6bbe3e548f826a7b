"""``mxfp4-pack-quantized``: FP4 (E2M1) nibbles with E8M0 power-of-two group scales.

Stored per module (ct-format.md §3.5): ``weight_packed`` uint8 (..., N, K/2), the NVFP4 nibble
layout; ``weight_scale`` uint8 E8M0 codes (..., N, K/32), scale ``2^(u - 127)``. Decoding
multiplies bf16 values by bf16 scales (exact except under- and overflow) and yields bf16.

Also the E8M0 scale handling that MXFP6 and MXFP8 share. Code 255, which the format decodes as
+inf (OCP MX says NaN), is refused wherever it appears, on decode and on encode: every weight of
its group would decode to ±Inf, or to NaN where the element code is zero (0 × inf), so no group
with that scale has a finite weight. The MX rule yields it only for a group whose maximum rounds
up past the weight dtype's largest power of two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ctref import fpcodes, qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import TensorSpec, register, require
from ctref.formats.nvfp4 import (
    OUTPUT_DTYPE,
    check_columns,
    check_finite_output,
    check_float_args,
    check_weight,
    dequantize_values,
    read_fp4_packed,
    split_shape,
)

MX_STRATEGIES = ("group",)


def read_e8m0_scale(
    tensors: Mapping[str, torch.Tensor], args: QuantArgs, weight_shape: Sequence[int]
) -> torch.Tensor:
    """``weight_scale`` E8M0 codes, checked (uint8, strategy shape, no code 255), as bf16 scales."""
    codes = require(tensors, "weight_scale", (torch.uint8,))
    qmath.check_param(codes, args, weight_shape, name="weight_scale")
    if codes.numel() and bool((codes == fpcodes.E8M0_INF).any()):
        raise CTRefError(
            f"holds E8M0 code {fpcodes.E8M0_INF}, which decodes to +inf: every weight of its "
            "group would be Inf, or NaN where its code is zero (0 x inf)",
            tensor="weight_scale",
        )
    return fpcodes.e8m0_decode(codes, OUTPUT_DTYPE)


def dequantize_mx(
    stored: torch.Tensor,
    to_values: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
    cols: int,
    tensors: Mapping[str, torch.Tensor],
    args: QuantArgs,
    element_bits: int,
) -> torch.Tensor:
    """The bf16 weight of ``stored`` codes and E8M0 scales; see :func:`dequantize_values`."""
    scale = read_e8m0_scale(tensors, args, (*stored.shape[:-1], cols))
    weight = dequantize_values(stored, to_values, OUTPUT_DTYPE, cols, scale, args)
    return check_finite_output(weight, scale, element_bits, "weight_scale")


def quantize_mx(
    weight: torch.Tensor, args: QuantArgs, qparams: qmath.QParams | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized values (qmath) and the E8M0 codes of their scales.

    The scales must be powers of two that E8M0 holds exactly: ``qmath.qparams_for`` derives them
    by the MX rule when the args name ``scale_dtype: uint8``; other scales would be floored on
    storage and decode to something else than what was quantized.
    """
    qparams = qparams or qmath.qparams_for(weight, args)
    if qparams.global_scale is not None:
        raise CTRefError("MX formats have no global scale", tensor="weight_global_scale")
    scale = qparams.scale
    qmath.check_param(scale, args, weight.shape, name="weight_scale")
    codes = fpcodes.e8m0_encode(scale)
    exact = torch.equal(fpcodes.e8m0_decode(codes, scale.dtype), scale)
    if not exact or bool((codes == fpcodes.E8M0_INF).any()):
        raise CTRefError(
            "MX scales must be powers of two in [2^-127, 2^127] (E8M0); qmath.qparams_for "
            "derives them when the args say scale_dtype uint8",
            tensor="weight_scale",
        )
    return qmath.quantize(weight, scale, args=args), codes


def mx_expected_tensors(
    args: QuantArgs | None,
    format_name: str,
    bits: int,
    weight_shape: Sequence[int],
    root: str,
    codes: int,
    stored: int,
) -> list[TensorSpec]:
    """What an MX format stores: ``root`` holding ``stored`` units per ``codes`` columns
    (uint8, or FP8 codes for MXFP8), and uint8 E8M0 scales of the group shape."""
    args = check_float_args(args, format_name, bits, MX_STRATEGIES)
    lead, rows, cols = split_shape(weight_shape, tensor="weight")
    check_columns(cols, args, codes, tensor="weight")
    dtype = torch.float8_e4m3fn if bits == 8 else torch.uint8
    return [
        TensorSpec(root, (dtype,), (*lead, rows, cols // codes * stored)),
        TensorSpec("weight_scale", (torch.uint8,), qmath.param_shape(args, weight_shape)),
    ]


@register
class Mxfp4PackQuantized:
    names = ("mxfp4-pack-quantized",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """Packed codes and E8M0 scales; ``layout`` is unused."""
        return mx_expected_tensors(args, self.names[0], 4, weight_shape, "weight_packed", 2, 1)

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = check_float_args(args, self.names[0], 4, MX_STRATEGIES)
        packed = read_fp4_packed(tensors, args)
        return dequantize_mx(
            packed, fpcodes.unpack_fp4_values, 2 * packed.shape[-1], tensors, args, 4
        )

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = check_float_args(args, self.names[0], 4, MX_STRATEGIES)
        check_weight(weight, args, 2)
        values, scale_codes = quantize_mx(weight, args, qparams)
        return {
            "weight_packed": fpcodes.pack_fp4(fpcodes.encode(values, 4)),
            "weight_scale": scale_codes,
        }
