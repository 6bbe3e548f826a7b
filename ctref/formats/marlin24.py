"""``marlin-24``: 2:4-sparse INT4/INT8 weights in vLLM's ``gptq_marlin_24`` layout (§3.11).

Written up to 0.14.0.1, never read back by the library (it has no decoder). A module stores:

* ``weight_packed`` int32 ``(K/32, N*b/2)``: the kept codes ``S`` (N, K/2), offset to unsigned,
  transposed, cut into 16×16 tiles, permuted in runs of 1024 and packed ``32/b`` per word;
* ``meta`` int16 ``(K/32, 2N)``: which two of each four columns were kept, one nibble per group,
  scattered in CUTLASS's interleaved column-major order;
* ``scale_packed`` float16 ``(G, N)``: the transposed scales, permuted in runs of 64 for group
  strategy when ``group_size < K/2``.

Weights must be symmetric INT of 4 or 8 bits, group 128 or channel; N % 64 == 0, K % 32 == 0
(K % 128 == 0 for groups: the writer refuses a partial group).
``N`` is read from ``scale_packed`` and ``K`` from ``weight_packed``; the other tensors must fit
them. Decoding yields float16, the dtype of the scales. There is one layout: ``layout`` is unused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, lru_cache

import torch

from ctref import packing, qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats.base import TensorSpec, register, require, require_args, require_finite

GROUP_SIZE = 128
"""The only group size the kernel supports (besides channel)."""

TILE = 16
PERM_RUN = 1024
SCALE_RUN = 64
ROWS_MULTIPLE = 64
"""N must fill whole 64-row blocks: of the 1024-element permutation and of the meta reordering."""
COLS_MULTIPLE = 32
"""K must fill whole 32-column tiles (16 kept values of 2:4, two int16 meta words)."""

_INTERLEAVE = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
_GROUP_SCALE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

# Which two of four columns (i0 < i1) the 2:4 compressor keeps, by the group's non-zero pattern
# (bit c set when column c is non-zero). Exactly two non-zeros keep those; fewer take zero
# positions too; the entries for three and four non-zeros are never used (encode rejects them).
_KEPT_PAIR_BY_PATTERN = torch.tensor(
    [
        (2, 3),  # 0b0000
        (0, 2),  # 0b0001
        (1, 2),  # 0b0010
        (0, 1),  # 0b0011
        (2, 3),  # 0b0100
        (0, 2),  # 0b0101
        (1, 2),  # 0b0110
        (0, 1),  # 0b0111
        (2, 3),  # 0b1000
        (0, 3),  # 0b1001
        (1, 3),  # 0b1010
        (0, 1),  # 0b1011
        (2, 3),  # 0b1100
        (0, 3),  # 0b1101
        (1, 3),  # 0b1110
        (0, 1),  # 0b1111
    ],
    dtype=torch.int64,
)


@cache
def weight_permutation(bits: int) -> torch.Tensor:
    """``P`` of §3.11 step 6: position ``k`` of a permuted 1024-run takes element ``P[k]``."""
    perm: list[int] = []
    for i in range(32):
        col, row_base = i // 4, 2 * (i % 4)
        bases = [
            16 * row + 256 * (col // 2) + 8 * (col % 2) + 4 * block
            for block in (0, 1)
            for row in (row_base, row_base + 1, row_base + 8, row_base + 9)
        ]
        for offset in range(4):
            perm.extend(base + offset for base in bases)
    interleave = torch.tensor(_INTERLEAVE[bits])
    return torch.tensor(perm).reshape(-1, len(interleave))[:, interleave].reshape(-1)


@cache
def _inverse_weight_permutation(bits: int) -> torch.Tensor:
    return torch.argsort(weight_permutation(bits))


@cache
def group_scale_permutation() -> torch.Tensor:
    """Step 8: position ``8i + t`` of a permuted 64-run takes element ``8i + order[t]``."""
    return torch.tensor([8 * i + j for i in range(8) for j in _GROUP_SCALE_ORDER])


@cache
def _inverse_group_scale_permutation() -> torch.Tensor:
    return torch.argsort(group_scale_permutation())


@lru_cache(maxsize=64)
def meta_offsets(rows: int, words_per_row: int) -> torch.Tensor:
    """Step 3: flat index in ``meta`` of each word of the ``(rows, K/16)`` nibble-word matrix."""
    r = torch.arange(rows).unsqueeze(1).expand(rows, words_per_row)
    c = torch.arange(words_per_row).unsqueeze(0).expand(rows, words_per_row)
    dest = (
        64 * (r // 64) + 2 * (r % 2) + (r % 8) // 4 + 32 * ((r % 32) % 4 // 2) + 4 * ((r % 64) // 8)
    )
    # Swap inside 2×2 blocks so that an even destination row takes odd columns and vice versa.
    swap = ((dest % 2 == 0) & (c % 2 == 1)).long() - ((dest % 2 == 1) & (c % 2 == 0)).long()
    dest, c = dest + swap, c - swap
    return ((c // 2) * (2 * rows) + 2 * dest + c % 2).reshape(-1)


def _check_args(args: QuantArgs) -> None:
    """The kernel's limits: symmetric INT, 4 or 8 bits, group 128 or channel."""
    if args.type != "int" or args.num_bits not in _INTERLEAVE:
        raise CTRefError(
            f"marlin-24 holds 4- or 8-bit INT weights, not {args.num_bits}-bit {args.type}",
            key="num_bits",
        )
    if not args.symmetric:
        raise CTRefError("marlin-24 holds symmetric weights only", key="symmetric")
    if args.strategy not in ("group", "channel"):
        raise CTRefError(
            f"marlin-24 needs strategy 'group' or 'channel', not '{args.strategy}'",
            key="strategy",
        )
    if args.strategy == "group" and args.group_size != GROUP_SIZE:
        raise CTRefError(
            f"marlin-24 groups are {GROUP_SIZE} columns, not {args.group_size}", key="group_size"
        )


