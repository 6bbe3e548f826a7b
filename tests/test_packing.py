"""Integer bit packing of pack-quantized weights and zero points (ct-format.md §3.3).

The expected words come from the spec's golden vectors and from literal tables checked here
against a tiny pure-Python bit-stream writer, never from ctref.packing itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref import packing
from ctref.errors import CTRefError

ALL_BITS = range(1, 9)
WORD_ALIGNED_BITS = (1, 2, 4, 8)
STRADDLING_BITS = (3, 5, 6, 7)


def reference_words(fields: list[int], bits: int, layout: str) -> list[int]:
    """Unsigned 32-bit words of one row of unsigned ``bits``-wide fields, written bit by bit.

    dense: field ``i`` at bit ``i * bits`` of one little-endian stream; legacy: ``32 // bits``
    whole fields per word, the top bits zero (§3.3 steps 2 and 3).
    """
    if layout == "dense":
        stream = sum(field << (index * bits) for index, field in enumerate(fields))
        return [
            (stream >> (32 * word)) & 0xFFFFFFFF for word in range(-(-len(fields) * bits // 32))
        ]
    per_word = 32 // bits
    return [
        sum(field << (slot * bits) for slot, field in enumerate(fields[start : start + per_word]))
        for start in range(0, len(fields), per_word)
    ]


def int32_words(words: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Unsigned hex words as the int32 tensor a checkpoint stores (two's complement)."""
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def unsigned(packed: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in packed.flatten()]


# ---------------------------------------------------------------------------------------------
# Golden vectors of the spec (0.20.0 verified, §3.3).

SPEC_ROWS = [
    pytest.param(4, list(range(-8, 8)), "dense", (0x76543210, 0xFEDCBA98), id="int4-full-range"),
    pytest.param(4, list(range(0, 8)), "dense", (0xFEDCBA98,), id="int4-positive"),
    pytest.param(8, [-128, 0, 127, 1, 5], "dense", (0x81FF8000, 0x00000085), id="int8"),
    pytest.param(2, [1, -2, 0, -1, 1], "dense", (0x00000363,), id="int2"),
    pytest.param(
        3,
        [-4, -3, -2, -1, 0, 1, 2, 3, 3, -4, 1],
        "dense",
        (0x47FAC688, 0x00000001),
        id="int3-dense",
    ),
    pytest.param(
        3,
        [-4, -3, -2, -1, 0, 1, 2, 3, 3, -4, 1],
        "legacy",
        (0x07FAC688, 0x00000005),
        id="int3-legacy",
    ),
]


@pytest.mark.parametrize(("bits", "values", "layout", "words"), SPEC_ROWS)
def test_spec_golden_row_packs_and_unpacks(bits, values, layout, words):
    packed = packing.pack(torch.tensor([values], dtype=torch.int8), bits, layout)
    assert packed.dtype == torch.int32
    assert unsigned(packed) == list(words)
    unpacked = packing.unpack(int32_words(words).unsqueeze(0), bits, len(values), layout)
    assert unpacked.dtype == torch.int8
    assert unpacked.tolist() == [values]


@pytest.mark.parametrize(("bits", "values", "layout", "words"), SPEC_ROWS)
def test_reference_writer_reproduces_spec_golden_rows(bits, values, layout, words):
    fields = [v + (1 << (bits - 1)) for v in values]
    assert reference_words(fields, bits, layout) == list(words)


SPEC_ZERO_POINTS = [[-8, 7], [0, 1], [3, -1]]
SPEC_ZERO_POINT_WORDS = [[0x00000B80, 0x0000079F]]


def test_spec_golden_zero_points_pack_along_rows():
    packed = packing.pack_along_rows(torch.tensor(SPEC_ZERO_POINTS, dtype=torch.int8), 4)
    assert packed.shape == (1, 2)
    assert [unsigned(column) for column in packed.T] == [[0x00000B80], [0x0000079F]]
    stored = torch.stack([int32_words(row) for row in SPEC_ZERO_POINT_WORDS])
    assert packing.unpack_along_rows(stored, 4, 3).tolist() == SPEC_ZERO_POINTS


# ---------------------------------------------------------------------------------------------
# Position-unique vectors for every width and both layouts: K = 37 (no multiple of 32 / b).
# Row 0 has fields i mod 2**b, row 1 a multiplicative hash of i, so that a wrong field order,
# a shifted offset or a row mix-up changes some word.

GOLDEN_K = 37


def counting_fields(bits: int) -> list[int]:
    return [i % 2**bits for i in range(GOLDEN_K)]


def scrambled_fields(bits: int) -> list[int]:
    return [(i * 2654435761 >> 7) % 2**bits for i in range(GOLDEN_K)]


