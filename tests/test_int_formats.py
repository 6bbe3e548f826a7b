"""The integer and FP8 formats: naive/int/float-quantized (§3.2) and pack-quantized (§3.3).

Round trips are compared bit for bit with qmath's fake quantization (itself checked against the
literal definitions in test_qmath.py); bad input must raise CTRefError naming the tensor and rule.
"""

from __future__ import annotations

import pytest
import torch

from ctref import packing, qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats import get_format

NAIVE_NAMES = ("naive-quantized", "int-quantized", "float-quantized")
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

STRATEGY_CASES = [
    pytest.param({"strategy": "tensor"}, (64, 256), id="tensor"),
    pytest.param({"strategy": "channel"}, (64, 256), id="channel"),
    pytest.param({"strategy": "group", "group_size": 128}, (64, 256), id="group128"),
    pytest.param({"strategy": "group", "group_size": 128}, (64, 300), id="group128-ragged"),
    pytest.param({"strategy": "block", "block_structure": [128, 128]}, (256, 256), id="block128"),
    pytest.param(
        {"strategy": "block", "block_structure": [128, 128]}, (200, 300), id="block128-ragged"
    ),
    pytest.param({"strategy": "channel"}, (4, 32, 96), id="channel-experts"),
    pytest.param({"strategy": "group", "group_size": 32}, (4, 32, 96), id="group32-experts"),
    pytest.param({"strategy": "tensor"}, (4, 32, 96), id="tensor-experts"),
    pytest.param(
        {"strategy": "block", "block_structure": [16, 64]}, (4, 40, 96), id="block-ragged-experts"
    ),
]


def quant_args(**fields) -> QuantArgs:
    return QuantArgs.from_dict(fields, key="weights")


def random_weight(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) + 0.25).to(dtype)


def fake_quantize(weight: torch.Tensor, args: QuantArgs, qparams: qmath.QParams) -> torch.Tensor:
    codes = qmath.quantize(
        weight, qparams.scale, qparams.zero_point, args=args, g_idx=qparams.g_idx
    )
    return qmath.dequantize(
        codes, qparams.scale, qparams.zero_point, args=args, g_idx=qparams.g_idx
    )


def assert_round_trip(
    format_name: str,
    weight: torch.Tensor,
    args: QuantArgs,
    layout: str = "dense",
    qparams: qmath.QParams | None = None,
) -> dict[str, torch.Tensor]:
    """encode -> decode is fake quantization bit for bit, in the scale dtype, and encode writes
    exactly the tensors ``expected_tensors`` announces."""
    fmt = get_format(format_name)
    qparams = qparams or qmath.qparams_for(weight, args)
    stored = fmt.encode(weight, args, layout=layout, qparams=qparams)
    specs = fmt.expected_tensors(args, tuple(weight.shape), layout=layout)
    assert set(stored) == {spec.name for spec in specs}
    for spec in specs:
        assert stored[spec.name].dtype in spec.dtypes, spec.name
        assert tuple(stored[spec.name].shape) == spec.shape, spec.name
    decoded = fmt.decode(stored, args, layout=layout)
    assert decoded.dtype == qparams.scale.dtype
    assert decoded.shape == weight.shape
    assert torch.equal(decoded, fake_quantize(weight, args, qparams))
    return stored


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"int{b}")
@pytest.mark.parametrize(("fields", "shape"), STRATEGY_CASES)
def test_pack_quantized_round_trip(fields, shape, bits, symmetric, dtype):
    args = quant_args(num_bits=bits, symmetric=symmetric, **fields)
    assert_round_trip("pack-quantized", random_weight(shape, dtype), args)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("type_", "symmetric"),
    [("int", True), ("int", False), ("float", True)],
    ids=["int8-sym", "int8-asym", "fp8-sym"],
)
@pytest.mark.parametrize(("fields", "shape"), STRATEGY_CASES)
@pytest.mark.parametrize("format_name", NAIVE_NAMES)
def test_naive_quantized_round_trip(format_name, fields, shape, type_, symmetric, dtype):
    args = quant_args(num_bits=8, type=type_, symmetric=symmetric, **fields)
    stored = assert_round_trip(format_name, random_weight(shape, dtype), args)
    assert stored["weight"].dtype == (torch.int8 if type_ == "int" else torch.float8_e4m3fn)


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_fp32_scales_make_fp32_output(format_name, symmetric):
    """Converted checkpoints may keep fp32 scales beside bf16 models: the output follows the
    scale (§8 trap 21), and ``x / s`` then runs in fp32."""
    args = quant_args(num_bits=8, symmetric=symmetric, group_size=64)
    weight = random_weight((32, 128), torch.bfloat16)
    qparams = qmath.qparams_for(weight.float(), args)
    assert qparams.scale.dtype == torch.float32
    assert_round_trip(format_name, weight, args, qparams=qparams)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"int{b}")
