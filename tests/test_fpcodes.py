"""Low-precision float codes (ct-format.md §2.2, §3.4–3.6): FP4/FP6 tables, rounding, nibble and
FP6 packing, E8M0 scales and the MX scale rule.

Expected values are written from the bit-level definitions (sign, exponent, mantissa) and the
spec's golden vectors, not from fpcodes' own tables.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref import fpcodes

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def e2m1_value(code: int) -> float:
    """E2M1: 1 sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def e2m3_value(code: int) -> float:
    """E2M3: 1 sign, 2 exponent bits (bias 1), 3 mantissa bits; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b100000 else 1.0
    exponent, mantissa = (code >> 3) & 0b11, code & 0b111
    if exponent == 0:
        return sign * mantissa / 8
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 8)


def e4m3fn_value(code: int) -> float:
    """OCP E4M3FN: bias 7, no Inf, NaN only at exponent and mantissa all ones."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * 2.0 ** (exponent - 7) * (1 + mantissa / 8)


BIT_DEFINITION = {4: e2m1_value, 6: e2m3_value}


# --- golden vectors of the spec ------------------------------------------------------------


def test_fp4_golden_bytes():
    values = torch.tensor([0.5, -6.0, 1.5, 0.0, -0.0, 3.0, 4.0, -2.0])
    packed = fpcodes.pack_fp4(fpcodes.encode(values, 4))
    assert packed.tolist() == [0xF1, 0x03, 0x58, 0xC6]
    decoded = fpcodes.decode(fpcodes.unpack_fp4(packed), 4, torch.float32)
    assert torch.equal(decoded, values)
    assert torch.equal(torch.signbit(decoded), torch.signbit(values))


def test_fp6_golden_bytes():
    values = torch.tensor([-7.5, 0.875, 2.25, 1.0])
    packed = fpcodes.pack_fp6(fpcodes.encode(values, 6))
    assert packed.tolist() == [0xFF, 0x11, 0x21]
    assert torch.equal(fpcodes.decode(fpcodes.unpack_fp6(packed), 6, torch.float32), values)


def test_e8m0_decode_golden():
    codes = torch.tensor([0, 1, 120, 127, 128, 254, 255], dtype=torch.uint8)
    expected = [2.0**-127, 2.0**-126, 2.0**-7, 1.0, 2.0, 2.0**127, math.inf]
    for dtype in (torch.bfloat16, torch.float32):
        assert fpcodes.e8m0_decode(codes, dtype).tolist() == expected


def test_e8m0_encode_golden_floors_non_powers_of_two():
    scales = torch.tensor([1.0, 0.75, 2.0**-7, 3.0])
    assert fpcodes.e8m0_encode(scales).tolist() == [127, 126, 120, 128]