# fmt: off
DENSE_WORDS = {
    1: (
        (0xAAAAAAAA, 0x0000000A),
        (0x4DB26D92, 0x00000016),
    ),
    2: (
        (0xE4E4E4E4, 0xE4E4E4E4, 0x000000E4),
        (0xBC5BC1AC, 0x1AF16F06, 0x000001BC),
    ),
    3: (
        (0x88FAC688, 0xC688FAC6, 0xFAC688FA, 0x00004688),
        (0x73F05598, 0xB10E5D8A, 0x1567E1AB, 0x00001CFC),
    ),
    4: (
        (0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98, 0x00043210),
        (0x740DA630, 0x2FB851EB, 0xDA730C96, 0x852EB741, 0x000963FC),
    ),
    5: (
        (0x8A418820, 0xC5A92839, 0xCA307B9A, 0x38BDAB49, 0xFFBBCDEB, 0x00418820),
        (0x00DD1A60, 0x8A85DB3D, 0x713613F6, 0x91EAAE38, 0xC165E5DC, 0x01934FEC),
    ),
    6: (
        (0x440C2040, 0xA2481C61, 0x3CE34C2C, 0x544D2450, 0xA6585D65, 0x7DE75C6D, 0x248E2860),
        (0x0D6A6CC0, 0x139B9F40, 0x08F6E8D4, 0xC341CA76, 0x711176AD, 0xE0549EAF, 0x391937EC),
    ),
    7: (
        (0x40608080, 0x880E1828, 0x68C16284, 0x88901E38, 0x58A94264, 0x668C982E, 0x3E78E9C3,
         0x446890A0, 0x00000002),
        (0xDB59B980, 0x1B4ED204, 0xDE8EA047, 0x14B6853E, 0xABB83207, 0x6DE251BB, 0xF01491E5,
         0x98D4EFEC, 0x00000003),
    ),
    8: (
        (0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C, 0x13121110, 0x17161514, 0x1B1A1918,
         0x1F1E1D1C, 0x23222120, 0x00000024),
        (0xDAE6F300, 0xA7B4C0CD, 0x75818E9B, 0x424F5B68, 0x101C2936, 0xDDEAF703, 0xABB7C4D1,
         0x7885929E, 0x46535F6C, 0x00000039),
    ),
}

LEGACY_WORDS = {
    **{bits: DENSE_WORDS[bits] for bits in WORD_ALIGNED_BITS},
    3: (
        (0x08FAC688, 0x1A23EB1A, 0x2C688FAC, 0x0011A23E),
        (0x33F05598, 0x04397629, 0x167E1ABB, 0x00073F05),
    ),
    5: (
        (0x0A418820, 0x16A4A0E6, 0x2307B9AC, 0x2F6AD272, 0x3BCDEB38, 0x062083FE, 0x00000004),
        (0x00DD1A60, 0x2A176CF4, 0x13613F68, 0x3AAB8E1C, 0x25E5DC91, 0x0D3FB305, 0x00000019),
    ),
    6: (
        (0x040C2040, 0x09207185, 0x0E34C2CA, 0x1349140F, 0x185D6554, 0x1D71B699, 0x228607DE,
         0x00000923),
        (0x0D6A6CC0, 0x0E6E7D00, 0x0F6E8D41, 0x10729D82, 0x1176ADC3, 0x127ABDC4, 0x137ECE05,
         0x00000E46),
    ),
    7: (
        (0x00608080, 0x00E18284, 0x01628488, 0x01E3868C, 0x02648890, 0x02E58A94, 0x03668C98,
         0x03E78E9C, 0x046890A0, 0x00000024),
        (0x0B59B980, 0x04ED204D, 0x0EA0471B, 0x0853EDE8, 0x020714B6, 0x0BBABB83, 0x056DE251,
         0x0F01491E, 0x08D4EFEC, 0x00000039),
    ),
}

# fmt: on

GOLDEN_TABLES = {"dense": DENSE_WORDS, "legacy": LEGACY_WORDS}
BITS_AND_LAYOUTS = [
    pytest.param(bits, layout, id=f"int{bits}-{layout}")
    for layout in packing.LAYOUTS
    for bits in ALL_BITS
]


def golden_values(bits: int) -> torch.Tensor:
    """The two golden rows as signed codes (fields minus 2**(b-1)), int8 (2, 37)."""
    fields = torch.tensor([counting_fields(bits), scrambled_fields(bits)])
    return (fields - (1 << (bits - 1))).to(torch.int8)


@pytest.mark.parametrize(("bits", "layout"), BITS_AND_LAYOUTS)
def test_golden_table_is_what_the_bit_stream_defines(bits, layout):
    rows = (counting_fields(bits), scrambled_fields(bits))
    assert (
        tuple(tuple(reference_words(f, bits, layout)) for f in rows) == GOLDEN_TABLES[layout][bits]
    )


