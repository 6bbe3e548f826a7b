"""The NVFP4 and MX formats (ct-format.md §3.4–3.7): stored tensors, decode arithmetic, encode,
and the refusals of bad input.

Literal expectations index the scale by hand (``scale[r, c // g]``) and decode codes with the
bit-level definitions of tests/test_fpcodes.py, not with the formats' own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref import fpcodes, qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats import get_format, nvfp4
from ctref.presets import PRESET_SCHEMES

NVFP4_GROUP_ARGS = {
    "num_bits": 4,
    "type": "float",
    "strategy": "group",
    "group_size": 16,
    "scale_dtype": "torch.float8_e4m3fn",
}
"""NVFP4 storage with plain ``group`` strategy: no global scale (§3.4)."""

ARGS = {
    "nvfp4-pack-quantized": PRESET_SCHEMES["NVFP4A16"]["weights"],
    "nvfp4-group": NVFP4_GROUP_ARGS,
    "mxfp4-pack-quantized": PRESET_SCHEMES["MXFP4A16"]["weights"],
    "mxfp6-pack-quantized": PRESET_SCHEMES["MXFP6A16"]["weights"],
    "mxfp8-quantized": PRESET_SCHEMES["MXFP8A16"]["weights"],
}
CASES = tuple(ARGS)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BF16 = torch.bfloat16


def case(name: str):
    """(format, args) of a test case; ``nvfp4-group`` is the NVFP4 format with group args."""
    format_name = "nvfp4-pack-quantized" if name == "nvfp4-group" else name
    return get_format(format_name), QuantArgs.from_dict(ARGS[name], key="weights")


def weight(shape, dtype, seed=0) -> torch.Tensor:
    """Random weights with rows of very different magnitudes, a zero group and a -0.0."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator)
    w = w * torch.exp2(torch.randint(-8, 8, (*shape[:-1], 1), generator=generator).float())
    w[..., 0, :32] = 0.0
    w[..., -1, 1] = -0.0
    return w.to(dtype)


