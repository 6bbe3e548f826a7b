"""``sparse-24-bitmask``: 2:4 sparsity, two values kept per group of four (ct-format.md §3.10).

Stores ``shape`` (int64, **(2, 1)**), ``compressed`` ``(N, K/2)`` (the kept values, row-major) and
``bitmask`` (uint8 ``(N, cdiv(K, 8))``, same bit order as ``sparse-bitmask``). Every group of four
consecutive columns has exactly two bits set; a set bit may mark a stored 0.

As with ``sparse-bitmask``, ``compressed`` may hold fp8/int8 codes of a quantized weight:
``decode`` returns them densely in their own dtype and the caller dequantizes afterwards, so this
format takes ``args=None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import TensorSpec, register, require
from ctref.formats.sparse_bitmask import (
    VALUE_DTYPES,
    bitmask_width,
    check_weight,
    gather_values,
    matrix_shape,
    pack_bitmask,
    read_bitmask,
    read_dense_shape,
    require_no_args,
    scatter_values,
)

GROUP = 4
KEPT = 2


def _check_whole_groups(cols: int, tensor: str) -> None:
    if cols % GROUP:
        raise CTRefError(
            f"2:4 sparsity needs K divisible by {GROUP}, found K={cols}", tensor=tensor
        )


def keep_mask(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask of the two largest magnitudes in each group of four, as the writer picks them.

    The magnitude is ``abs`` in the weight's own dtype; FP8 is compared through its int8 bit
    pattern, so a negative fp8 value ranks by ``128 - |bits|`` and int8 ``abs(-128)`` stays
    -128, the smallest (both quirks of the writer, kept for identical bytes). Ties, including
    the zeros picked when a group has fewer than two non-zeros, fall as ``torch.topk`` on the
    CPU lets them fall (e.g. all zeros keep columns 2 and 3); tests pin the full tie table.
    """
    magnitude = weight.view(torch.int8) if weight.dtype == torch.float8_e4m3fn else weight
    groups = magnitude.reshape(-1, GROUP).abs().cpu()
    chosen = groups.topk(KEPT, dim=1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.reshape(weight.shape).to(weight.device)


@register
class Sparse24Bitmask:
    names = ("sparse-24-bitmask",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        rows, cols = matrix_shape(args, weight_shape, self.names[0])
        return [
            TensorSpec("shape", (torch.int64,), (2, 1)),
            TensorSpec("compressed", VALUE_DTYPES, (rows, cols // 2)),
            TensorSpec("bitmask", (torch.uint8,), (rows, bitmask_width(cols))),
        ]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        require_no_args(args, self.names[0])
        rows, cols = read_dense_shape(tensors, (2, 1))
        _check_whole_groups(cols, "shape")
        mask = read_bitmask(tensors, rows, cols)
        per_group = mask.reshape(rows, -1, GROUP).sum(dim=-1)
        wrong = (per_group != KEPT).nonzero()
        if wrong.numel():
            row, group = (int(v) for v in wrong[0])
            raise CTRefError(
                f"every group of {GROUP} columns must have exactly {KEPT} bits set; row {row}, "
                f"columns {GROUP * group}..{GROUP * group + GROUP - 1} have "
                f"{int(per_group[row, group])}",
                tensor="bitmask",
            )
        values = require(tensors, "compressed", VALUE_DTYPES, (rows, cols // 2))
        return scatter_values(values, mask)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keep the two largest magnitudes of each group of four (:func:`keep_mask`)."""
        rows, cols = check_weight(weight, args, self.names[0])
        _check_whole_groups(cols, "weight")
        mask = keep_mask(weight)
        return {
            "shape": torch.tensor(weight.shape, dtype=torch.int64).reshape(2, 1),
            "compressed": gather_values(weight, mask).reshape(rows, cols // 2),
            "bitmask": pack_bitmask(mask),
        }
