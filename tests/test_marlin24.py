"""marlin-24 (ct-format.md §3.11): golden layouts derived by hand and from a literal oracle.

The library has no marlin-24 decoder. Here the layout is pinned twice, independently of the module:
by a few words worked out by hand from the spec's formulas, and by ``spec_layout``, a scalar,
loop-by-loop transcription of §3.11 steps 2–8. The weights have position-unique values (distinct
odd codes per row, a distinct power-of-two scale and sign per row), so a decoder with any
permutation wrong scrambles them. tests/legacy/test_legacy_peer.py checks the same module against
the 0.14.0.1 writer byte for byte.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats import get_format
from ctref.formats.marlin24 import meta_offsets, weight_permutation

MARLIN = get_format("marlin-24")

# §3.11 step 2: the columns kept for each group with fewer than two non-zeros.
SPEC_PAIRS = {(): (2, 3), (3,): (2, 3), (2,): (2, 3), (1,): (1, 2), (0,): (0, 2)}
PATTERNS = [(), (0,), (1,), (2,), (3,), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def marlin_args(bits: int, strategy: str) -> QuantArgs:
    group_size = 128 if strategy == "group" else None
    return QuantArgs.from_dict(
        {"num_bits": bits, "strategy": strategy, "group_size": group_size}, key="weights"
    )


def spec_permutation(bits: int) -> list[int]:
    """§3.11 step 6, word for word."""
    perm: list[int] = []
    for i in range(32):
        col = i // 4
        co = col // 2
        bases = []
        for blk in (0, 1):
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1):
                bases.append(16 * row + 256 * co + 8 * (col % 2) + 4 * blk)
        for jj in range(4):
            perm += [base + jj for base in bases]
    order = (0, 2, 4, 6, 1, 3, 5, 7) if bits == 4 else (0, 2, 1, 3)
    n = len(order)
    return [perm[n * (k // n) + order[k % n]] for k in range(1024)]


def spec_layout(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, permute_scales: bool
) -> dict[str, torch.Tensor]:
    """§3.11 steps 2–8 in scalar loops: what the writer stores for integer ``codes`` (N, K)."""
    rows, cols = codes.shape
    c = codes.tolist()
    kept = [[0] * (cols // 2) for _ in range(rows)]
    words = [[0] * (cols // 16) for _ in range(rows)]
    for r in range(rows):
        for j in range(cols // 4):
            group = c[r][4 * j : 4 * j + 4]
            nonzero = tuple(i for i in range(4) if group[i] != 0)
            i0, i1 = nonzero if len(nonzero) == 2 else SPEC_PAIRS[nonzero]
            kept[r][2 * j], kept[r][2 * j + 1] = group[i0], group[i1]
            words[r][j // 4] |= (i0 | i1 << 2) << 4 * (j % 4)
    meta = [0] * (rows * cols // 16)
    for r in range(rows):
        for col in range(cols // 16):
            dr = (
                64 * (r // 64)
                + 2 * (r % 2)
                + (r % 8) // 4
                + 32 * ((r % 32) % 4 // 2)
                + 4 * ((r % 64) // 8)
            )
            cc = col
            if dr % 2 == 0 and cc % 2 == 1:
                dr, cc = dr + 1, cc - 1
            elif dr % 2 == 1 and cc % 2 == 0:
                dr, cc = dr - 1, cc + 1
            meta[(cc // 2) * (2 * rows) + 2 * dr + cc % 2] = words[r][col]
    meta = [w - (1 << 16) if w >= 1 << 15 else w for w in meta]

    offset = 1 << (bits - 1)
    transposed = [[kept[n][k] + offset for n in range(rows)] for k in range(cols // 2)]
    perm = spec_permutation(bits)
    per_word = 32 // bits
    packed = []
    for a in range(cols // 32):
        old = [
            transposed[16 * a + rr][16 * tb + cc]
            for tb in range(rows // 16)
            for rr in range(16)
            for cc in range(16)
        ]
        new = [old[1024 * (k // 1024) + perm[k % 1024]] for k in range(len(old))]
        row = []
        for w in range(len(new) // per_word):
            word = sum(new[w * per_word + f] << (f * bits) for f in range(per_word))
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        packed.append(row)

    groups = scale.shape[1]
    flat = [v for row in scale.t().tolist() for v in row]
    if permute_scales:
        order = (0, 4, 1, 5, 2, 6, 3, 7)
        flat = [flat[64 * (p // 64) + 8 * ((p % 64) // 8) + order[p % 8]] for p in range(len(flat))]
    return {
        "weight_packed": torch.tensor(packed, dtype=torch.int32),
        "meta": torch.tensor(meta, dtype=torch.int16).reshape(cols // 32, 2 * rows),
        "scale_packed": torch.tensor(flat, dtype=torch.float16).reshape(groups, rows),
    }


def unique_codes(bits: int, rows: int, cols: int) -> torch.Tensor:
    """2:4 codes cycling through every pattern of at most two non-zeros per group.

    8 bits: each row's non-zeros are distinct odd numbers (for K <= 128), positive in rows < 32
    and negative after; with the row's power-of-two scale (:func:`unique_scales`) every value
    names its row and column. 4 bits has too few codes for that; its codes still vary with the
    position.
    """
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    for r in range(rows):
        if bits == 8:
            sign = 1 if r % 64 < 32 else -1
            values = [sign * (2 * t + 1) for t in range(64)]
        else:
            values = [(t + r) % 15 - 7 or 7 for t in range(15)]
        t = 0
        for j in range(cols // 4):
            for i in PATTERNS[(r + j) % len(PATTERNS)]:
                codes[r, 4 * j + i] = values[t % len(values)]
                t += 1
    return codes


def unique_scales(rows: int, groups: int) -> torch.Tensor:
    """Positive fp16 scales whose products with codes are exact.

    One group (channel): 2^(r % 32 - 23), a distinct power of two for each row of a sign (a
    subnormal product of an integer and 2^-23 is still exact). Several groups: 2^(r % 16 - 8)
    times 1 + g/8, all products normal.
    """
    if groups == 1:
        return torch.exp2(torch.tensor([[r % 32 - 23.0] for r in range(rows)])).to(torch.float16)
    exponents = torch.tensor([r % 16 - 8 for r in range(rows)], dtype=torch.float32)
    by_group = 1 + torch.arange(groups, dtype=torch.float32) / 8
    return (torch.exp2(exponents).unsqueeze(1) * by_group).to(torch.float16)


def fake_quantized(codes: torch.Tensor, scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return qmath.dequantize(codes, scale, args=args)


# ---------------------------------------------------------------------------------------------
# hand-derived


def test_weight_permutation_by_hand() -> None:
    """i=0: bases 0, 16, 128, 144 (block 0) and 4, 20, 132, 148 (block 1); then interleaved."""
    assert weight_permutation(4)[:8].tolist() == [0, 128, 4, 132, 16, 144, 20, 148]
    assert weight_permutation(8)[:8].tolist() == [0, 128, 16, 144, 4, 132, 20, 148]
    for bits in (4, 8):
        assert weight_permutation(bits).tolist() == spec_permutation(bits)
        assert sorted(weight_permutation(bits).tolist()) == list(range(1024))


def test_meta_offsets_by_hand() -> None:
    """(r, c) → dr → swap → (c//2)*2N + 2*dr + c%2, for N = 64, K/16 = 2 words a row."""
    offsets = meta_offsets(64, 2).reshape(64, 2)
    assert int(offsets[0, 0]) == 0  # dr 0, no swap
    assert int(offsets[4, 0]) == 1  # dr 1 (odd), c 0 (even) → dr 0, c 1
    assert int(offsets[0, 1]) == 2  # dr 0 (even), c 1 (odd) → dr 1, c 0
    assert int(offsets[1, 0]) == 4  # dr 2
    assert int(offsets[2, 0]) == 64  # dr 32
    assert int(offsets[8, 0]) == 8  # dr 4
    assert sorted(offsets.reshape(-1).tolist()) == list(range(128))


@pytest.mark.parametrize("bits", [4, 8])
def test_first_words_by_hand(bits: int) -> None:
    """Rows 0 and 4 keep columns (0, 1) of every group, everything else is zero, scale 1.

    Then S[n, 2j] = codes[n, 4j], S[n, 2j+1] = codes[n, 4j+1]; every meta nibble of rows 0 and 4
    is 0b0100 (word 0x4444) and of an empty row 0b1110 (word 0xEEEE); the first packed word holds
    T[k, n] = S[n, k] + 2^(b-1) at (k, n) = (0,0) (8,0) (0,4) (8,4) (1,0) (9,0) (1,4) (9,4) for
    4 bits, (0,0) (8,0) (1,0) (9,0) for 8 bits.
    """
    codes = torch.zeros(64, 32, dtype=torch.int64)
    for n in (0, 4):
        for j in range(8):
            codes[n, 4 * j] = (3 * j + n) % 7 + 1
            codes[n, 4 * j + 1] = -((5 * j + n) % 7 + 1)
    args = marlin_args(bits, "channel")
    out = MARLIN.encode(codes.to(torch.float16), args, qparams=qmath.QParams(torch.ones(64, 1)))

    def s(n: int, k: int) -> int:
        return int(codes[n, 4 * (k // 2) + k % 2])

    entries = [(0, 0), (8, 0), (0, 4), (8, 4), (1, 0), (9, 0), (1, 4), (9, 4)]
    if bits == 8:
        entries = [(0, 0), (8, 0), (1, 0), (9, 0)]
    word = sum((s(n, k) + (1 << (bits - 1))) << (bits * t) for t, (k, n) in enumerate(entries))
    assert int(out["weight_packed"][0, 0]) & 0xFFFFFFFF == word
    meta = out["meta"]
    assert int(meta[0, 0]) & 0xFFFF == 0x4444  # row 0, word 0
    assert int(meta[0, 1]) & 0xFFFF == 0x4444  # row 4, word 0
    assert int(meta[0, 2]) & 0xFFFF == 0x4444  # row 0, word 1
    assert int(meta[0, 4]) & 0xFFFF == 0xEEEE  # row 1, word 0
    assert torch.equal(out["scale_packed"], torch.ones(1, 64, dtype=torch.float16))


def test_group_scale_permutation_by_hand() -> None:
    """K = 512, group 128 < K/2: run position 8i + t takes scale 8i + (0,4,1,5,2,6,3,7)[t]."""
    args = marlin_args(4, "group")
    scale = (1 + torch.arange(64 * 4).reshape(64, 4) / 256).to(torch.float16)
    out = MARLIN.encode(
        torch.zeros(64, 512, dtype=torch.float16), args, qparams=qmath.QParams(scale)
    )
    packed = out["scale_packed"]
    assert packed.shape == (4, 64)
    assert (
        packed[0, 1] == scale[4, 0] and packed[0, 2] == scale[1, 0] and packed[0, 7] == scale[7, 0]
    )
    assert packed[2, 9] == scale[12, 2]
    # K = 256: group 128 is not < K/2, so only transposed.
    out = MARLIN.encode(
        torch.zeros(64, 256, dtype=torch.float16), args, qparams=qmath.QParams(scale[:, :2])
    )
    assert torch.equal(out["scale_packed"], scale[:, :2].t())


# ---------------------------------------------------------------------------------------------
# the literal oracle, position-unique values


CASES = [
    (4, "channel", 32),
    (8, "channel", 32),
    (4, "group", 512),
    (8, "group", 512),
    (8, "group", 256),
]


@pytest.mark.parametrize(("bits", "strategy", "cols"), CASES)
def test_encode_matches_spec_and_decode_inverts_it(bits: int, strategy: str, cols: int) -> None:
    args = marlin_args(bits, strategy)
    rows = 64
    codes = unique_codes(bits, rows, cols)
    scale = unique_scales(rows, qmath.param_shape(args, (rows, cols))[-1])
    weight = fake_quantized(codes, scale, args)
    if bits == 8 and cols == 32:
        values = weight[weight != 0]
        assert values.unique().numel() == values.numel(), "test values must be position-unique"

    out = MARLIN.encode(weight, args, qparams=qmath.QParams(scale))
    expected = spec_layout(codes, scale, bits, permute_scales=strategy == "group" and cols > 256)
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype, name
        assert torch.equal(out[name], tensor), name

    decoded = MARLIN.decode(expected, args, layout="dense")
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, weight)


@given(
    bits=st.sampled_from([4, 8]),
    strategy=st.sampled_from(["channel", "group"]),
    row_blocks=st.integers(1, 2),
    col_tiles=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_of_random_24_weights(
    bits: int, strategy: str, row_blocks: int, col_tiles: int, seed: int
) -> None:
    """Any 2:4 fp16 weight comes back as its fake-quantized self (quantized in fp16)."""
    rows, cols = 64 * row_blocks, (128 if strategy == "group" else 32) * col_tiles
    args = marlin_args(bits, strategy)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator).to(torch.float16)
    keep = torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    weight = torch.where(mask.reshape(rows, cols), weight, 0.0)
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, args=args)
    out = MARLIN.encode(weight, args, qparams=qparams)
    assert torch.equal(
        MARLIN.decode(out, args, layout="dense"), fake_quantized(codes, qparams.scale, args)
    )


# ---------------------------------------------------------------------------------------------
# bad input


def good_tensors(
    bits: int = 4, strategy: str = "channel", cols: int = 32
) -> dict[str, torch.Tensor]:
    args = marlin_args(bits, strategy)
    codes = unique_codes(bits, 64, cols)
    scale = unique_scales(64, qmath.param_shape(args, (64, cols))[-1])
    return MARLIN.encode(fake_quantized(codes, scale, args), args, qparams=qmath.QParams(scale))


@pytest.mark.parametrize(
    ("change", "tensor", "rule"),
    [
        (
            lambda t: t.update(weight_packed=t["weight_packed"][:, :64]),
            "weight_packed",
            "(K/32, 128)",
        ),
        (lambda t: t.update(weight_packed=t["weight_packed"][:0]), "weight_packed", "with K > 0"),
        (lambda t: t.update(weight_packed=t["weight_packed"].reshape(-1)), "weight_packed", "2-D"),
        (
            lambda t: t.update(weight_packed=torch.cat([t["weight_packed"]] * 2)),
            "meta",
            "expected shape (2, 128)",
        ),
        (lambda t: t.update(meta=t["meta"][:, :64]), "meta", "expected shape (1, 128)"),
        (lambda t: t.update(meta=t["meta"].to(torch.int32)), "meta", "expected dtype int16"),
        (
            lambda t: t.update(scale_packed=t["scale_packed"][:, :32]),
            "scale_packed",
            "multiple of 64",
        ),
        (
            lambda t: t.update(scale_packed=torch.cat([t["scale_packed"]] * 2)),
            "scale_packed",
            "expected shape (1, 64)",
        ),
        (
            lambda t: t.update(scale_packed=t["scale_packed"].float()),
            "scale_packed",
            "expected dtype float16",
        ),
        (
            lambda t: t["scale_packed"].__setitem__((0, 3), float("inf")),
            "scale_packed",
            "NaN or Inf",
        ),
        (lambda t: t["meta"].__setitem__((0, 0), 0x4447), "meta", "nibble 7 of row 0"),
        (lambda t: t["meta"].__setitem__((0, 4), 0x0444), "meta", "nibble 0 of row 1"),
        (lambda t: t.pop("meta"), "meta", "missing"),
    ],
)
def test_decode_rejects_tiles_that_do_not_fit(change, tensor: str, rule: str) -> None:
    tensors = good_tensors()
    change(tensors)
    with pytest.raises(CTRefError, match=re.escape(rule)) as caught:
        MARLIN.decode(tensors, marlin_args(4, "channel"), layout="dense")
    assert caught.value.tensor == tensor


def test_decode_rejects_group_scales_of_the_wrong_count() -> None:
    tensors = good_tensors(8, "group", 512)
    tensors["scale_packed"] = tensors["scale_packed"][:3]
    with pytest.raises(CTRefError, match=re.escape("expected shape (4, 64)")) as caught:
        MARLIN.decode(tensors, marlin_args(8, "group"), layout="dense")
    assert caught.value.tensor == "scale_packed"


def test_decode_rejects_partial_groups() -> None:
    tensors = good_tensors(4, "channel", 160)
    with pytest.raises(CTRefError, match="group size 128") as caught:
        MARLIN.decode(tensors, marlin_args(4, "group"), layout="dense")
    assert caught.value.tensor == "weight_packed"


@pytest.mark.parametrize(
    ("shape", "rule"),
    [((32, 32), "N % 64"), ((64, 48), "K % 32"), ((64, 0), "K % 32")],
)
def test_encode_rejects_shapes_that_do_not_tile(shape: tuple[int, int], rule: str) -> None:
    with pytest.raises(CTRefError, match=rule) as caught:
        MARLIN.encode(torch.zeros(shape, dtype=torch.float16), marlin_args(4, "channel"))
    assert caught.value.tensor == "weight"


def test_encode_rejects_weights_that_are_not_24_sparse() -> None:
    weight = torch.zeros(64, 32, dtype=torch.float16)
    weight[5, 8:11] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(CTRefError, match="row 5, columns 8..11 hold 3 non-zero") as caught:
        MARLIN.encode(weight, marlin_args(8, "channel"))
    assert caught.value.tensor == "weight"


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"num_bits": 4, "strategy": "channel", "symmetric": False}, "symmetric"),
        ({"num_bits": 3, "strategy": "channel"}, "num_bits"),
        ({"num_bits": 8, "type": "float", "strategy": "channel"}, "num_bits"),
        ({"num_bits": 4, "strategy": "group", "group_size": 64}, "group_size"),
        ({"num_bits": 4, "strategy": "tensor"}, "strategy"),
    ],
)
def test_unsupported_args_are_rejected(args: dict, key: str) -> None:
    quant_args = QuantArgs.from_dict(args, key="weights")
    with pytest.raises(CTRefError) as caught:
        MARLIN.decode(good_tensors(), quant_args, layout="dense")
    assert caught.value.key == key
    with pytest.raises(CTRefError):
        MARLIN.encode(torch.zeros(64, 32), quant_args)


@pytest.mark.parametrize(("bits", "strategy", "cols"), CASES)
def test_expected_tensors_describe_what_encode_writes(bits: int, strategy: str, cols: int) -> None:
    args = marlin_args(bits, strategy)
    out = good_tensors(bits, strategy, cols)
    specs = MARLIN.expected_tensors(args, (64, cols), layout="dense")
    assert {spec.name: (spec.dtypes, spec.shape) for spec in specs} == {
        name: ((tensor.dtype,), tuple(tensor.shape)) for name, tensor in out.items()
    }
    with pytest.raises(CTRefError, match="2-D"):
        MARLIN.expected_tensors(args, (2, 64, cols), layout="dense")
