"""``naive-quantized`` / ``int-quantized`` / ``float-quantized``: one storage, three names.

The codes are stored unpacked: int8 (int16/int32 for wider ints; 4-bit values of W4A8 too) or
``float8_e4m3fn``, beside a model-dtype scale and, for asymmetric ints, an int8 zero point of the
scale's shape (ct-format.md §3.2). The format name only records how the writer chose it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import qmath
from ctref.compute import fused
from ctref.config import QuantArgs
from ctref.formats.base import (
    TensorSpec,
    check_codes_in_range,
    check_fp8_finite,
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


_dequantize_codes = fused(qmath.dequantize)


_STORED_TYPES = (("int", None), ("float", 8))


@register
class NaiveQuantized:
    names = ("naive-quantized", "int-quantized", "float-quantized")

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        args = require_args(args, self.names[0], types=_STORED_TYPES)
        shape = tuple(weight_shape)
        params = qmath.param_shape(args, shape)
        specs = [
            TensorSpec("weight", (qmath.code_dtype(args),), shape),
            TensorSpec("weight_scale", scale_dtypes(args), params),
        ]
        if not args.symmetric:
            specs.append(TensorSpec("weight_zero_point", (args.zp_dtype,), params))
        if args.legacy_group_actorder:
            specs.append(TensorSpec("weight_g_idx", (torch.int32,), (shape[-1],), required=False))
        return specs

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = require_args(args, self.names[0], types=_STORED_TYPES)
        codes = require(tensors, "weight", (qmath.code_dtype(args),))
        shape = tuple(codes.shape)
        require_matrix(shape, "weight")
        scale = read_scale(tensors, args, shape)
        if args.type == "int":
            check_codes_in_range(codes, args, "weight")
        else:
            check_fp8_finite(codes, "weight")
        zero_point = None
        if not args.symmetric:
            zero_point = require(tensors, "weight_zero_point", (torch.int8, args.zp_dtype))
            check_zero_point(zero_point, args, shape)
        g_idx = read_g_idx(tensors, args, shape)
        return _dequantize_codes(codes, scale, zero_point, args=args, g_idx=g_idx)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        args = require_args(args, self.names[0], types=_STORED_TYPES)
        codes, qparams = quantize_codes(weight, args, qparams)
        out = {"weight": codes.to(qmath.code_dtype(args)), **qparam_tensors(qparams)}
        if qparams.zero_point is not None:
            out["weight_zero_point"] = qparams.zero_point.to(args.zp_dtype)
        return out
