"""sparse-bitmask and sparse-24-bitmask (ct-format.md §3.9, §3.10): layout, selection, bad input.

The byte-for-byte comparison with the 0.14.0.1 writer lives in tests/legacy/test_legacy_peer.py;
these run everywhere and pin the layout by hand-derived examples.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats import get_format

BITMASK = get_format("sparse-bitmask")
SPARSE24 = get_format("sparse-24-bitmask")
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8)


def raw(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bits, so that fp8 and -0.0 compare exactly."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def as_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.round().clamp(-100, 100).to(dtype) if dtype == torch.int8 else values.to(dtype)


def decode(fmt, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return fmt.decode(tensors, None, layout="dense")


def assert_decode_refused(fmt, tensors: dict[str, torch.Tensor], change, tensor: str, rule: str):
    """Decoding ``tensors`` after ``change`` raises ``rule``, naming ``tensor``."""
    change(tensors)
    with pytest.raises(CTRefError, match=re.escape(rule)) as caught:
        decode(fmt, tensors)
    assert caught.value.tensor == tensor


# ---------------------------------------------------------------------------------------------
# sparse-bitmask


def test_bitmask_layout_by_hand() -> None:
    """K=9: bit j of byte k is column 8k + j (LSB first); values row-major; exclusive offsets."""
    weight = torch.zeros(3, 9, dtype=torch.float16)
    weight[0, 1], weight[0, 8] = 5, 7
    weight[2, 0], weight[2, 7], weight[2, 3] = -1, 2, 3
    out = BITMASK.encode(weight, None)
    assert torch.equal(out["shape"], torch.tensor([3, 9]))
    assert out["shape"].dtype == torch.int64
    assert torch.equal(
        out["bitmask"], torch.tensor([[0b10, 1], [0, 0], [0b10001001, 0]], dtype=torch.uint8)
    )
    assert torch.equal(out["compressed"], torch.tensor([5, 7, -1, 3, 2], dtype=torch.float16))
    assert torch.equal(out["row_offsets"], torch.tensor([0, 2, 2]))
    assert torch.equal(decode(BITMASK, out), weight)


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 20),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_bitmask_round_trip(
    dtype: torch.dtype, rows: int, cols: int, density: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator) * 8
    keep = torch.rand(rows, cols, generator=generator) < density
    weight = as_dtype(values * keep, dtype)
    # -0.0 is dropped by the writer (it compares equal to 0) and comes back +0.0.
    weight = torch.where(weight == 0, torch.zeros_like(weight), weight)
    out = BITMASK.encode(weight, None)
    assert out["compressed"].dtype == dtype
    assert out["compressed"].numel() == int((weight != 0).sum())
    assert out["bitmask"].shape == (rows, (cols + 7) // 8)
    assert torch.equal(raw(decode(BITMASK, out)), raw(weight))


def test_bitmask_drops_negative_zero() -> None:
    weight = torch.tensor([[-0.0, 1.0, 0.0, -2.0]], dtype=torch.bfloat16)
    out = BITMASK.encode(weight, None)
    assert torch.equal(out["compressed"], torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    decoded = decode(BITMASK, out)
    assert not bool(torch.signbit(decoded[0, 0]))


def test_bitmask_decodes_fp8_codes_bit_exactly() -> None:
    """Stacked on FP8, ``compressed`` holds fp8 codes; decode returns them in fp8, unchanged."""
    codes = torch.arange(-20, 20, dtype=torch.float32).reshape(4, 10).to(torch.float8_e4m3fn)
    out = BITMASK.encode(codes, None)
    assert out["compressed"].dtype == torch.float8_e4m3fn
    assert torch.equal(raw(decode(BITMASK, out)), raw(codes))


def bitmask_tensors() -> dict[str, torch.Tensor]:
    weight = torch.tensor(
        [[0, 1, 0, 2, 0, 0, 3, 0, 4], [5, 0, 0, 0, 0, 0, 0, 0, 6]], dtype=torch.float32
    )
    return BITMASK.encode(weight, None)


@pytest.mark.parametrize(
    ("change", "tensor", "rule"),
    [
        (
            lambda t: t.update(compressed=t["compressed"][:-1]),
            "compressed",
            "marks 6 stored values",
        ),
        (lambda t: t.update(compressed=torch.ones(7)), "compressed", "marks 6 stored values"),
        (
            lambda t: t.update(compressed=t["compressed"].reshape(2, 3)),
            "compressed",
            "expected shape (6,)",
        ),
        (lambda t: t.update(bitmask=t["bitmask"][:, :1]), "bitmask", "expected shape (2, 2)"),
        (
            lambda t: t.update(bitmask=t["bitmask"].to(torch.int8)),
            "bitmask",
            "expected dtype uint8",
        ),
        (lambda t: t.update(shape=torch.tensor([2, 17])), "bitmask", "expected shape (2, 3)"),
        (lambda t: t.update(shape=torch.tensor([[2], [9]])), "shape", "expected shape (2,)"),
        (lambda t: t.update(shape=torch.tensor([2, 0])), "shape", "must be positive"),
        (lambda t: t["bitmask"].__setitem__((0, 1), 0b10), "bitmask", "past column 9"),
        (lambda t: t.update(row_offsets=torch.tensor([0, 3])), "row_offsets", "row 1 holds 3"),
        (lambda t: t.pop("row_offsets"), "row_offsets", "missing"),
        (lambda t: t.pop("compressed"), "compressed", "missing"),
        (
            lambda t: t.update(compressed=t["compressed"].to(torch.int32)),
            "compressed",
            "expected dtype",
        ),
    ],
)
def test_bitmask_rejects_bad_input(change, tensor: str, rule: str) -> None:
    assert_decode_refused(BITMASK, bitmask_tensors(), change, tensor, rule)


def test_sparsity_formats_take_no_args() -> None:
    """Sparsity decodes codes; quantization args belong to the quantization format."""
    args = QuantArgs.from_dict({"num_bits": 8, "type": "float"}, key="weights")
    with pytest.raises(ValueError, match="args=None"):
        BITMASK.decode(bitmask_tensors(), args, layout="dense")
    with pytest.raises(ValueError, match="args=None"):
        SPARSE24.encode(torch.zeros(1, 4), args)


@pytest.mark.parametrize("fmt", [BITMASK, SPARSE24], ids=lambda f: f.names[0])
def test_encode_rejects_non_2d_weights(fmt) -> None:
    with pytest.raises(CTRefError, match="2-D") as caught:
        fmt.encode(torch.ones(2, 2, 4), None)
    assert caught.value.tensor == "weight"


# ---------------------------------------------------------------------------------------------
# sparse-24-bitmask


def test_sparse24_layout_by_hand() -> None:
    weight = torch.tensor(
        [[1.0, -3.0, 2.0, 0.5, 0.0, 0.0, -7.0, 0.0], [4.0, 4.0, -4.0, 1.0, 0.0, 9.0, 0.0, 8.0]],
        dtype=torch.bfloat16,
    )
    out = SPARSE24.encode(weight, None)
    assert torch.equal(out["shape"], torch.tensor([[2], [8]]))
    # Row 0: columns 1, 2 | 6 and the zero at 7 (tie table); row 1: of three 4s, 1 and 2 | 5, 7.
    assert torch.equal(
        out["bitmask"],
        torch.tensor([[0b0110 | 0b1100 << 4], [0b0110 | 0b1010 << 4]], dtype=torch.uint8),
    )
    assert torch.equal(
        out["compressed"], torch.tensor([[-3, 2, -7, 0], [4, -4, 9, 8]], dtype=torch.bfloat16)
    )
    expected = weight.clone()
    expected[0, [0, 3]] = 0
    expected[1, [0, 3]] = 0
    assert torch.equal(decode(SPARSE24, out), expected)


def _kept_columns(group: list[float]) -> tuple[int, ...]:
    out = SPARSE24.encode(torch.tensor([group]), None)
    bits = int(out["bitmask"][0, 0])
    return tuple(c for c in range(4) if bits >> c & 1)


# Which columns the writer keeps when the second-largest magnitude is tied (torch.topk on the
# CPU): every weak ordering of four magnitudes whose top two are not already decided. The zero
# cases are the groups with fewer than two non-zeros.
TIE_TABLE = {
    (0, 0, 0, 0): (2, 3),
    (1, 0, 0, 0): (0, 2),
    (0, 1, 0, 0): (1, 3),
    (0, 0, 1, 0): (2, 3),
    (0, 0, 0, 1): (2, 3),
    (3, 3, 3, 2): (1, 2),
    (3, 3, 2, 3): (1, 3),
    (3, 2, 3, 3): (2, 3),
    (2, 3, 3, 3): (2, 3),
    (3, 2, 2, 2): (0, 2),
    (3, 2, 2, 1): (0, 1),
    (3, 2, 1, 2): (0, 1),
    (3, 1, 2, 2): (0, 2),
    (2, 3, 2, 2): (1, 3),
    (2, 3, 2, 1): (1, 2),
    (2, 3, 1, 2): (1, 3),
    (2, 2, 3, 2): (2, 3),
    (2, 2, 3, 1): (1, 2),
    (2, 2, 2, 3): (2, 3),
    (2, 2, 1, 3): (1, 3),
    (2, 1, 3, 2): (2, 3),
    (2, 1, 2, 3): (2, 3),
    (1, 3, 2, 2): (1, 3),
    (1, 2, 3, 2): (2, 3),
    (1, 2, 2, 3): (2, 3),
}


@pytest.mark.parametrize(("group", "kept"), TIE_TABLE.items(), ids=str)
def test_sparse24_tie_table(group: tuple[int, ...], kept: tuple[int, ...]) -> None:
    assert _kept_columns([float(v) for v in group]) == kept
    assert _kept_columns([-float(v) for v in group]) == kept  # magnitudes: sign is irrelevant


def test_sparse24_untied_groups_keep_the_two_largest() -> None:
    for order in itertools.permutations([1.0, 2.0, 3.0, 4.0]):
        assert _kept_columns(list(order)) == tuple(sorted((order.index(3.0), order.index(4.0))))


def test_sparse24_fp8_ranks_by_int8_bit_pattern() -> None:
    """-448 has bits 0xFE = int8 -2, |.| = 2: it ranks below 0.5 (0x30) and is dropped."""
    group = torch.tensor([[-448.0, 1.0, 2.0, 0.5]]).to(torch.float8_e4m3fn)
    out = SPARSE24.encode(group, None)
    assert int(out["bitmask"][0, 0]) == 0b0110
    assert torch.equal(raw(out["compressed"]), raw(group[:, 1:3]))


def test_sparse24_int8_minus_128_ranks_lowest() -> None:
    """int8 ``abs(-128)`` wraps to -128, so the writer drops the largest magnitude."""
    out = SPARSE24.encode(torch.tensor([[-128, 1, 2, 3]], dtype=torch.int8), None)
    assert int(out["bitmask"][0, 0]) == 0b1100
    assert torch.equal(out["compressed"], torch.tensor([[2, 3]], dtype=torch.int8))


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@given(rows=st.integers(1, 5), groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sparse24_round_trip_of_24_sparse_weights(
    dtype: torch.dtype, rows: int, groups: int, seed: int
) -> None:
    """A weight already 2:4 sparse (two distinct non-zero magnitudes a group) comes back exactly."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = (torch.rand(rows, groups, 2, generator=generator) * 50 + 1).round()
    magnitudes[..., 1] += 60  # distinct, so no tie decides anything
    signs = torch.randint(0, 2, (rows, groups, 2), generator=generator) * 2 - 1
    positions = torch.stack(
        [torch.randperm(4, generator=generator)[:2] for _ in range(rows * groups)]
    )
    weight = torch.zeros(rows, groups, 4)
    weight.view(-1, 4).scatter_(1, positions, (magnitudes * signs).view(-1, 2))
    weight = as_dtype(weight.reshape(rows, 4 * groups), dtype)
    out = SPARSE24.encode(weight, None)
    assert out["compressed"].shape == (rows, 2 * groups) and out["compressed"].dtype == dtype
    assert torch.equal(raw(decode(SPARSE24, out)), raw(weight))


