"""Element and scale codes of the low-precision float types: E2M1 (FP4), E2M3 (FP6), E8M0.

Hand-written tables, because torch's own dtypes do not carry the format's semantics here:
``float4_e2m1fn_x2`` is storage-only (no casts at all), and ``float8_e8m0fnu`` decodes code 255 as
NaN where the format decodes +inf (torch-and-gpu-notes.md; ct-format.md §3.5). FP8 E4M3 is
``torch.float8_e4m3fn``, whose casts are the format's.

Also the one copy of the sub-byte layouts: FP4 nibbles (two codes a byte, low nibble first) and
FP6 triples (four codes in three little-endian bytes).
"""

from __future__ import annotations

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""FP4 magnitude of index 0..7; a code is ``sign << 3 | index`` (§3.4)."""

E2M3_MAGNITUDES = tuple(
    [m / 8 for m in range(8)] + [(1 + m / 8) * 2 ** (e - 1) for e in range(1, 4) for m in range(8)]
)
"""FP6 magnitude of index 0..31 (subnormals m/8, then 1…7.5); a code is ``sign << 5 | index``."""

_MAGNITUDES = {4: E2M1_MAGNITUDES, 6: E2M3_MAGNITUDES}
_SIGN_BIT = {4: 3, 6: 5}

MX_ELEMENT_OFFSET = {4: 2, 6: 2, 8: 8}
"""floor(log2(max)) of each MX element type: E2M1 6.0, E2M3 7.5, E4M3 448 (§2.2)."""

_MX_ROUNDING_MANTISSA = {4: 1, 6: 3, 8: 1}
"""Mantissa width that sets where an MX scale rounds up to the next power of two (§2.2)."""


def magnitudes(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The element type's non-negative grid as float32."""
    return torch.tensor(_MAGNITUDES[bits], dtype=torch.float32, device=device)


