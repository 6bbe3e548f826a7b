"""``mxfp6-pack-quantized`` (0.20.0+): FP6 (E2M3) codes, four in three bytes, E8M0 scales.

Stored per module (ct-format.md §3.6): ``weight_packed`` uint8 (..., N, 3K/4)
(:func:`ctref.fpcodes.pack_fp6`); ``weight_scale`` uint8 E8M0 codes (..., N, K/32). Decoding and
the E8M0 rules are those of :mod:`ctref.formats.mxfp4`; output bf16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import fpcodes, qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import TensorSpec, register, require
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

_CODES_PER_TRIPLE = 4


@register
class Mxfp6PackQuantized:
    names = ("mxfp6-pack-quantized",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """Packed codes and E8M0 scales; ``layout`` is unused."""
        return mx_expected_tensors(
            args, self.names[0], 6, weight_shape, "weight_packed", _CODES_PER_TRIPLE, 3
        )

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = check_float_args(args, self.names[0], 6, MX_STRATEGIES)
        packed = require(tensors, "weight_packed", (torch.uint8,))
        _, _, width = split_shape(packed.shape, tensor="weight_packed")
        if width % 3:
            raise CTRefError(
                f"width {width} is not 3K/4: four FP6 codes take three bytes",
                tensor="weight_packed",
            )
        cols = width // 3 * _CODES_PER_TRIPLE
        check_columns(cols, args, _CODES_PER_TRIPLE, tensor="weight_packed")
        return dequantize_mx(packed, fpcodes.unpack_fp6_values, cols, tensors, args, 6)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = check_float_args(args, self.names[0], 6, MX_STRATEGIES)
        check_weight(weight, args, _CODES_PER_TRIPLE)
        values, scale_codes = quantize_mx(weight, args, qparams)
        return {
            "weight_packed": fpcodes.pack_fp6(fpcodes.encode(values, 6)),
            "weight_scale": scale_codes,
        }
