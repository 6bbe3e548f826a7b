"""Integer bit packing of pack-quantized weights and zero points (ct-format.md §3.3).

Two layouts exist and only the writer's ``version`` tells them apart:

* ``dense`` (written since 0.18.0): a row is one little-endian bit stream, field ``i`` at bits
  ``[i*b, i*b+b)``, cut into ``cdiv(K*b, 32)`` int32 words; a field may straddle two words.
* ``legacy`` (up to 0.17.1): each word holds ``32 // b`` whole fields, the top ``32 mod b`` bits
  zero; ``cdiv(K, 32 // b)`` words.

For b in {1, 2, 4, 8} both give identical bytes. Stored fields are ``q + 2**(b-1)`` (unsigned);
values come back signed, as int8.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ctref.errors import CTRefError

LAYOUTS = ("dense", "legacy")
_WORD = 32
_WORD_MASK = (1 << _WORD) - 1


def packed_width(length: int, bits: int, layout: str) -> int:
    """Number of int32 words that hold ``length`` fields of ``bits`` bits in ``layout``."""
    _check(bits, layout)
    if layout == "dense":
        return math.ceil(length * bits / _WORD)
    return math.ceil(length / (_WORD // bits))


def pack(values: torch.Tensor, bits: int, layout: str = "dense") -> torch.Tensor:
    """Pack signed ``values`` (..., K) along the last dimension into int32 words."""
    _check(bits, layout)
    length = values.shape[-1]
    fields = values.to(torch.int64) + (1 << (bits - 1))
    if _WORD % bits == 0 or layout == "legacy":
        per_word = _WORD // bits
        grouped = _pad_last(fields, per_word).unflatten(-1, (-1, per_word))
        shifts = torch.arange(per_word, device=values.device) * bits
        words = (grouped << shifts).sum(dim=-1)
    else:
        low, shift = _straddle_plan(bits, values.device)
        chunks = _pad_last(fields, _WORD).unflatten(-1, (-1, _WORD))
        words = chunks.new_zeros((*chunks.shape[:-1], bits + 1))
        words.index_add_(-1, low, (chunks << shift) & _WORD_MASK)
        words.index_add_(-1, low + 1, chunks >> (_WORD - shift))
        words = words[..., :bits].flatten(-2)[..., : packed_width(length, bits, layout)]
    return _to_int32(words)


def unpack(packed: torch.Tensor, bits: int, length: int, layout: str = "dense") -> torch.Tensor:
    """Signed int8 values (..., length) of int32 ``packed`` words (..., W); W must fit length."""
    _check(bits, layout)
    expected = packed_width(length, bits, layout)
    if packed.shape[-1] != expected:
        raise CTRefError(
            f"{length} values of {bits} bits take {expected} int32 words in the {layout} "
            f"layout, found {packed.shape[-1]}"
        )
    mask = (1 << bits) - 1
    if _WORD % bits == 0 or layout == "legacy":
        # Whole fields per word: int32 shifts suffice, the mask drops the sign extension. One
        # fused kernel when compiled (measured faster on CPU than splitting bytes into planes).
        per_word = _WORD // bits
        shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
        fields = ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)
    else:
        low, shift = _straddle_plan(bits, packed.device)
        words = packed.to(torch.int64) & _WORD_MASK
        chunks = _pad_last(words, bits).unflatten(-1, (-1, bits))
        chunks = torch.nn.functional.pad(chunks, (0, 1))
        pairs = chunks[..., low] | (chunks[..., low + 1] << _WORD)
        fields = ((pairs >> shift) & mask).flatten(-2)
    # int8 arithmetic: for 8 bits, fields above 127 wrap on the cast and wrap back on the
    # subtraction (two's complement), landing exactly on u - 128.
    return fields[..., :length].to(torch.int8) - (1 << (bits - 1))


def pack_along_rows(values: torch.Tensor, bits: int, layout: str = "dense") -> torch.Tensor:
    """Pack (..., N, G) column by column along N: the zero-point layout, shape (..., W, G)."""
    return pack(values.transpose(-1, -2), bits, layout).transpose(-1, -2).contiguous()


def unpack_along_rows(
    packed: torch.Tensor, bits: int, rows: int, layout: str = "dense"
) -> torch.Tensor:
    """Inverse of :func:`pack_along_rows`: (..., W, G) words → (..., rows, G) int8 values."""
    return unpack(packed.transpose(-1, -2), bits, rows, layout).transpose(-1, -2)


def _check(bits: int, layout: str) -> None:
    if not 1 <= bits <= 8:
        raise CTRefError(f"pack-quantized holds 1 to 8 bits, not {bits}", key="num_bits")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packing layout {layout!r}; expected one of {LAYOUTS}")


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


@lru_cache(maxsize=None)
def _straddle_plan_cpu(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(_WORD, dtype=torch.int64) * bits
    return offsets // _WORD, offsets % _WORD


def _straddle_plan(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 fields of a ``bits``-word chunk: each field's first word and bit offset."""
    low, shift = _straddle_plan_cpu(bits)
    return low.to(device), shift.to(device)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit words held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << _WORD), words).to(torch.int32)