def _check_weight_shape(shape: Sequence[int], args: QuantArgs) -> tuple[int, int]:
    """``(N, K)`` of a weight that tiles: 2-D, N % 64 == 0, K % 32 == 0, whole groups."""
    if len(shape) != 2:
        raise CTRefError(f"marlin-24 holds 2-D weights, not {tuple(shape)}", tensor="weight")
    rows, cols = shape
    if rows <= 0 or rows % ROWS_MULTIPLE or cols <= 0 or cols % COLS_MULTIPLE:
        raise CTRefError(
            f"shape ({rows}, {cols}): marlin-24 tiles need N % {ROWS_MULTIPLE} == 0 and "
            f"K % {COLS_MULTIPLE} == 0",
            tensor="weight",
        )
    _check_whole_groups(cols, args, "weight")
    return rows, cols


def _check_whole_groups(cols: int, args: QuantArgs, tensor: str) -> None:
    """The writer quantizes whole groups only: a group strategy needs K % 128 == 0."""
    if args.strategy == "group" and cols % GROUP_SIZE:
        raise CTRefError(
            f"K={cols} is not a multiple of the group size {GROUP_SIZE}", tensor=tensor
        )


def _permutes_group_scales(args: QuantArgs, cols: int) -> bool:
    """The 64-run scale permutation applies to group strategy with ``group_size < K/2`` only."""
    return args.strategy == "group" and GROUP_SIZE < cols // 2