@pytest.mark.parametrize(
    ("fields", "shape"),
    [
        pytest.param({"strategy": "group", "group_size": 32}, (37, 96), id="group32"),
        pytest.param({"strategy": "channel"}, (3, 37, 101), id="channel-experts"),
    ],
)
def test_pack_quantized_legacy_layout_round_trip(fields, shape, bits, symmetric):
    """Up to 0.17.1 words hold 32 // b whole fields; zero points are packed the same way."""
    args = quant_args(num_bits=bits, symmetric=symmetric, **fields)
    weight = random_weight(shape, torch.bfloat16)
    legacy = assert_round_trip("pack-quantized", weight, args, layout="legacy")
    dense = get_format("pack-quantized").encode(weight, args, layout="dense")
    assert legacy["weight_packed"].shape[-1] == packing.packed_width(shape[-1], bits, "legacy")
    assert torch.equal(legacy["weight_packed"], dense["weight_packed"]) == (bits in (1, 2, 4, 8))


def test_pack_quantized_legacy_golden_decode():
    """The spec's int3 legacy row under a tensor scale of 0.5."""
    args = quant_args(num_bits=3)
    stored = {
        "weight_packed": torch.tensor([[0x07FAC688, 0x00000005]], dtype=torch.int32),
        "weight_shape": torch.tensor([1, 11]),
        "weight_scale": torch.tensor([0.5], dtype=torch.bfloat16),
    }
    decoded = get_format("pack-quantized").decode(stored, args, layout="legacy")
    expected = [-4, -3, -2, -1, 0, 1, 2, 3, 3, -4, 1]
    assert decoded.tolist() == [[v / 2 for v in expected]]
    as_dense = get_format("pack-quantized").decode(stored, args, layout="dense")
    assert as_dense.tolist() != decoded.tolist()


def test_pack_quantized_golden_packed_zero_points_decode():
    """The spec's int4 zero points [[-8, 7], [0, 1], [3, -1]] packed along N."""
    args = quant_args(num_bits=4, symmetric=False, group_size=2)
    stored = {
        "weight_packed": packing.pack(torch.zeros(3, 4, dtype=torch.int8), 4),
        "weight_shape": torch.tensor([3, 4]),
        "weight_scale": torch.ones(3, 2, dtype=torch.float32),
        "weight_zero_point": torch.tensor([[0x00000B80, 0x0000079F]], dtype=torch.int32),
    }
    decoded = get_format("pack-quantized").decode(stored, args, layout="dense")
    assert decoded.tolist() == [[8, 8, -7, -7], [0, 0, -1, -1], [-3, -3, 1, 1]]