def sparse24_tensors() -> dict[str, torch.Tensor]:
    return SPARSE24.encode(torch.arange(1.0, 17.0).reshape(2, 8), None)


@pytest.mark.parametrize(
    ("change", "tensor", "rule"),
    [
        (
            lambda t: t["bitmask"].__setitem__((1, 0), 0b11110011),
            "bitmask",
            "row 1, columns 4..7 have 4",
        ),
        (
            lambda t: t["bitmask"].__setitem__((0, 0), 0b11000001),
            "bitmask",
            "row 0, columns 0..3 have 1",
        ),
        (lambda t: t.update(shape=torch.tensor([2, 8])), "shape", "expected shape (2, 1)"),
        (lambda t: t.update(shape=torch.tensor([[2], [6]])), "shape", "K divisible by 4"),
        (
            lambda t: t.update(compressed=t["compressed"].reshape(-1)),
            "compressed",
            "expected shape (2, 4)",
        ),
        (
            lambda t: t.update(compressed=t["compressed"][:, :3]),
            "compressed",
            "expected shape (2, 4)",
        ),
        (lambda t: t.update(bitmask=t["bitmask"][:1]), "bitmask", "expected shape (2, 1)"),
        (lambda t: t.update(shape=torch.tensor([[2], [12]])), "bitmask", "expected shape (2, 2)"),
    ],
)
def test_sparse24_rejects_bad_input(change, tensor: str, rule: str) -> None:
    assert_decode_refused(SPARSE24, sparse24_tensors(), change, tensor, rule)


