"""``sparse-bitmask``: unstructured sparsity, a bitmask plus the non-zero values (§3.9).

A module stores ``shape`` (int64 ``[N, K]``), ``compressed`` (the non-zero values in row-major
order), ``bitmask`` (uint8 ``(N, cdiv(K, 8))``, bit ``j`` of byte ``k`` ↔ column ``8k + j``) and
``row_offsets`` (int64, exclusive prefix sum of the per-row counts). The names carry no
``weight_`` prefix.

Sparsity knows nothing of quantization: ``compressed`` holds whatever the weight held — float
values, or fp8/int8 codes when the checkpoint stacks sparsity on quantization. ``decode`` returns
the dense tensor in the dtype of ``compressed``; the caller then dequantizes those codes with the
quantization format (sparsity first, then quantization, §3.0 step 5). So these formats take
``args=None`` (anything else is a caller's mistake: ValueError) and have one layout (``layout`` is
unused). The bitmask helpers here are shared with ``sparse-24-bitmask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import TensorSpec, register, require

VALUE_DTYPES = (
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.int8,
)
"""What ``compressed`` may hold: a model-dtype weight, or the codes of an fp8/int8 weight."""

_SHAPE_DTYPES = (torch.int64, torch.int32)
_BITS = torch.arange(8, dtype=torch.uint8)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def require_no_args(args: QuantArgs | None, format_name: str) -> None:
    """Sparsity formats decode values, not quantization: the caller dequantizes afterwards."""
    if args is not None:
        raise ValueError(
            f"format '{format_name}' takes args=None; dequantize its decoded codes with the "
            "quantization format afterwards"
        )


def bitmask_width(cols: int) -> int:
    return -(-cols // 8)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(N, K)`` → uint8 ``(N, cdiv(K, 8))``, LSB first (numpy ``bitorder="little"``)."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8))
    bits = padded.reshape(rows, -1, 8) << _BITS.to(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 ``(N, cdiv(K, 8))`` → bool ``(N, K)``; CTRefError if a padding bit is set."""
    bits = (bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1
    mask = bits.flatten(-2).to(torch.bool)
    if bool(mask[:, cols:].any()):
        raise CTRefError(
            f"bits past column {cols} of each row's last byte must be 0", tensor="bitmask"
        )
    return mask[:, :cols]


def read_dense_shape(
    tensors: Mapping[str, torch.Tensor], stored_shape: tuple[int, ...]
) -> tuple[int, int]:
    """``[N, K]`` from the ``shape`` tensor, which must be stored as ``stored_shape``."""
    shape = require(tensors, "shape", _SHAPE_DTYPES, stored_shape)
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows <= 0 or cols <= 0:
        raise CTRefError(f"dimensions must be positive, found [{rows}, {cols}]", tensor="shape")
    return rows, cols


def read_bitmask(tensors: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The bool ``(N, K)`` mask of stored positions, checked against the shape."""
    bitmask = require(tensors, "bitmask", (torch.uint8,), (rows, bitmask_width(cols)))
    return unpack_bitmask(bitmask, cols)


def scatter_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zeros of ``values.dtype`` with ``values`` placed at ``mask``'s set positions, row-major.

    Works on the raw bits (an integer view of the same width), so fp8 and -0.0 come back exactly.
    """
    bits_dtype = _SAME_SIZE_INT[values.element_size()]
    dense = torch.zeros(mask.shape, dtype=bits_dtype, device=values.device)
    dense = dense.masked_scatter(mask.to(values.device), values.reshape(-1).view(bits_dtype))
    return dense.view(values.dtype)


def gather_values(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The elements of ``weight`` at ``mask``'s set positions, row-major, bits unchanged."""
    bits_dtype = _SAME_SIZE_INT[weight.element_size()]
    return weight.view(bits_dtype)[mask].view(weight.dtype)


def matrix_shape(
    args: QuantArgs | None, shape: Sequence[int], format_name: str
) -> tuple[int, int]:
    """``(N, K)`` of a weight the format stores: no quantization args, and 2-D, as the writer
    compresses Linear weights only."""
    require_no_args(args, format_name)
    if len(shape) != 2:
        raise CTRefError(
            f"format '{format_name}' compresses 2-D weights, found shape {tuple(shape)}",
            tensor="weight",
        )
    rows, cols = shape
    return rows, cols


def check_weight(
    weight: torch.Tensor, args: QuantArgs | None, format_name: str
) -> tuple[int, int]:
    """``(N, K)`` of a weight to encode (:func:`matrix_shape`) in a dtype ``compressed`` holds."""
    rows, cols = matrix_shape(args, weight.shape, format_name)
    if weight.dtype not in VALUE_DTYPES:
        raise CTRefError(
            f"format '{format_name}' cannot store dtype {weight.dtype}", tensor="weight"
        )
    return rows, cols


@register
class SparseBitmask:
    names = ("sparse-bitmask",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """``compressed`` has no fixed shape: its length is the number of non-zeros."""
        rows, cols = matrix_shape(args, weight_shape, self.names[0])
        return [
            TensorSpec("shape", (torch.int64,), (2,)),
            TensorSpec("compressed", VALUE_DTYPES, None),
            TensorSpec("bitmask", (torch.uint8,), (rows, bitmask_width(cols))),
            TensorSpec("row_offsets", (torch.int64,), (rows,)),
        ]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        require_no_args(args, self.names[0])
        rows, cols = read_dense_shape(tensors, (2,))
        mask = read_bitmask(tensors, rows, cols)
        values = require(tensors, "compressed", VALUE_DTYPES)
        count = int(mask.sum())
        if values.dim() != 1 or values.numel() != count:
            raise CTRefError(
                f"the bitmask marks {count} stored values, so expected shape ({count},), "
                f"found {tuple(values.shape)}",
                tensor="compressed",
            )
        _check_row_offsets(tensors, mask)
        return scatter_values(values, mask)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keep every element that compares unequal to 0 (-0.0 is dropped, as the writer does)."""
        check_weight(weight, args, self.names[0])
        mask = weight != 0
        counts = mask.sum(dim=-1)
        return {
            "shape": torch.tensor(weight.shape, dtype=torch.int64),
            "compressed": gather_values(weight, mask),
            "bitmask": pack_bitmask(mask),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }


def _check_row_offsets(tensors: Mapping[str, torch.Tensor], mask: torch.Tensor) -> None:
    """``row_offsets`` is redundant, so a value that disagrees with the bitmask is corruption."""
    offsets = require(tensors, "row_offsets", (torch.int64,), (mask.shape[0],))
    counts = mask.sum(dim=-1)
    expected = torch.cumsum(counts, 0) - counts
    if not torch.equal(offsets.to(expected.device), expected):
        row = int((offsets.to(expected.device) != expected).nonzero()[0])
        raise CTRefError(
            f"must be the exclusive prefix sum of the bitmask's per-row counts; row {row} "
            f"holds {int(offsets[row])}, the bitmask gives {int(expected[row])}",
            tensor="row_offsets",
        )