@pytest.mark.parametrize(
    ("fields", "shape"),
    [
        pytest.param({"strategy": "group", "group_size": 64}, (48, 256), id="group"),
        pytest.param({"strategy": "channel"}, (48, 256), id="channel"),
        pytest.param({"strategy": "group", "group_size": 32}, (2, 16, 64), id="group-experts"),
    ],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_quantized_int8_zero_points_of_old_writers_decode(fields, shape, bits):
    """Up to 0.9.3 asymmetric zero points were stored as plain int8 of the scale's shape."""
    args = quant_args(num_bits=bits, symmetric=False, **fields)
    weight = random_weight(shape, torch.float16)
    qparams = qmath.qparams_for(weight, args)
    fmt = get_format("pack-quantized")
    stored = fmt.encode(weight, args, qparams=qparams)
    assert stored["weight_zero_point"].dtype == torch.int32
    old = {**stored, "weight_zero_point": qparams.zero_point.to(torch.int8)}
    assert torch.equal(fmt.decode(old, args, layout="dense"), fake_quantize(weight, args, qparams))


def permuted_g_idx(cols: int, group_size: int, seed: int = 7) -> torch.Tensor:
    groups = torch.arange(-(-cols // group_size)).repeat_interleave(group_size)[:cols]
    return groups[torch.randperm(cols, generator=torch.Generator().manual_seed(seed))].to(
        torch.int32
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
def test_act_order_g_idx_decode(format_name, symmetric):
    """Legacy act-order: column c uses group g_idx[c]; codes stay in column order (§2.4)."""
    bits = 4 if format_name == "pack-quantized" else 8
    args = quant_args(num_bits=bits, symmetric=symmetric, group_size=32, actorder="group")
    weight = random_weight((24, 128), torch.bfloat16)
    g_idx = permuted_g_idx(128, 32)
    qparams = qmath.qparams_for(weight, args, g_idx)
    stored = assert_round_trip(format_name, weight, args, qparams=qparams)
    assert torch.equal(stored["weight_g_idx"], g_idx)
    without = {k: v for k, v in stored.items() if k != "weight_g_idx"}
    fmt = get_format(format_name)
    assert not torch.equal(
        fmt.decode(without, args, layout="dense"), fmt.decode(stored, args, layout="dense")
    )


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
def test_all_minus_one_g_idx_placeholder_means_contiguous_groups(format_name):
    args = quant_args(num_bits=8, symmetric=False, group_size=32, actorder="group")
    fmt = get_format(format_name)
    stored = fmt.encode(random_weight((16, 96), torch.bfloat16), args)
    placeholder = {**stored, "weight_g_idx": torch.full((96,), -1, dtype=torch.int32)}
    assert torch.equal(
        fmt.decode(placeholder, args, layout="dense"), fmt.decode(stored, args, layout="dense")
    )


def test_naive_int4_codes_in_int8_storage_decode():
    """W4A8 int-quantized files store 4-bit values in int8 (§0 fact 11)."""
    args = quant_args(num_bits=4, strategy="channel")
    assert_round_trip("int-quantized", random_weight((32, 64), torch.bfloat16), args)


# ---------------------------------------------------------------------------------------------
# Bad input: CTRefError naming the tensor and the rule.


def stored_tensors(format_name: str, symmetric: bool = True, **fields) -> tuple[dict, QuantArgs]:
    fields = fields or {"strategy": "group", "group_size": 32}
    bits = 4 if format_name == "pack-quantized" else 8
    args = quant_args(num_bits=bits, symmetric=symmetric, **fields)
    return get_format(format_name).encode(random_weight((16, 64), torch.bfloat16), args), args


def assert_refused(
    format_name: str, tensors: dict, args: QuantArgs, tensor: str, rule: str, layout: str = "dense"
) -> None:
    with pytest.raises(CTRefError, match=rule) as caught:
        get_format(format_name).decode(tensors, args, layout=layout)
    assert caught.value.tensor == tensor
    assert str(caught.value).startswith(f"{tensor}: ")


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
@pytest.mark.parametrize("missing", ["weight_scale", "weight_zero_point"])
def test_missing_tensor(format_name, missing):
    stored, args = stored_tensors(format_name, symmetric=False)
    del stored[missing]
    assert_refused(format_name, stored, args, missing, "required tensor is missing")


def test_missing_weight_shape():
    stored, args = stored_tensors("pack-quantized")
    del stored["weight_shape"]
    assert_refused("pack-quantized", stored, args, "weight_shape", "required tensor is missing")


@pytest.mark.parametrize(
    ("format_name", "name", "dtype", "rule"),
    [
        pytest.param(
            "pack-quantized",
            "weight_packed",
            torch.int8,
            "expected dtype int32, found int8",
            id="int8-packed",
        ),
        pytest.param(
            "pack-quantized",
            "weight_packed",
            torch.int64,
            "expected dtype int32",
            id="int64-packed",
        ),
        pytest.param(
            "pack-quantized",
            "weight_shape",
            torch.float32,
            "expected dtype int64",
            id="float-shape",
        ),
        pytest.param(
            "pack-quantized", "weight_scale", torch.int32, "expected dtype bfloat16", id="int-scale"
        ),
        pytest.param(
            "naive-quantized",
            "weight",
            torch.int32,
            "expected dtype int8, found int32",
            id="int32-codes",
        ),
        pytest.param(
            "naive-quantized", "weight", torch.bfloat16, "expected dtype int8", id="float-weight"
        ),
        pytest.param(
            "naive-quantized",
            "weight",
            torch.float8_e4m3fn,
            "expected dtype int8",
            id="fp8-for-int",
        ),
        pytest.param(
            "naive-quantized",
            "weight_zero_point",
            torch.float32,
            "expected dtype int8",
            id="float-zp",
        ),
    ],
)
def test_wrong_dtype(format_name, name, dtype, rule):
    stored, args = stored_tensors(format_name, symmetric=False)
    stored[name] = stored[name].to(dtype)
    assert_refused(format_name, stored, args, name, rule)


def test_fp8_args_refuse_int8_codes():
    args = quant_args(num_bits=8, type="float", strategy="channel")
    stored = get_format("float-quantized").encode(random_weight((16, 64), torch.bfloat16), args)
    stored["weight"] = torch.zeros(16, 64, dtype=torch.int8)
    assert_refused(
        "float-quantized", stored, args, "weight", "expected dtype float8_e4m3fn, found int8"
    )


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
@pytest.mark.parametrize(
    ("fields", "bad_shape"),
    [
        pytest.param({"strategy": "group", "group_size": 32}, (16, 1), id="group-too-few"),
        pytest.param({"strategy": "group", "group_size": 32}, (2, 16), id="group-transposed"),
        pytest.param({"strategy": "channel"}, (16,), id="channel-1d"),
        pytest.param({"strategy": "tensor"}, (), id="tensor-0d"),
        pytest.param({"strategy": "block", "block_structure": [8, 64]}, (1, 1), id="block-too-few"),
    ],
)
def test_scale_shape_not_fitting_the_strategy(format_name, fields, bad_shape):
    stored, args = stored_tensors(format_name, **fields)
    stored["weight_scale"] = torch.ones(bad_shape, dtype=torch.bfloat16)
    assert_refused(
        format_name, stored, args, "weight_scale", rf"expected shape .* strategy '{args.strategy}'"
    )


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
def test_zero_point_shape_not_fitting_the_strategy(format_name):
    stored, args = stored_tensors(format_name, symmetric=False, strategy="tensor")
    stored["weight_zero_point"] = torch.zeros(16, 1, dtype=torch.int8)
    assert_refused(format_name, stored, args, "weight_zero_point", "expected shape")


@pytest.mark.parametrize("layout", packing.LAYOUTS)
@pytest.mark.parametrize("stored_k", [48, 65, 96], ids=lambda k: f"K{k}")
def test_packed_width_not_fitting_weight_shape(stored_k, layout):
    """64 int4 values take 8 words; a weight_shape saying K=48, 65 or 96 does not fit."""
    stored, args = stored_tensors("pack-quantized")
    stored = {
        **stored,
        "weight_shape": torch.tensor([16, stored_k]),
        "weight_scale": torch.ones(16, -(-stored_k // 32)),
    }
    assert_refused("pack-quantized", stored, args, "weight_packed", "int32 words", layout)


@pytest.mark.parametrize(
    "weight_shape",
    [
        pytest.param(torch.tensor([16, 64, 1]), id="three-entries-for-2d"),
        pytest.param(torch.tensor([1024]), id="one-entry"),
        pytest.param(torch.tensor(64), id="scalar"),
        pytest.param(torch.tensor([[16, 64]]), id="2d-tensor"),
    ],
)
def test_weight_shape_with_wrong_entry_count(weight_shape):
    stored, args = stored_tensors("pack-quantized")
    stored["weight_shape"] = weight_shape
    assert_refused("pack-quantized", stored, args, "weight_shape", "entries")


@pytest.mark.parametrize(
    "weight_shape",
    [
        pytest.param([15, 64], id="rows-differ"),
        pytest.param([16, 0], id="zero-columns"),
        pytest.param([16, -64], id="negative-columns"),
    ],
)
def test_weight_shape_not_fitting_weight_packed(weight_shape):
    stored, args = stored_tensors("pack-quantized")
    stored["weight_shape"] = torch.tensor(weight_shape)
    assert_refused("pack-quantized", stored, args, "weight_shape", "does not fit weight_packed")


def test_packed_zero_point_width_not_fitting_rows():
    stored, args = stored_tensors("pack-quantized", symmetric=False)
    stored["weight_zero_point"] = torch.zeros(3, 2, dtype=torch.int32)
    assert_refused(
        "pack-quantized",
        stored,
        args,
        "weight_zero_point",
        "16 values of 4 bits take 2 int32 words",
    )


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
@pytest.mark.parametrize(
    ("g_idx", "rule"),
    [
        pytest.param(
            torch.zeros(63, dtype=torch.int32), r"expected shape \(64,\), found \(63,\)", id="short"
        ),
        pytest.param(
            torch.zeros(65, dtype=torch.int32), r"expected shape \(64,\), found \(65,\)", id="long"
        ),
        pytest.param(
            torch.full((64,), 2, dtype=torch.int32),
            r"must lie in \[0, 1\], found \[2, 2\]",
            id="too-large",
        ),
        pytest.param(
            torch.tensor([-1] + [0] * 63, dtype=torch.int32),
            r"must lie in \[0, 1\]",
            id="partly-minus-one",
        ),
    ],
)
def test_bad_g_idx(format_name, g_idx, rule):
    stored, args = stored_tensors(format_name, strategy="group", group_size=32, actorder="group")
    stored["weight_g_idx"] = g_idx
    assert_refused(format_name, stored, args, "weight_g_idx", rule)


@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized"])
def test_g_idx_needs_a_group_strategy(format_name):
    stored, args = stored_tensors(format_name, strategy="channel")
    stored["weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    assert_refused(format_name, stored, args, "weight_g_idx", "needs a group strategy")


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize("format_name", ["pack-quantized", "naive-quantized", "float-quantized"])
def test_non_finite_scale(format_name, bad):
    if format_name == "float-quantized":
        args = quant_args(num_bits=8, type="float", strategy="channel")
        stored = get_format(format_name).encode(random_weight((16, 64), torch.bfloat16), args)
    else:
        stored, args = stored_tensors(format_name)
    stored["weight_scale"] = stored["weight_scale"].clone()
    stored["weight_scale"].view(-1)[3] = bad
    assert_refused(format_name, stored, args, "weight_scale", "NaN or Inf")


@pytest.mark.parametrize(
    ("bits", "code", "rule"),
    [
        (4, 8, r"4-bit values must lie in \[-8, 7\], found \[.*, 8\]"),
        (4, -9, r"4-bit values must lie in \[-8, 7\], found \[-9, .*\]"),
        (2, 2, r"2-bit values must lie in \[-2, 1\]"),
        (7, -65, r"7-bit values must lie in \[-64, 63\]"),
    ],
)
def test_int_codes_out_of_range_for_num_bits(bits, code, rule):
    args = quant_args(num_bits=bits, strategy="channel")
    stored = get_format("int-quantized").encode(random_weight((16, 64), torch.bfloat16), args)
    stored["weight"] = stored["weight"].clone()
    stored["weight"][5, 7] = code
    assert_refused("int-quantized", stored, args, "weight", rule)


def test_packed_zero_point_for_tensor_strategy():
    stored, args = stored_tensors("pack-quantized", symmetric=False, strategy="tensor")
    assert stored["weight_zero_point"].dtype == torch.int8
    stored["weight_zero_point"] = torch.zeros(1, 1, dtype=torch.int32)
    assert_refused(
        "pack-quantized",
        stored,
        args,
        "weight_zero_point",
        "group/channel strategies only, not 'tensor'",
    )


# ---------------------------------------------------------------------------------------------
# Reported bugs: these fail until the format code is fixed (see the report of issue 2).


@pytest.mark.parametrize(
    ("format_name", "tensors"),
    [
        pytest.param(
            "naive-quantized", {"weight": torch.zeros(64, dtype=torch.int8)}, id="naive-1d"
        ),
        pytest.param(
            "naive-quantized", {"weight": torch.zeros((), dtype=torch.int8)}, id="naive-0d"
        ),
        pytest.param(
            "pack-quantized",
            {
                "weight_packed": torch.zeros(32, dtype=torch.int32),
                "weight_shape": torch.tensor([256]),
            },
            id="pack-1d",
        ),
    ],
)
def test_weight_with_fewer_than_two_dimensions(format_name, tensors):
    """A quantized weight is (N, K) or (E, N, K); a 1-D one must not reach qmath's unpacking
    of ``*lead, rows, cols`` (today: a bare ValueError without the tensor name)."""
    args = quant_args(num_bits=4)
    tensors = {**tensors, "weight_scale": torch.ones(1, dtype=torch.bfloat16)}
    root = "weight" if format_name == "naive-quantized" else "weight_packed"
    with pytest.raises(CTRefError, match="dimension") as caught:
        get_format(format_name).decode(tensors, args, layout="dense")
    assert caught.value.tensor in (root, "weight_shape")


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("format_name", NAIVE_NAMES)
def test_naive_quantized_refuses_fp4_and_fp6(format_name, bits):
    """naive storage holds int or FP8 codes; FP4/FP6 codes are not values, and encoding casts
    the negative grid values to uint8 (-1.5 -> 255). The library refuses these args too."""
    args = quant_args(num_bits=bits, type="float", strategy="group", group_size=16)
    fmt = get_format(format_name)
    with pytest.raises(CTRefError, match="num_bits|float"):
        fmt.encode(random_weight((8, 32), torch.bfloat16), args)
    stored = {
        "weight": torch.zeros(8, 32, dtype=torch.uint8),
        "weight_scale": torch.ones(8, 2, dtype=torch.bfloat16),
    }
    with pytest.raises(CTRefError, match="num_bits|float"):
        fmt.decode(stored, args, layout="dense")


def test_pack_quantized_refuses_float_args():
    """pack-quantized holds INT codes (§3.3); FP8 values such as 448 overflow an 8-bit field and
    corrupt the neighbouring one."""
    args = quant_args(num_bits=8, type="float")
    fmt = get_format("pack-quantized")
    with pytest.raises(CTRefError, match="int"):
        fmt.encode(random_weight((8, 32), torch.bfloat16), args)
    stored = {
        "weight_packed": torch.zeros(8, 8, dtype=torch.int32),
        "weight_shape": torch.tensor([8, 32]),
        "weight_scale": torch.ones(1, dtype=torch.bfloat16),
    }
    with pytest.raises(CTRefError, match="int"):
        fmt.decode(stored, args, layout="dense")


@pytest.mark.parametrize("format_name", NAIVE_NAMES)
def test_fp8_asymmetric_decode_applies_the_zero_point(format_name):
    """FP8 asymmetric args are valid in 0.20.0 (zp_dtype float8_e4m3fn; only FP4/FP6 asym
    raise) and its decompress subtracts the zero point. Today ctref ignores it: a wrong tensor."""
    args = quant_args(num_bits=8, type="float", symmetric=False, strategy="channel")
    generator = torch.Generator().manual_seed(2)
    codes = (torch.randn(8, 32, generator=generator) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(8, 1, generator=generator).to(torch.bfloat16)
    zero_point = (torch.randn(8, 1, generator=generator) * 100).to(torch.float8_e4m3fn)
    stored = {"weight": codes, "weight_scale": scale, "weight_zero_point": zero_point}
    expected = ((codes.double() - zero_point.double()) * scale.double()).to(torch.bfloat16)
    assert torch.equal(get_format(format_name).decode(stored, args, layout="dense"), expected)


def test_g_idx_assigning_a_group_more_columns_than_its_size():
    stored, args = stored_tensors(
        "pack-quantized", strategy="group", group_size=32, actorder="group"
    )
    stored["weight_g_idx"] = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    assert_refused(
        "pack-quantized", stored, args, "weight_g_idx", "group 0 is assigned 40"
    )


@pytest.mark.parametrize("format_name", ["pack-quantized", "int-quantized"])
def test_unpacked_zero_point_out_of_range_for_num_bits(format_name):
    """int8 zero points (int-quantized W4A8, and ≤0.9.3 pack writers) must fit the codes' range."""
    args = quant_args(num_bits=4, symmetric=False, strategy="channel")
    stored = get_format(format_name).encode(random_weight((16, 64), torch.bfloat16), args)
    zero_point = torch.zeros((16, 1), dtype=torch.int8)
    zero_point[5] = 100
    stored["weight_zero_point"] = zero_point
    assert_refused(format_name, stored, args, "weight_zero_point", r"4-bit values must lie in \[-8, 7\]")


@pytest.mark.parametrize("nan_code", [0x7F, 0xFF])
def test_fp8_nan_codes_are_refused(nan_code):
    args = quant_args(num_bits=8, type="float", strategy="channel")
    stored = get_format("float-quantized").encode(random_weight((16, 64), torch.bfloat16), args)
    codes = stored["weight"].view(torch.uint8).clone()
    codes[3, 7] = nan_code
    stored["weight"] = codes.view(torch.float8_e4m3fn)
    assert_refused("float-quantized", stored, args, "weight", "FP8 NaN codes")