def code_table(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Value of every code (``2 ** bits`` entries, float32, exact): positives then negatives."""
    grid = magnitudes(bits, device)
    return torch.cat([grid, -grid])


def decode(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Element values of integer ``codes`` (sign bit on top), exact in ``dtype``."""
    table = code_table(bits, codes.device).to(dtype)
    flat = table.index_select(0, codes.reshape(-1).to(torch.int32))
    return flat.reshape(codes.shape)


def round_to_grid(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round already-clamped values to the nearest FP4/FP6 value, ties to even (§2.2).

    The sign is re-applied as the writer does, which differs for -0.0: FP4 multiplies by
    ``sign(x)`` (a small negative value becomes -0.0, -0.0 itself +0.0), FP6 uses ``copysign``
    (-0.0 stays -0.0). Both zeros decode to zero, but their codes differ (sign bit).
    """
    grid = magnitudes(bits, x.device).to(x.dtype)
    midpoints = (grid[1:] + grid[:-1]) / 2
    magnitude = x.abs()
    index = torch.bucketize(magnitude, midpoints)
    at_midpoint = magnitude == midpoints[index.clamp(max=midpoints.numel() - 1)]
    index = torch.where(at_midpoint & (index % 2 == 1), index + 1, index)
    if bits == 4:
        return grid[index] * torch.sign(x)
    return torch.copysign(grid[index], x)


def encode(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8) of values that lie on the grid; the sign bit follows the value's sign bit."""
    grid = magnitudes(bits, values.device)
    magnitude = values.abs().to(torch.float32)
    index = torch.bucketize(magnitude, grid)
    if not torch.equal(grid[index.clamp(max=grid.numel() - 1)], magnitude):
        raise ValueError(f"values off the FP{bits} grid cannot be encoded")
    negative = torch.signbit(values).to(torch.uint8)
    return (negative << _SIGN_BIT[bits]) | index.to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack FP4 codes (..., K), K even, two a byte: byte ``j`` = ``code[2j] | code[2j+1] << 4``."""
    pairs = codes.to(torch.uint8).unflatten(-1, (codes.shape[-1] // 2, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """FP4 codes (..., 2W) of uint8 bytes (..., W): low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def unpack_fp4_values(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP4 values (..., 2W) in ``dtype`` (2 or 4 bytes wide) of uint8 bytes (..., W).

    Equal to ``decode(unpack_fp4(packed), 4, dtype)``, but looks each byte up once in a 256-entry
    table of value pairs (one gather per byte instead of two unpacks and a gather per code).
    """
    byte_values = torch.arange(256, dtype=torch.uint8, device=packed.device).unsqueeze(-1)
    pairs = decode(unpack_fp4(byte_values), 4, dtype)
    pair_as_word = pairs.view({2: torch.int32, 4: torch.int64}[pairs.element_size()]).squeeze(-1)
    words = pair_as_word.index_select(0, packed.reshape(-1).to(torch.int32))
    return words.view(dtype).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def unpack_fp6_values(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP6 values (..., 4W/3) in ``dtype`` of packed bytes (..., W)."""
    return decode(unpack_fp6(packed), 6, dtype)


_FP6_SHIFTS = (0, 6, 12, 18)
_TRIPLE_BYTE_SHIFTS = (0, 8, 16)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """Pack FP6 codes (..., K), K % 4 == 0, into (..., 3K/4) bytes.

    Four codes form a 24-bit little-endian word ``c0 | c1 << 6 | c2 << 12 | c3 << 18``, stored as
    its three bytes, low byte first (§3.6).
    """
    quads = codes.to(torch.int32).unflatten(-1, (codes.shape[-1] // 4, 4))
    shifts = torch.tensor(_FP6_SHIFTS, dtype=torch.int32, device=codes.device)
    word = (quads << shifts).sum(dim=-1, dtype=torch.int32)
    byte_shifts = torch.tensor(_TRIPLE_BYTE_SHIFTS, dtype=torch.int32, device=codes.device)
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_fp6(packed: torch.Tensor) -> torch.Tensor:
    """FP6 codes (..., 4W/3) of uint8 bytes (..., W), W % 3 == 0; inverse of :func:`pack_fp6`."""
    triples = packed.to(torch.int32).unflatten(-1, (packed.shape[-1] // 3, 3))
    byte_shifts = torch.tensor(_TRIPLE_BYTE_SHIFTS, dtype=torch.int32, device=packed.device)
    word = (triples << byte_shifts).sum(dim=-1, dtype=torch.int32)
    shifts = torch.tensor(_FP6_SHIFTS, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & 0x3F).to(torch.uint8).flatten(-2)


E8M0_INF = 255
"""The E8M0 code the format decodes as +inf (OCP MX says NaN); see :func:`e8m0_table`."""


def e8m0_table(device: torch.device | str | None = None) -> torch.Tensor:
    """Value of every E8M0 code as float32: ``2 ** (u - 127)``, with 0 → 2^-127, 255 → +inf."""
    exponents = torch.arange(256, dtype=torch.float64, device=device) - 127
    return torch.pow(2.0, exponents).to(torch.float32)


def e8m0_decode(codes: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Scale values of uint8 E8M0 codes (code 255 is +inf, as the format decodes it)."""
    return e8m0_table(codes.device).to(dtype)[codes.to(torch.int64)]


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 code of a float scale: ``127 + floor(log2(scale))`` clamped to [0, 255] (§3.5)."""
    exponent = 127 + torch.floor(torch.log2(scale.to(torch.float32)))
    return exponent.clamp(0, 255).to(torch.uint8)


def round_to_power_of_two(x: torch.Tensor, element_bits: int) -> torch.Tensor:
    """The MX rule's power of two for a group maximum (§2.2).

    Adds half an element-mantissa step to the bit pattern and clears the mantissa: the power
    rounds up at a mantissa fraction of 0.75 (FP4, FP8) or 0.9375 (FP6), else down.
    """
    info = torch.finfo(x.dtype)
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[
        x.dtype
    ]
    exponent_bits = info.bits - 1 - mantissa_bits
    wide = torch.int64 if info.bits == 64 else torch.int32
    storage = {16: torch.int16, 32: torch.int32, 64: torch.int64}[info.bits]
    pattern = x.view(storage).to(wide)
    if info.bits == 16:
        pattern = pattern & 0xFFFF
    step = 1 << (mantissa_bits - _MX_ROUNDING_MANTISSA[element_bits] - 1)
    sign_and_exponent = ((1 << (exponent_bits + 1)) - 1) << mantissa_bits
    rounded = (pattern + step) & sign_and_exponent
    return rounded.to(storage).view(x.dtype)


def mx_scale(amax: torch.Tensor, element_bits: int) -> torch.Tensor:
    """MX group scale (a power of two, in ``amax``'s dtype) for group maxima ``amax`` (§2.2)."""
    exponent = 127 + torch.floor(torch.log2(round_to_power_of_two(amax, element_bits)))
    code = torch.round(torch.clamp(exponent - MX_ELEMENT_OFFSET[element_bits], 0, 255))
    return torch.pow(2.0, code.to(torch.float32) - 127).to(amax.dtype)
