"""``dense``: weights stored unchanged in the model dtype (ct-format.md §3.1).

Fake-quant saves may still carry ``weight_scale`` / ``weight_zero_point`` beside a float weight;
the weight is already dequantized, so they are not applied again (§8 trap 12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.formats.base import FLOAT_DTYPES, TensorSpec, register, require


@register
class Dense:
    names = ("dense",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        return [TensorSpec("weight", FLOAT_DTYPES, tuple(weight_shape))]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        return require(tensors, "weight", FLOAT_DTYPES)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        return {"weight": weight}