def fake_quantize(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``dequantize(quantize(w))`` with qmath, scales held in the model dtype, decoded as bf16."""
    qparams = qmath.qparams_for(w, args)
    q = qmath.quantize(w, qparams.scale.to(w.dtype), args=args, global_scale=qparams.global_scale)
    return qmath.dequantize(
        q, qparams.scale.to(BF16), args=args, global_scale=qparams.global_scale, out_dtype=BF16
    )


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


# --- stored tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (3,)])
def test_expected_tensors_literal(lead):
    n, k = 8, 64
    shape = (*lead, n, k)

    def specs(name):
        fmt, args = case(name)
        return {
            s.name: (s.dtypes, s.shape, s.required)
            for s in fmt.expected_tensors(args, shape, layout="dense")
        }

    fp8, u8 = torch.float8_e4m3fn, torch.uint8
    assert specs("nvfp4-pack-quantized") == {
        "weight_packed": ((u8,), (*lead, n, k // 2), True),
        "weight_scale": ((fp8,), (*lead, n, k // 16), True),
        "weight_global_scale": ((torch.float32,), (1,), True),
    }
    assert specs("nvfp4-group") == {
        "weight_packed": ((u8,), (*lead, n, k // 2), True),
        "weight_scale": ((fp8,), (*lead, n, k // 16), True),
    }
    assert specs("mxfp4-pack-quantized") == {
        "weight_packed": ((u8,), (*lead, n, k // 2), True),
        "weight_scale": ((u8,), (*lead, n, k // 32), True),
    }
    assert specs("mxfp6-pack-quantized") == {
        "weight_packed": ((u8,), (*lead, n, 3 * k // 4), True),
        "weight_scale": ((u8,), (*lead, n, k // 32), True),
    }
    assert specs("mxfp8-quantized") == {
        "weight": ((fp8,), shape, True),
        "weight_scale": ((u8,), (*lead, n, k // 32), True),
    }


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96)])
def test_encode_writes_what_decode_expects_and_decodes_to_fake_quantize(name, dtype, shape):
    fmt, args = case(name)
    w = weight(shape, dtype)
    stored = fmt.encode(w, args)
    specs = fmt.expected_tensors(args, shape, layout="dense")
    assert set(stored) == {s.name for s in specs}
    for spec in specs:
        assert (
            stored[spec.name].dtype in spec.dtypes and tuple(stored[spec.name].shape) == spec.shape
        )
    decoded = fmt.decode(stored, args, layout="dense")
    assert decoded.shape == shape
    assert bits_equal(decoded, fake_quantize(w, args))


@given(
    name=st.sampled_from(CASES),
    dtype=st.sampled_from(WEIGHT_DTYPES),
    lead=st.sampled_from([(), (2,)]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_encode_decode_is_fake_quantize(name, dtype, lead, rows, groups, seed):
    fmt, args = case(name)
    w = weight((*lead, rows, groups * 32), dtype, seed)
    assert bits_equal(fmt.decode(fmt.encode(w, args), args, layout="dense"), fake_quantize(w, args))


@pytest.mark.parametrize("name", CASES)
def test_decoding_by_row_blocks_and_shared_expert_scales(name, monkeypatch):
    """Blocks of rows (ragged last block) decode as the whole; a 2-D scale serves every expert."""
    fmt, args = case(name)
    stored = fmt.encode(weight((3, 5, 64), BF16), args)
    whole = fmt.decode(stored, args, layout="dense")
    shared = {**stored, "weight_scale": stored["weight_scale"][1]}
    expanded = {**stored, "weight_scale": stored["weight_scale"][1].expand(3, -1, -1).contiguous()}
    shared_whole = fmt.decode(shared, args, layout="dense")
    monkeypatch.setattr(nvfp4, "ROW_BLOCK_ELEMENTS", 2 * 64)
    assert bits_equal(fmt.decode(stored, args, layout="dense"), whole)
    assert bits_equal(fmt.decode(shared, args, layout="dense"), shared_whole)
    assert bits_equal(fmt.decode(expanded, args, layout="dense"), shared_whole)
    assert not torch.equal(shared_whole, whole)


# --- decode arithmetic, literally --------------------------------------------------------


def e2m1(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2))


def test_nvfp4_decode_literal():
    """§3.4: ``bf16(fp32(v) * (bf16(scale) / gs))`` per element, with ``scale[r, c // 16]``."""
    generator = torch.Generator().manual_seed(1)
    n, k = 3, 32
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    scale = torch.randint(0, 0x7F, (n, k // 16), dtype=torch.uint8, generator=generator)
    scale = scale.view(torch.float8_e4m3fn)
    global_scale = torch.tensor([597.3])
    fmt, args = case("nvfp4-pack-quantized")
    stored = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": global_scale}
    decoded = fmt.decode(stored, args, layout="dense")
    expected = torch.empty(n, k, dtype=BF16)
    for r in range(n):
        for c in range(k):
            byte = int(packed[r, c // 2])
            code = byte & 0xF if c % 2 == 0 else byte >> 4
            s_eff = scale[r, c // 16].to(BF16).to(torch.float32) / global_scale[0]
            expected[r, c] = (torch.tensor(e2m1(code), dtype=torch.float32) * s_eff).to(BF16)
    assert bits_equal(decoded, expected)


def test_nvfp4_global_scale_divides_in_fp32_never_as_0d():
    """A 0-d global scale would divide in bf16 and round differently (§8 trap 7)."""
    scale = torch.full((1, 1), 0.005859375).to(torch.float8_e4m3fn)
    packed = torch.full((1, 8), 0x33, dtype=torch.uint8)  # every code 3: 1.5
    fmt, args = case("nvfp4-pack-quantized")
    stored = {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_global_scale": torch.tensor([7.0]),
    }
    decoded = fmt.decode(stored, args, layout="dense")
    in_fp32 = (1.5 * (scale.to(BF16) / torch.tensor([7.0]))).to(BF16)
    as_0d = torch.tensor(1.5, dtype=BF16) * (scale.to(BF16) / torch.tensor(7.0))
    assert decoded.dtype == BF16
    assert torch.equal(decoded, in_fp32.expand(1, 16))
    assert not torch.equal(in_fp32, as_0d)
    assert decoded[0, 0].item() == 0.00125885009765625


def test_nvfp4_is_multiplied_not_divided_by_the_inverse():
    packed = torch.full((1, 8), 0x77, dtype=torch.uint8)  # every code 7: 6.0
    scale = torch.full((1, 1), 448.0).to(torch.float8_e4m3fn)
    fmt, args = case("nvfp4-pack-quantized")
    stored = {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_global_scale": torch.tensor([2688.0]),
    }
    assert fmt.decode(stored, args, layout="dense").unique().tolist() == [1.0]


@pytest.mark.parametrize(
    "name", ["mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"]
)
def test_mx_decode_literal(name):
    """§3.5–3.7: ``bf16(value) * bf16(2^(u - 127))`` in bf16, with ``u = scale[r, c // 32]``."""
    generator = torch.Generator().manual_seed(2)
    n, k = 2, 64
    codes = torch.randint(
        0, 64 if name.startswith("mxfp6") else 16, (n, k), dtype=torch.uint8, generator=generator
    )
    scale = torch.tensor([[0, 127], [120, 200]], dtype=torch.uint8)
    fmt, args = case(name)
    if name.startswith("mxfp4"):
        stored = {"weight_packed": fpcodes.pack_fp4(codes)}
        values = [[e2m1(int(c)) for c in row] for row in codes]
    elif name.startswith("mxfp6"):
        stored = {"weight_packed": fpcodes.pack_fp6(codes)}
        values = fpcodes.decode(codes, 6, torch.float64).tolist()
    else:
        fp8 = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8, generator=generator)
        stored = {"weight": fp8.view(torch.float8_e4m3fn)}
        values = fp8.view(torch.float8_e4m3fn).to(torch.float64).tolist()
    stored["weight_scale"] = scale
    decoded = fmt.decode(stored, args, layout="dense")
    expected = torch.tensor(
        [
            [values[r][c] * 2.0 ** (int(scale[r, c // 32]) - 127) for c in range(k)]
            for r in range(n)
        ],
        dtype=torch.float64,
    ).to(BF16)
    assert bits_equal(decoded, expected)


# --- bad input -----------------------------------------------------------------------------


def stored_for(name: str, shape=(4, 64), dtype=BF16) -> tuple[object, QuantArgs, dict]:
    fmt, args = case(name)
    return fmt, args, fmt.encode(weight(shape, dtype), args)


def assert_refused(name: str, stored: dict, tensor: str, rule: str, args: QuantArgs | None = None):
    fmt, default_args = case(name)
    with pytest.raises(CTRefError) as error:
        fmt.decode(stored, args or default_args, layout="dense")
    assert error.value.tensor == tensor
    assert rule in error.value.rule
    return error.value


def test_nan_fp8_scale_is_refused():
    _, _, stored = stored_for("nvfp4-pack-quantized")
    scale = stored["weight_scale"].view(torch.uint8).clone()
    scale[1, 2] = 0x7F
    assert_refused(
        "nvfp4-pack-quantized",
        {**stored, "weight_scale": scale.view(torch.float8_e4m3fn)},
        "weight_scale",
        "NaN",
    )


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bad_global_scale_value_is_refused(value):
    _, _, stored = stored_for("nvfp4-pack-quantized")
    stored["weight_global_scale"] = torch.tensor([value])
    assert_refused("nvfp4-pack-quantized", stored, "weight_global_scale", "finite positive")


@pytest.mark.parametrize(
    ("global_scale", "rule"),
    [(torch.tensor(10.0), "shape (1,)"), (torch.tensor([10.0], dtype=BF16), "dtype float32")],
)
def test_global_scale_must_be_fp32_of_shape_1(global_scale, rule):
    _, _, stored = stored_for("nvfp4-pack-quantized")
    assert_refused(
        "nvfp4-pack-quantized",
        {**stored, "weight_global_scale": global_scale},
        "weight_global_scale",
        rule,
    )


def test_global_scale_presence_follows_the_strategy():
    _, _, stored = stored_for("nvfp4-pack-quantized")
    without = {k: v for k, v in stored.items() if k != "weight_global_scale"}
    assert_refused("nvfp4-pack-quantized", without, "weight_global_scale", "missing")
    _, _, grouped = stored_for("nvfp4-group")
    with_global = {**grouped, "weight_global_scale": torch.tensor([1.0])}
    assert_refused("nvfp4-group", with_global, "weight_global_scale", "strategy 'group'")


@pytest.mark.parametrize("element_codes", ["zero", "non-zero"])
def test_e8m0_code_255_is_refused(element_codes):
    """255 decodes to +inf: a group of zero codes would be NaN (0 x inf), any other code Inf."""
    assert math.isnan((fpcodes.e8m0_decode(torch.tensor([255], dtype=torch.uint8)) * 0).item())
    codes = (
        torch.zeros(2, 64, dtype=torch.uint8)
        if element_codes == "zero"
        else torch.full((2, 64), 2, dtype=torch.uint8)
    )
    scale = torch.full((2, 2), 127, dtype=torch.uint8)
    scale[1, 0] = 255
    stored = {"weight_packed": fpcodes.pack_fp4(codes), "weight_scale": scale}
    error = assert_refused("mxfp4-pack-quantized", stored, "weight_scale", "255")
    assert "NaN" in error.rule and "Inf" in error.rule


def test_e8m0_overflow_is_refused_but_large_finite_scales_decode():
    scale = torch.tensor([[254]], dtype=torch.uint8)
    largest = fpcodes.pack_fp4(torch.full((1, 32), 7, dtype=torch.uint8))  # 6 * 2^127 > bf16 max
    assert_refused(
        "mxfp4-pack-quantized",
        {"weight_packed": largest, "weight_scale": scale},
        "weight_scale",
        "overflow",
    )
    half = fpcodes.pack_fp4(torch.full((1, 32), 1, dtype=torch.uint8))  # 0.5 * 2^127
    fmt, args = case("mxfp4-pack-quantized")
    decoded = fmt.decode({"weight_packed": half, "weight_scale": scale}, args, layout="dense")
    assert decoded.unique().tolist() == [2.0**126]


def test_fp8_nan_weight_is_refused():
    _, _, stored = stored_for("mxfp8-quantized")
    codes = stored["weight"].view(torch.uint8).clone()
    codes[0, 5] = 0xFF
    assert_refused(
        "mxfp8-quantized", {**stored, "weight": codes.view(torch.float8_e4m3fn)}, "weight", "NaN"
    )


@pytest.mark.parametrize(
    "name", ["nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized"]
)
def test_packed_width_that_disagrees_with_the_scales_is_refused(name):
    _, _, stored = stored_for(name, shape=(4, 64))
    wider = torch.cat([stored["weight_packed"]] * 2, dim=-1)  # K = 128 against scales for K = 64
    error = assert_refused(name, {**stored, "weight_packed": wider}, "weight_scale", "expected shape")
    assert "(4, 128)" in error.rule


def test_fp6_width_must_hold_whole_triples():
    _, _, stored = stored_for("mxfp6-pack-quantized")
    assert_refused(
        "mxfp6-pack-quantized",
        {**stored, "weight_packed": stored["weight_packed"][:, :-1]},
        "weight_packed",
        "three bytes",
    )


@pytest.mark.parametrize(
    ("name", "cols"),
    [
        ("nvfp4-pack-quantized", 24),
        ("mxfp4-pack-quantized", 48),
        ("mxfp6-pack-quantized", 40),
        ("mxfp8-quantized", 33),
    ],
)
def test_k_must_fill_whole_groups(name, cols):
    fmt, args = case(name)
    with pytest.raises(CTRefError, match="multiple of the group size") as error:
        fmt.expected_tensors(args, (4, cols), layout="dense")
    assert error.value.tensor == "weight"
    with pytest.raises(CTRefError, match="multiple of the group size") as error:
        fmt.encode(torch.randn(4, cols), args)
    assert error.value.tensor == "weight"
    if name == "nvfp4-pack-quantized":
        packed = torch.zeros(4, cols // 2, dtype=torch.uint8)
        stored = {
            "weight_packed": packed,
            "weight_scale": torch.ones(4, 2).to(torch.float8_e4m3fn),
            "weight_global_scale": torch.tensor([1.0]),
        }
        assert_refused(name, stored, "weight_packed", "multiple of the group size")


@pytest.mark.parametrize("name", CASES)
def test_fewer_than_two_dimensions_are_refused(name):
    fmt, args = case(name)
    _, _, stored = stored_for(name)
    root = "weight" if name == "mxfp8-quantized" else "weight_packed"
    assert_refused(name, {**stored, root: stored[root][0]}, root, "two dimensions")
    with pytest.raises(CTRefError, match="two dimensions"):
        fmt.expected_tensors(args, (64,), layout="dense")
    with pytest.raises(CTRefError, match="two dimensions"):
        fmt.encode(torch.randn(64), args)


@pytest.mark.parametrize(
    ("name", "tensor", "replacement"),
    [
        ("nvfp4-pack-quantized", "weight_packed", lambda t: t.to(torch.int32)),
        ("nvfp4-pack-quantized", "weight_scale", lambda t: t.to(BF16)),
        ("mxfp4-pack-quantized", "weight_scale", lambda t: t.to(torch.float32)),
        ("mxfp8-quantized", "weight", lambda t: t.to(BF16)),
    ],
)
def test_wrong_dtype_is_refused(name, tensor, replacement):
    _, _, stored = stored_for(name)
    assert_refused(name, {**stored, tensor: replacement(stored[tensor])}, tensor, "expected dtype")


@pytest.mark.parametrize(
    ("name", "fields", "key"),
    [
        (
            "nvfp4-pack-quantized",
            {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16},
            "weights",
        ),
        (
            "mxfp4-pack-quantized",
            {**PRESET_SCHEMES["NVFP4A16"]["weights"], "group_size": 32},
            "weights.strategy",
        ),
        ("mxfp6-pack-quantized", PRESET_SCHEMES["MXFP4A16"]["weights"], "weights"),
        (
            "mxfp8-quantized",
            {"num_bits": 8, "type": "float", "strategy": "channel"},
            "weights.strategy",
        ),
    ],
)
def test_args_that_do_not_describe_the_format_are_refused(name, fields, key):
    fmt, _ = case(name)
    args = QuantArgs.from_dict(fields, key="weights")
    with pytest.raises(CTRefError) as error:
        fmt.expected_tensors(args, (4, 64), layout="dense")
    assert error.value.key == key
    with pytest.raises(CTRefError):
        fmt.decode({}, args, layout="dense")


def test_mx_encode_refuses_scales_e8m0_cannot_hold():
    """FP4 group-32 args without ``scale_dtype: uint8`` get amax/6 scales, not powers of two."""
    fmt, _ = case("mxfp4-pack-quantized")
    args = QuantArgs.from_dict(
        {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}, key="weights"
    )
    with pytest.raises(CTRefError, match="powers of two") as error:
        fmt.encode(torch.randn(2, 64) * 3, args)
    assert error.value.tensor == "weight_scale"


def test_nvfp4_encode_refuses_scales_not_in_the_stored_dtype():
    fmt, args = case("nvfp4-pack-quantized")
    w = torch.randn(2, 32)
    qparams = qmath.qparams_for(w, args)
    as_fp32 = qmath.QParams(qparams.scale.to(torch.float32), global_scale=qparams.global_scale)
    with pytest.raises(CTRefError, match="float8_e4m3fn") as error:
        fmt.encode(w, args, qparams=as_fp32)
    assert error.value.tensor == "weight_scale"