# --- every code --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6])
def test_code_table_is_the_bit_level_definition(bits):
    expected = [BIT_DEFINITION[bits](code) for code in range(2**bits)]
    table = fpcodes.code_table(bits)
    assert table.tolist() == expected
    assert torch.signbit(table).tolist() == [code >> (bits - 1) == 1 for code in range(2**bits)]


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_code_round_trips(bits, dtype):
    codes = torch.arange(2**bits, dtype=torch.uint8)
    values = fpcodes.decode(codes, bits, dtype)
    assert values.dtype == dtype
    assert torch.equal(fpcodes.encode(values, bits), codes)
    pack, unpack = (
        (fpcodes.pack_fp4, fpcodes.unpack_fp4)
        if bits == 4
        else (fpcodes.pack_fp6, fpcodes.unpack_fp6)
    )
    assert torch.equal(unpack(pack(codes)), codes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp4_byte_lookup_equals_nibble_decode(dtype):
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    fast = fpcodes.unpack_fp4_values(every_byte, dtype)
    slow = fpcodes.decode(fpcodes.unpack_fp4(every_byte), 4, dtype)
    assert fast.shape == (4, 128) and fast.dtype == dtype
    assert torch.equal(fast, slow) and torch.equal(torch.signbit(fast), torch.signbit(slow))
    low_then_high = [
        e2m1_value(nibble) for byte in range(256) for nibble in (byte & 0xF, byte >> 4)
    ]
    assert fast.flatten().tolist() == low_then_high


@given(
    lead=st.sampled_from([(), (1,), (3,)]),
    rows=st.integers(0, 4).map(lambda n: 2 * n + 1),
    units=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_are_inverse(lead, rows, units, seed):
    generator = torch.Generator().manual_seed(seed)
    fp4 = torch.randint(0, 16, (*lead, rows, 2 * units), dtype=torch.uint8, generator=generator)
    packed4 = fpcodes.pack_fp4(fp4)
    assert packed4.shape == (*lead, rows, units)
    assert torch.equal(fpcodes.unpack_fp4(packed4), fp4)
    assert torch.equal(fpcodes.pack_fp4(fpcodes.unpack_fp4(packed4)), packed4)
    fp6 = torch.randint(0, 64, (*lead, rows, 4 * units), dtype=torch.uint8, generator=generator)
    packed6 = fpcodes.pack_fp6(fp6)
    assert packed6.shape == (*lead, rows, 3 * units)
    assert torch.equal(fpcodes.unpack_fp6(packed6), fp6)
    every_byte = torch.randint(
        0, 256, (*lead, rows, 3 * units), dtype=torch.uint8, generator=generator
    )
    assert torch.equal(fpcodes.pack_fp6(fpcodes.unpack_fp6(every_byte)), every_byte)


def test_fp6_codes_sit_little_endian_in_the_triple():
    codes = torch.tensor([[0b000001, 0b000010, 0b000100, 0b100000]], dtype=torch.uint8)
    word = 1 | 2 << 6 | 4 << 12 | 32 << 18
    assert fpcodes.pack_fp6(codes).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


# --- rounding ----------------------------------------------------------------------------


def nearest_ties_to_even(magnitude: float, grid: list[float]) -> float:
    """The grid value nearest to ``magnitude``; at a midpoint the one with an even index."""
    distances = [abs(magnitude - g) for g in grid]
    best = min(distances)
    candidates = [i for i, d in enumerate(distances) if d == best]
    return grid[next((i for i in candidates if i % 2 == 0), candidates[0])]


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_to_grid_is_nearest_with_ties_to_even(bits, dtype):
    grid = fpcodes.magnitudes(bits).tolist()
    midpoints = [(a + b) / 2 for a, b in pairwise(grid)]
    probes = torch.tensor(
        grid
        + midpoints
        + [m * (1 + 2**-6) for m in midpoints]
        + [m * (1 - 2**-6) for m in midpoints]
    ).to(dtype)
    probes = torch.cat([probes, -probes])
    rounded = fpcodes.round_to_grid(probes, bits)
    expected = [math.copysign(nearest_ties_to_even(abs(v), grid), v) for v in probes.tolist()]
    assert rounded.tolist() == expected


def test_round_to_grid_zero_signs_follow_the_writer():
    """FP4 re-applies ``sign(x)`` (the library's cast_to_fp4); FP6 uses ``copysign``."""
    x = torch.tensor([-0.0, 0.0, -0.1, 0.1])
    assert torch.signbit(fpcodes.round_to_grid(x, 4)).tolist() == [False, False, True, False]
    assert torch.signbit(fpcodes.round_to_grid(x, 6)).tolist() == [True, False, True, False]


def test_encode_refuses_values_off_the_grid():
    with pytest.raises(ValueError):
        fpcodes.encode(torch.tensor([0.75]), 4)


# --- the MX scale rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("element_bits", "fraction", "rounds_up"),
    [
        (4, 0.5, False),
        (4, 0.75, True),
        (8, 0.5, False),
        (8, 0.75, True),
        (6, 0.875, False),
        (6, 0.9375, True),
    ],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mx_scale_rounds_up_at_the_element_threshold(element_bits, fraction, rounds_up, dtype):
    """§2.2: ``2^(floor(log2(R(amax))) - off)``; R rounds up at 0.75 (FP4, FP8) or 0.9375 (FP6)."""
    offset = {4: 2, 6: 2, 8: 8}[element_bits]
    for exponent in (-3, 0, 5):
        amax = torch.tensor([2.0**exponent * (1 + fraction)], dtype=dtype)
        power = exponent + 1 if rounds_up else exponent
        scale = fpcodes.mx_scale(amax, element_bits)
        assert scale.dtype == dtype
        assert scale.item() == 2.0 ** (power - offset)


def test_mx_scale_of_zero_is_the_smallest_code():
    scale = fpcodes.mx_scale(torch.zeros(1, dtype=torch.float32), 4)
    assert fpcodes.e8m0_encode(scale).tolist() == [0]


# --- why the tables are hand-written -----------------------------------------------------


def test_torch_float4_dtype_cannot_be_cast():
    """``float4_e2m1fn_x2`` is storage only: no cast exists on the CPU, so FP4 needs a table."""
    storage = torch.tensor([0x21], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises((NotImplementedError, RuntimeError)):
        storage.to(torch.float32)


def test_torch_e8m0_dtype_decodes_255_as_nan_where_the_format_says_inf():
    every_code = torch.arange(256, dtype=torch.uint8)
    by_torch = every_code.view(torch.float8_e8m0fnu).to(torch.float32)
    by_format = fpcodes.e8m0_decode(every_code, torch.float32)
    assert math.isnan(by_torch[255].item())
    assert by_format[255].item() == math.inf
    assert torch.equal(by_torch[:255], by_format[:255])


def test_torch_e8m0_cast_rounds_where_the_format_floors():
    scales = torch.tensor([0.75, 3.0])
    torch_codes = scales.to(torch.float8_e8m0fnu).view(torch.uint8)
    assert torch_codes.tolist() == [127, 129]
    assert fpcodes.e8m0_encode(scales).tolist() == [126, 128]


def test_torch_float8_e4m3fn_is_the_format():
    """Every bit pattern decodes to the OCP E4M3FN value, and casts round to nearest even."""
    every_code = torch.arange(256, dtype=torch.uint8)
    by_torch = every_code.view(torch.float8_e4m3fn).to(torch.float64).tolist()
    expected = [e4m3fn_value(code) for code in range(256)]
    for code, (got, want) in enumerate(zip(by_torch, expected, strict=True)):
        assert (math.isnan(got) and math.isnan(want)) or got == want, hex(code)
    finite = sorted({v for v in expected if not math.isnan(v) and v >= 0})
    for low, high in pairwise(finite):
        midpoint = torch.tensor([(low + high) / 2], dtype=torch.float64)
        even = low if finite.index(low) % 2 == 0 else high
        assert midpoint.to(torch.float8_e4m3fn).item() == even