def test_sparse24_encode_needs_whole_groups() -> None:
    with pytest.raises(CTRefError, match="K divisible by 4"):
        SPARSE24.encode(torch.ones(2, 6), None)


def test_stacked_decode_sparsity_then_quantization() -> None:
    """Decode sparsity to the fp8 codes, then dequantize them with float-quantized."""
    args = QuantArgs.from_dict(
        {"num_bits": 8, "type": "float", "strategy": "channel"}, key="weights"
    )
    naive = get_format("float-quantized")
    weight = torch.randn(4, 16, dtype=torch.bfloat16)
    weight = torch.where(torch.tensor([True, False, True, False]).repeat(4), weight, 0.0)
    quantized = naive.encode(weight, args)
    sparse = SPARSE24.encode(quantized["weight"], None)
    codes = decode(SPARSE24, sparse)
    assert torch.equal(raw(codes), raw(quantized["weight"]))
    stacked = naive.decode({**quantized, "weight": codes}, args, layout="dense")
    assert torch.equal(stacked, naive.decode(quantized, args, layout="dense"))


@pytest.mark.parametrize("fmt", [BITMASK, SPARSE24], ids=lambda f: f.names[0])
def test_expected_tensors_describe_what_encode_writes(fmt) -> None:
    weight = torch.tensor([[0.0, 1.0, 2.0, 0.0] * 3] * 5, dtype=torch.float16)
    out = fmt.encode(weight, None)
    specs = fmt.expected_tensors(None, weight.shape, layout="dense")
    assert {spec.name for spec in specs} == set(out)
    for spec in specs:
        assert out[spec.name].dtype in spec.dtypes, spec.name
        assert spec.shape is None or tuple(out[spec.name].shape) == spec.shape, spec.name
    with pytest.raises(CTRefError, match="2-D"):
        fmt.expected_tensors(None, (2, 5, 12), layout="dense")