@register
class Marlin24:
    names = ("marlin-24",)

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        args = require_args(args, self.names[0])
        _check_args(args)
        rows, cols = _check_weight_shape(weight_shape, args)
        groups = qmath.param_shape(args, weight_shape)[-1]
        return [
            TensorSpec("weight_packed", (torch.int32,), (cols // 32, rows * args.num_bits // 2)),
            TensorSpec("meta", (torch.int16,), (cols // 32, 2 * rows)),
            TensorSpec("scale_packed", (torch.float16,), (groups, rows)),
        ]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        args = require_args(args, self.names[0])
        _check_args(args)
        bits = args.num_bits
        scale_packed = require(tensors, "scale_packed", (torch.float16,))
        packed = require(tensors, "weight_packed", (torch.int32,))
        if scale_packed.dim() != 2 or packed.dim() != 2:
            raise CTRefError(
                f"expected 2-D weight_packed and scale_packed, found {tuple(packed.shape)} and "
                f"{tuple(scale_packed.shape)}",
                tensor="weight_packed" if packed.dim() != 2 else "scale_packed",
            )
        rows, cols = scale_packed.shape[1], packed.shape[0] * 32
        if rows % ROWS_MULTIPLE or rows == 0:
            raise CTRefError(
                f"N={rows} (its second dimension) must be a positive multiple of {ROWS_MULTIPLE}",
                tensor="scale_packed",
            )
        if cols == 0 or packed.shape[1] != rows * bits // 2:
            raise CTRefError(
                f"expected shape (K/32, N*{bits}/2) = (K/32, {rows * bits // 2}) with K > 0, for "
                f"N={rows} read from scale_packed; found {tuple(packed.shape)}",
                tensor="weight_packed",
            )
        _check_whole_groups(cols, args, "weight_packed")
        meta = require(tensors, "meta", (torch.int16,), (cols // 32, 2 * rows))
        groups = qmath.param_shape(args, (rows, cols))[-1]
        require(tensors, "scale_packed", (torch.float16,), (groups, rows))
        require_finite(scale_packed, "scale_packed")

        kept = _unpack_kept_codes(packed, bits, rows, cols)
        codes = _expand_24(kept, _read_meta(meta, rows, cols))
        scale = _unpermute_scales(scale_packed, args, cols)
        return qmath.dequantize(codes, scale, args=args)

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        """Quantize in float16 (as the writer casts weight and scale), then lay out for the kernel.

        The quantized weight must be 2:4 sparse: at most two non-zero codes per group of four.
        """
        args = require_args(args, self.names[0])
        _check_args(args)
        rows, cols = _check_weight_shape(weight.shape, args)
        qparams = qparams or qmath.qparams_for(weight, args)
        qmath.check_param(qparams.scale, args, weight.shape, name="weight_scale")
        scale = qparams.scale.to(torch.float16)
        codes = qmath.quantize(weight.to(torch.float16), scale, args=args)
        kept, nibbles = _compress_24(codes)
        return {
            "weight_packed": _pack_kept_codes(kept, args.num_bits),
            "meta": _write_meta(nibbles, rows, cols),
            "scale_packed": _permute_scales(scale, args, cols),
        }


def _compress_24(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: the kept codes ``(N, K/2)`` and each group's nibble ``i0 | i1 << 2`` ``(N, K/4)``."""
    rows, cols = codes.shape
    groups = codes.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    counts = nonzero.sum(dim=-1)
    if bool((counts > 2).any()):
        row, group = (int(v) for v in (counts > 2).nonzero()[0])
        raise CTRefError(
            f"the quantized weight is not 2:4 sparse: row {row}, columns "
            f"{4 * group}..{4 * group + 3} hold {int(counts[row, group])} non-zero values",
            tensor="weight",
        )
    pattern = (nonzero.long() << torch.arange(4, device=codes.device)).sum(dim=-1)
    pairs = _KEPT_PAIR_BY_PATTERN.to(codes.device)[pattern]
    kept = groups.gather(-1, pairs).reshape(rows, cols // 2)
    return kept, pairs[..., 0] | (pairs[..., 1] << 2)


def _expand_24(kept: torch.Tensor, nibbles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_compress_24`: dense ``(N, K)`` codes, zeros where nothing was kept."""
    rows, half = kept.shape
    first, second = nibbles & 3, nibbles >> 2
    if bool((first >= second).any()):
        row, group = (int(v) for v in (first >= second).nonzero()[0])
        raise CTRefError(
            f"nibble {int(nibbles[row, group])} of row {row}, columns "
            f"{4 * group}..{4 * group + 3} does not name two distinct columns i0 < i1",
            tensor="meta",
        )
    dense = kept.new_zeros((rows, half // 2, 4))
    dense.scatter_(-1, torch.stack((first, second), dim=-1), kept.reshape(rows, half // 2, 2))
    return dense.reshape(rows, 2 * half)


def _write_meta(nibbles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Steps 2–3: four nibbles per int16 word, scattered to CUTLASS order: ``(K/32, 2N)``."""
    shifts = torch.arange(0, 16, 4, device=nibbles.device)
    words = (nibbles.reshape(rows, cols // 16, 4) << shifts).sum(dim=-1)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)
    meta = torch.empty(rows * cols // 16, dtype=torch.int16, device=nibbles.device)
    meta[meta_offsets(rows, cols // 16).to(nibbles.device)] = words.reshape(-1).to(torch.int16)
    return meta.reshape(cols // 32, 2 * rows)


def _read_meta(meta: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`_write_meta`: the ``(N, K/4)`` nibbles."""
    words = meta.reshape(-1)[meta_offsets(rows, cols // 16).to(meta.device)]
    words = words.to(torch.int64).reshape(rows, cols // 16, 1) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=meta.device)
    return ((words >> shifts) & 0xF).reshape(rows, cols // 4)


def _pack_kept_codes(kept: torch.Tensor, bits: int) -> torch.Tensor:
    """Steps 4–7: transpose, tile 16×16, permute each 1024-run, pack (packing adds the offset)."""
    half, rows = kept.shape[1], kept.shape[0]
    tiles = kept.t().reshape(half // TILE, TILE, rows // TILE, TILE).permute(0, 2, 1, 3)
    runs = tiles.reshape(-1, PERM_RUN)[:, weight_permutation(bits).to(kept.device)]
    return packing.pack(runs.reshape(half // TILE, rows * TILE), bits)


def _unpack_kept_codes(packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`_pack_kept_codes`: signed kept codes ``(N, K/2)``."""
    half = cols // 2
    runs = packing.unpack(packed, bits, rows * TILE).reshape(-1, PERM_RUN)
    runs = runs[:, _inverse_weight_permutation(bits).to(packed.device)]
    tiles = runs.reshape(half // TILE, rows // TILE, TILE, TILE).permute(0, 2, 1, 3)
    return tiles.reshape(half, rows).t()


def _permute_scales(scale: torch.Tensor, args: QuantArgs, cols: int) -> torch.Tensor:
    """Step 8: ``(N, G)`` scales → transposed ``(G, N)``, 64-runs permuted where they apply."""
    transposed = scale.t().contiguous()
    if not _permutes_group_scales(args, cols):
        return transposed
    runs = transposed.reshape(-1, SCALE_RUN)[:, group_scale_permutation().to(scale.device)]
    return runs.reshape(transposed.shape)


def _unpermute_scales(scale_packed: torch.Tensor, args: QuantArgs, cols: int) -> torch.Tensor:
    """Inverse of :func:`_permute_scales`: ``(N, G)`` scales."""
    if _permutes_group_scales(args, cols):
        inverse = _inverse_group_scale_permutation().to(scale_packed.device)
        scale_packed = scale_packed.reshape(-1, SCALE_RUN)[:, inverse].reshape(scale_packed.shape)
    return scale_packed.t()