@pytest.mark.parametrize(("bits", "layout"), BITS_AND_LAYOUTS)
def test_pack_matches_golden_words(bits, layout):
    packed = packing.pack(golden_values(bits), bits, layout)
    assert [unsigned(row) for row in packed] == [list(r) for r in GOLDEN_TABLES[layout][bits]]


@pytest.mark.parametrize(("bits", "layout"), BITS_AND_LAYOUTS)
def test_unpack_of_golden_words(bits, layout):
    stored = torch.stack([int32_words(row) for row in GOLDEN_TABLES[layout][bits]])
    assert torch.equal(packing.unpack(stored, bits, GOLDEN_K, layout), golden_values(bits))


@pytest.mark.parametrize("bits", STRADDLING_BITS)
def test_layouts_differ_for_straddling_widths_at_equal_shapes(bits):
    """K=37 at 3 bits gives 4 words both ways: only the bytes (and the version) tell them apart."""
    dense = packing.pack(golden_values(bits), bits, "dense")
    legacy = packing.pack(golden_values(bits), bits, "legacy")
    width = min(dense.shape[-1], legacy.shape[-1])
    assert not torch.equal(dense[..., :width], legacy[..., :width])
    if bits == 3:
        assert dense.shape == legacy.shape


# ---------------------------------------------------------------------------------------------
# Properties.


@st.composite
def packable(draw, max_lead: int = 2, widths: tuple[int, ...] = tuple(ALL_BITS)):
    """(values int8 (..., rows, cols), bits, layout): odd sizes, optional expert dimensions."""
    bits = draw(st.sampled_from(widths))
    layout = draw(st.sampled_from(packing.LAYOUTS))
    lead = draw(st.lists(st.integers(1, 3), max_size=max_lead))
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 97))
    seed = draw(st.integers(0, 2**31 - 1))
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(low, high + 1, (*lead, rows, cols), generator=generator)
    # Pin the range ends into the tensor: they are the fields whose top bit or sign matter.
    values.view(-1)[0] = low
    values.view(-1)[-1] = high
    return values.to(torch.int8), bits, layout


@given(packable())
def test_unpack_inverts_pack(case):
    values, bits, layout = case
    packed = packing.pack(values, bits, layout)
    assert packed.dtype == torch.int32
    assert packed.shape == (
        *values.shape[:-1],
        packing.packed_width(values.shape[-1], bits, layout),
    )
    assert torch.equal(packing.unpack(packed, bits, values.shape[-1], layout), values)


@given(packable(max_lead=0))
def test_pack_matches_reference_writer(case):
    values, bits, layout = case
    packed = packing.pack(values, bits, layout)
    for row, words in zip(values.tolist(), packed, strict=True):
        fields = [v + (1 << (bits - 1)) for v in row]
        assert unsigned(words) == reference_words(fields, bits, layout)


@given(packable(widths=WORD_ALIGNED_BITS))
def test_layouts_identical_for_word_aligned_widths(case):
    values, bits, _ = case
    assert torch.equal(packing.pack(values, bits, "dense"), packing.pack(values, bits, "legacy"))


@given(st.integers(1, 8), st.integers(1, 4096))
def test_packed_width_formulas(bits, length):
    assert packing.packed_width(length, bits, "dense") == math.ceil(length * bits / 32)
    assert packing.packed_width(length, bits, "legacy") == math.ceil(length / (32 // bits))


@pytest.mark.parametrize("layout", packing.LAYOUTS)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("error", [-1, 1])
def test_unpack_of_a_wrong_width_raises(bits, layout, error):
    width = packing.packed_width(GOLDEN_K, bits, layout) + error
    with pytest.raises(CTRefError, match=f"{GOLDEN_K} values of {bits} bits take"):
        packing.unpack(torch.zeros(2, width, dtype=torch.int32), bits, GOLDEN_K, layout)


@pytest.mark.parametrize("bits", [0, 9])
def test_widths_outside_one_to_eight_raise(bits):
    with pytest.raises(CTRefError, match="1 to 8 bits"):
        packing.pack(torch.zeros(1, 4, dtype=torch.int8), bits)
    with pytest.raises(CTRefError, match="1 to 8 bits"):
        packing.unpack(torch.zeros(1, 1, dtype=torch.int32), bits, 4)


@given(packable())
def test_zero_points_round_trip_along_rows(case):
    values, bits, layout = case
    packed = packing.pack_along_rows(values, bits, layout)
    *lead, rows, groups = values.shape
    assert packed.shape == (*lead, packing.packed_width(rows, bits, layout), groups)
    assert packed.is_contiguous()
    assert torch.equal(packing.unpack_along_rows(packed, bits, rows, layout), values)
    # Column g of the packed zero points is the packed column g of the values.
    assert torch.equal(packed[..., 0], packing.pack(values[..., 0], bits, layout))
