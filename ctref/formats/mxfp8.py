"""``mxfp8-quantized`` (0.15.0+): unpacked ``float8_e4m3fn`` weights with E8M0 group scales.

Stored per module (ct-format.md §3.7): ``weight`` ``float8_e4m3fn`` (..., N, K); ``weight_scale``
uint8 E8M0 codes (..., N, K/32). Decoding is ``bf16(fp8) * bf16(2^(u-127))`` in bf16, with the E8M0
rules of :mod:`ctref.formats.mxfp4`. FP8 NaN codes (0x7F, 0xFF) are refused: they would decode
to NaN weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.formats.base import TensorSpec, check_fp8_finite, register, require
from ctref.formats.mxfp4 import (
    MX_STRATEGIES,
    dequantize_mx,
    mx_expected_tensors,
    quantize_mx,
)
from ctref.formats.nvfp4 import (
    check_columns,
    check_float_args,
    check_weight,
    split_shape,
)


def _fp8_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype)


@register
class Mxfp8Quantized:
    names = ("mxfp8-quantized",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """FP8 weight and E8M0 scales; ``layout`` is unused."""
        return mx_expected_tensors(args, self.names[0], 8, weight_shape, "weight", 1, 1)

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = check_float_args(args, self.names[0], 8, MX_STRATEGIES)
        weight = require(tensors, "weight", (torch.float8_e4m3fn,))
        _, _, cols = split_shape(weight.shape, tensor="weight")
        check_columns(cols, args, 1, tensor="weight")
        check_fp8_finite(weight, "weight")
        return dequantize_mx(weight, _fp8_values, cols, tensors, args, 8)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = check_float_args(args, self.names[0], 8, MX_STRATEGIES)
        check_weight(weight, args, 1)
        codes, scale_codes = quantize_mx(weight, args, qparams)
        return {"weight": codes, "weight_scale": scale_codes}
