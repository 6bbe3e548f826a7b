"""Shared quantization math (ct-format.md §2): strategies, quantize, dequantize, qparams, g_idx.

Expected values come from the literal definitions of §2, written here element by element with
explicit index arithmetic (``s[r // bh, c // bw]``…), not from qmath's broadcasting.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.formats import get_format

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quant_args(**fields) -> QuantArgs:
    return QuantArgs.from_dict(fields, key="weights")


def strategy_fields(strategy: str, group_size: int = 32, block: tuple[int, int] = (16, 32)) -> dict:
    if strategy == "group":
        return {"strategy": "group", "group_size": group_size}
    if strategy == "block":
        return {"strategy": "block", "block_structure": list(block)}
    return {"strategy": strategy}


def param_index(
    args: QuantArgs, shape: tuple[int, ...], g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (row_index, col_index), each (rows, cols), that pick the parameter element
    of every weight element (§2.3 table)."""
    *_, rows, cols = shape
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    if args.strategy == "tensor":
        return torch.zeros_like(r), torch.zeros_like(c)
    if args.strategy == "channel":
        return r, torch.zeros_like(c)
    if args.strategy == "group":
        if g_idx is not None:
            return r, g_idx.to(torch.int64).unsqueeze(0).expand(rows, cols)
        return r, c // args.group_size
    bh, bw = args.block_structure
    return r // bh, c // bw


def gather(
    param: torch.Tensor, args: QuantArgs, shape: tuple[int, ...], g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The parameter element of every weight element: ``param[..., row_index, col_index]``."""
    rows, cols = param_index(args, tuple(shape), g_idx)
    if args.strategy == "tensor":
        return param.reshape(()).expand(tuple(shape))
    return param[..., rows, cols].expand(tuple(shape))


def literal_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(q - zp) * s`` in float64, rounded once to the scale's dtype."""
    values = q.to(torch.float64)
    if zero_point is not None:
        values = values - gather(zero_point, args, q.shape, g_idx).to(torch.float64)
    return (values * gather(scale, args, q.shape, g_idx).to(torch.float64)).to(scale.dtype)


def literal_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``round(clamp(x / s + zp))``: the division in the promoted dtype of x and s, the zero point
    added in x's dtype (§2.2, the library's CPU path); FP8 rounds by the RNE cast after clamping
    to +-448."""
    scaled = x / gather(scale, args, x.shape, g_idx)
    if zero_point is not None:
        scaled = scaled + gather(zero_point, args, x.shape, g_idx).to(x.dtype)
    if args.type == "float":
        return torch.clamp(scaled, -448.0, 448.0).to(torch.float8_e4m3fn)
    low, high = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    return torch.round(torch.clamp(scaled, low, high))


# ---------------------------------------------------------------------------------------------
# param_shape and check_param


@pytest.mark.parametrize(
    ("fields", "weight_shape", "expected"),
    [
        pytest.param({"strategy": "tensor"}, (64, 256), (1,), id="tensor"),
        pytest.param({"strategy": "tensor"}, (4, 64, 256), (1,), id="tensor-3d"),
        pytest.param({"strategy": "channel"}, (64, 256), (64, 1), id="channel"),
        pytest.param({"strategy": "channel"}, (4, 64, 256), (4, 64, 1), id="channel-3d"),
        pytest.param({"group_size": 128}, (64, 256), (64, 2), id="group"),
        pytest.param({"group_size": 128}, (64, 300), (64, 3), id="group-ragged"),
        pytest.param({"group_size": 128}, (4, 64, 300), (4, 64, 3), id="group-ragged-3d"),
        pytest.param(
            {"strategy": "block", "block_structure": [128, 128]}, (256, 384), (2, 3), id="block"
        ),
        pytest.param(
            {"strategy": "block", "block_structure": [128, 128]},
            (200, 300),
            (2, 3),
            id="block-ragged",
        ),
        pytest.param(
            {"strategy": "block", "block_structure": [128, 64]},
            (2, 200, 300),
            (2, 2, 5),
            id="block-ragged-3d",
        ),
    ],
)
def test_param_shape(fields, weight_shape, expected):
    args = quant_args(num_bits=4, **fields)
    assert qmath.param_shape(args, weight_shape) == expected
    qmath.check_param(torch.empty(expected), args, weight_shape, name="weight_scale")


def test_check_param_accepts_a_shared_2d_param_for_3d_experts():
    args = quant_args(num_bits=4, group_size=128)
    qmath.check_param(torch.empty(64, 3), args, (4, 64, 300), name="weight_scale")


@pytest.mark.parametrize(
    ("fields", "bad_shape"),
    [
        pytest.param({"strategy": "tensor"}, (), id="tensor-0d"),
        pytest.param({"strategy": "channel"}, (64,), id="channel-1d"),
        pytest.param({"group_size": 128}, (64, 2), id="group-floor-instead-of-ceil"),
        pytest.param(
            {"strategy": "block", "block_structure": [128, 128]}, (1, 2), id="block-floor"
        ),
    ],
)
def test_check_param_rejects_shapes_not_fitting_the_strategy(fields, bad_shape):
    args = quant_args(num_bits=4, **fields)
    with pytest.raises(CTRefError, match=r"weight_scale: expected shape .* found"):
        qmath.check_param(torch.empty(bad_shape), args, (64, 300), name="weight_scale")


def test_param_shape_refuses_the_dynamic_token_strategy():
    """Per-token scales are computed at run time: nothing of theirs is stored."""
    args = quant_args(num_bits=8, strategy="token", dynamic=True)
    with pytest.raises(CTRefError, match="'token'") as caught:
        qmath.param_shape(args, (64, 256))
    assert caught.value.key == "strategy"


# ---------------------------------------------------------------------------------------------
# quantize


def test_quantize_rounds_exact_ties_half_to_even():
    args = quant_args(num_bits=8)
    x = torch.tensor([[-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 126.5]])
    codes = qmath.quantize(x, torch.tensor([1.0]), args=args)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[-4, -2, -2, 0, 0, 2, 2, 4, 126]]


@pytest.mark.parametrize(
    ("bits", "ratios", "expected"),
    [
        pytest.param(
            4,
            [7.4, 7.5, 7.6, 1e4, -7.5, -8.4, -8.5, -8.6, -1e4],
            [7, 7, 7, 7, -8, -8, -8, -8, -8],
            id="int4",
        ),
        pytest.param(8, [127.5, 300.0, -128.5, -300.0], [127, 127, -128, -128], id="int8"),
        pytest.param(1, [0.4, 0.5, 3.0, -0.5, -0.6, -3.0], [0, 0, 0, 0, -1, -1], id="int1"),
    ],
)
def test_quantize_clamps_to_the_signed_range(bits, ratios, expected):
    args = quant_args(num_bits=bits)
    codes = qmath.quantize(
        torch.tensor([ratios], dtype=torch.float64), torch.tensor([1.0]), args=args
    )
    assert codes.tolist() == [expected]


def test_quantize_fp8_saturates_at_448_and_rounds_to_nearest_even():
    args = quant_args(num_bits=8, type="float")
    x = torch.tensor([[1000.0, -1000.0, 449.0, 0.3, 17.0, 19.0]])
    codes = qmath.quantize(x, torch.tensor([1.0]), args=args)
    assert codes.dtype == torch.float8_e4m3fn
    # E4M3 spacing is 2 in [16, 32): 17 ties to 16 (even mantissa), 19 ties to 20.
    assert codes.float().tolist() == [[448.0, -448.0, 448.0, 0.3125, 16.0, 20.0]]


def test_quantize_adds_the_zero_point_in_the_weight_dtype():
    """bf16: 0.515625 + (-100) rounds to -99.5 in bf16, then half-to-even to -100. With an fp32
    scale the quotient is fp32 and the sum -99.484375 rounds to -99 (the library does both)."""
    args = quant_args(num_bits=8, symmetric=False)
    x = torch.tensor([[0.515625]], dtype=torch.bfloat16)
    zero_point = torch.tensor([-100], dtype=torch.int8)
    bf16_scale = torch.tensor([1.0], dtype=torch.bfloat16)
    assert qmath.quantize(x, bf16_scale, zero_point, args=args).tolist() == [[-100]]
    assert qmath.quantize(x, bf16_scale.float(), zero_point, args=args).tolist() == [[-99]]


# ---------------------------------------------------------------------------------------------
# dequantize

STRATEGY_CASES = [
    pytest.param("tensor", (24, 80), id="tensor"),
    pytest.param("channel", (24, 80), id="channel"),
    pytest.param("group", (24, 96), id="group"),
    pytest.param("group", (24, 80), id="group-ragged"),
    pytest.param("block", (24, 80), id="block-ragged"),
    pytest.param("block", (32, 96), id="block"),
    pytest.param("group", (3, 24, 80), id="group-ragged-3d"),
    pytest.param("block", (3, 24, 80), id="block-ragged-3d"),
]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize(("strategy", "shape"), STRATEGY_CASES)
def test_dequantize_is_the_literal_definition(strategy, shape, scale_dtype, symmetric):
    args = quant_args(num_bits=8, symmetric=symmetric, **strategy_fields(strategy))
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    params = qmath.param_shape(args, shape)
    scale = (torch.rand(params, generator=generator) * 1e-2 + 1e-4).to(scale_dtype)
    zero_point = None
    if not symmetric:
        zero_point = torch.randint(-128, 128, params, generator=generator, dtype=torch.int8)
    out = qmath.dequantize(q, scale, zero_point, args=args)
    assert out.dtype == scale_dtype
    assert torch.equal(out, literal_dequantize(q, scale, zero_point, args))


def test_dequantize_fp8_codes_in_the_scale_dtype():
    args = quant_args(num_bits=8, type="float", strategy="channel")
    generator = torch.Generator().manual_seed(1)
    q = (torch.randn(16, 64, generator=generator) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(16, 1, generator=generator).to(torch.bfloat16)
    out = qmath.dequantize(q, scale, args=args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, literal_dequantize(q, scale, None, args))


# ---------------------------------------------------------------------------------------------
# quantize -> dequantize, and the formats' encode -> decode, over random weights and schemes


@st.composite
def quantization_cases(draw):
    """(weight, args): int 1..8 bits or fp8, every weight strategy, ragged and 3-D shapes."""
    is_fp8 = draw(st.integers(0, 3)) == 0  # one case in four
    bits = 8 if is_fp8 else draw(st.integers(1, 8))
    symmetric = True if is_fp8 else draw(st.booleans())
    strategy = draw(st.sampled_from(["tensor", "channel", "group", "block"]))
    fields = strategy_fields(
        strategy,
        group_size=draw(st.sampled_from([8, 16, 32])),
        block=draw(st.sampled_from([(8, 16), (16, 32)])),
    )
    args = quant_args(
        num_bits=bits, type="float" if is_fp8 else "int", symmetric=symmetric, **fields
    )
    lead = draw(st.lists(st.integers(1, 3), max_size=1))
    shape = (*lead, draw(st.integers(1, 40)), draw(st.integers(1, 70)))
    dtype = draw(st.sampled_from(WEIGHT_DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = 0.0 if symmetric else draw(st.sampled_from([0.0, 1.0, -2.0]))
    weight = (torch.randn(shape, generator=generator) + offset).to(dtype)
    return weight, args


@given(quantization_cases())
def test_fake_quantize_is_the_literal_definition(case):
    weight, args = case
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args)
    expected = literal_quantize(weight, qparams.scale, qparams.zero_point, args)
    if args.type == "int":
        assert codes.dtype == torch.int8
        assert torch.equal(codes.to(expected.dtype), expected)
    else:
        assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    fake = qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=args)
    assert torch.equal(fake, literal_dequantize(codes, qparams.scale, qparams.zero_point, args))


@given(quantization_cases())
def test_int_fake_quantize_error_is_within_half_a_step_plus_rounding(case):
    """The observed range is covered: no element is clipped beyond its quantization step.

    Half a step, plus the weight dtype's roundings (unit roundoff u) of ``x / s`` and of the zero
    point sum, both below ``2**b`` steps in magnitude, and of the product: at most ``4 * 2**b * u``.
    """
    weight, args = case
    if args.type != "int":
        return
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args)
    fake = qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=args)
    step = gather(qparams.scale, args, weight.shape).to(torch.float64)
    error = (fake.to(torch.float64) - weight.to(torch.float64)).abs()
    unit_roundoff = torch.finfo(weight.dtype).eps / 2
    assert bool((error <= (0.5 + 4 * 2**args.num_bits * unit_roundoff) * step).all())


@given(quantization_cases())
def test_encode_then_decode_is_fake_quantize(case):
    weight, args = case
    format_name = "pack-quantized" if args.type == "int" else "naive-quantized"
    fmt = get_format(format_name)
    qparams = qmath.qparams_for(weight, args)
    decoded = fmt.decode(fmt.encode(weight, args, qparams=qparams), args, layout="dense")
    codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args)
    assert torch.equal(
        decoded, qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=args)
    )


# ---------------------------------------------------------------------------------------------
# calculate_qparams and qparams_for


def fp32(values: list[float]) -> torch.Tensor:
    """The exact quotients, rounded once to fp32 (what a correctly rounded division gives)."""
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def test_int4_symmetric_scale_is_amax_over_7_5():
    args = quant_args(num_bits=4, strategy="channel")
    low = torch.tensor([[-3.0], [-1.0], [0.5]])
    high = torch.tensor([[1.0], [7.5], [2.0]])
    scale, zero_point = qmath.calculate_qparams(low, high, args)
    assert zero_point is None
    assert torch.equal(scale.flatten(), fp32([3.0 / 7.5, 7.5 / 7.5, 2.0 / 7.5]))


@pytest.mark.parametrize(("bits", "divisor"), [(8, 127.5), (2, 1.5), (1, 0.5)])
def test_symmetric_scale_uses_half_the_full_range(bits, divisor):
    args = quant_args(num_bits=bits)
    scale, _ = qmath.calculate_qparams(torch.tensor([-3.0]), torch.tensor([1.5]), args)
    assert torch.equal(scale, fp32([3.0 / divisor]))


def test_fp8_symmetric_scale_is_amax_over_448():
    args = quant_args(num_bits=8, type="float")
    scale, zero_point = qmath.calculate_qparams(torch.tensor([-896.0]), torch.tensor([10.0]), args)
    assert zero_point is None and scale.tolist() == [2.0]


def test_asymmetric_zero_points_at_the_range_edges():
    """All-positive rows put 0 at qmin (zp = -8); all-negative rows put 0 at qmax (zp = 7)."""
    args = quant_args(num_bits=4, symmetric=False, strategy="channel")
    low = torch.tensor([[0.0], [-15.0], [-5.0]])
    high = torch.tensor([[15.0], [0.0], [10.0]])
    scale, zero_point = qmath.calculate_qparams(low, high, args)
    assert scale.flatten().tolist() == [1.0, 1.0, 1.0]
    assert zero_point.dtype == torch.int8
    assert zero_point.flatten().tolist() == [-8, 7, -3]


def test_ranges_always_include_zero():
    """[2, 4] is treated as [0, 4]: symmetric amax 4, asymmetric zp at qmin."""
    low, high = torch.tensor([2.0]), torch.tensor([4.0])
    sym_scale, _ = qmath.calculate_qparams(low, high, quant_args(num_bits=4))
    assert torch.equal(sym_scale, fp32([4.0 / 7.5]))
    asym_scale, zero_point = qmath.calculate_qparams(
        -high, -low, quant_args(num_bits=4, symmetric=False)
    )
    assert torch.equal(asym_scale, fp32([4.0 / 15])) and zero_point.tolist() == [7]


def literal_min_max(weight: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per parameter element, the min and max of the weight elements it scales (§2.3 table)."""
    params = qmath.param_shape(args, weight.shape)
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    rows, cols = param_index(args, tuple(weight.shape))
    low, high = torch.empty(params), torch.empty(params)
    for r in range(params[-2]):
        for c in range(params[-1]):
            members = weight[..., (rows == r) & (cols == c)]
            low[..., r, c], high[..., r, c] = members.amin(dim=-1), members.amax(dim=-1)
    return low, high


@pytest.mark.parametrize(("strategy", "shape"), STRATEGY_CASES)
def test_observe_min_max_covers_each_params_elements(strategy, shape):
    """Ragged blocks may be zero-padded (the writer pads): compared with every range widened to
    include 0, as calculate_qparams does. Normal weights have both signs in every group."""
    args = quant_args(num_bits=4, **strategy_fields(strategy))
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    observed, literal = qmath.observe_min_max(weight, args), literal_min_max(weight, args)
    assert torch.equal(observed[0].clamp(max=0), literal[0].clamp(max=0))
    assert torch.equal(observed[1].clamp(min=0), literal[1].clamp(min=0))
    assert bool((literal[0] < 0).all() and (literal[1] > 0).all())


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_an_all_zero_group_gets_the_dtype_eps(dtype, symmetric):
    args = quant_args(num_bits=4, symmetric=symmetric, group_size=8)
    weight = torch.randn(2, 16).to(dtype)
    weight[1, 8:] = 0
    qparams = qmath.qparams_for(weight, args)
    assert qparams.scale.dtype == dtype
    assert qparams.scale[1, 1].item() == torch.finfo(dtype).eps
    assert bool((qparams.scale[0] > torch.finfo(dtype).eps).all())
    codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args)
    fake = qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=args)
    assert bool((fake[1, 8:] == 0).all())


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_qparams_for_keeps_the_weight_dtype(dtype):
    weight = torch.randn(8, 32).to(dtype)
    qparams = qmath.qparams_for(weight, quant_args(num_bits=4, symmetric=False, group_size=16))
    assert qparams.scale.dtype == dtype and qparams.scale.shape == (8, 2)
    assert qparams.zero_point.dtype == torch.int8 and qparams.zero_point.shape == (8, 2)
    assert qparams.global_scale is None and qparams.g_idx is None


# ---------------------------------------------------------------------------------------------
# act-order g_idx (§2.4)


def permuted_g_idx(cols: int, group_size: int, seed: int) -> torch.Tensor:
    """Each group index exactly ``group_size`` times, in shuffled column order."""
    groups = torch.arange(math.ceil(cols / group_size)).repeat_interleave(group_size)[:cols]
    order = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
    return groups[order].to(torch.int32)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(8, 64), (2, 8, 64)], ids=["2d", "3d"])
def test_dequantize_with_g_idx_gathers_per_column(shape, symmetric):
    args = quant_args(num_bits=4, symmetric=symmetric, group_size=16)
    g_idx = permuted_g_idx(shape[-1], 16, seed=3)
    generator = torch.Generator().manual_seed(4)
    q = torch.randint(-8, 8, shape, generator=generator, dtype=torch.int8)
    params = qmath.param_shape(args, shape)
    scale = torch.rand(params, generator=generator).to(torch.bfloat16)
    zero_point = (
        None if symmetric else torch.randint(-8, 8, params, generator=generator, dtype=torch.int8)
    )
    out = qmath.dequantize(q, scale, zero_point, args=args, g_idx=g_idx)
    assert torch.equal(out, literal_dequantize(q, scale, zero_point, args, g_idx))
    contiguous = qmath.dequantize(q, scale, zero_point, args=args)
    assert not torch.equal(out, contiguous)


def test_quantize_with_g_idx_gathers_per_column():
    args = quant_args(num_bits=4, symmetric=False, group_size=16)
    g_idx = permuted_g_idx(64, 16, seed=5)
    weight = torch.randn(8, 64, dtype=torch.float16)
    qparams = qmath.qparams_for(weight, args, g_idx)
    codes = qmath.quantize(weight, qparams.scale, qparams.zero_point, args=args, g_idx=g_idx)
    expected = literal_quantize(weight, qparams.scale, qparams.zero_point, args, g_idx)
    assert torch.equal(codes.to(weight.dtype), expected)


def test_observe_min_max_with_g_idx_takes_each_groups_columns():
    args = quant_args(num_bits=4, group_size=16)
    g_idx = permuted_g_idx(64, 16, seed=6)
    weight = torch.randn(2, 8, 64)
    low, high = qmath.observe_min_max(weight, args, g_idx)
    assert low.shape == high.shape == (2, 8, 4)
    for group in range(4):
        columns = weight[..., g_idx == group]
        assert torch.equal(low[..., group], columns.amin(dim=-1))
        assert torch.equal(high[..., group], columns.amax(dim=-1))


def test_the_all_minus_one_g_idx_placeholder_means_contiguous_groups():
    args = quant_args(num_bits=4, group_size=16)
    weight = torch.randn(4, 64)
    placeholder = torch.full((64,), -1, dtype=torch.int32)
    assert qmath.g_idx_is_placeholder(placeholder)
    observed = qmath.observe_min_max(weight, args, placeholder)
    contiguous = qmath.observe_min_max(weight, args)
    assert torch.equal(observed[0], contiguous[0]) and torch.equal(observed[1], contiguous[1])
    q = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    scale = torch.rand(4, 4)
    assert torch.equal(
        qmath.dequantize(q, scale, args=args, g_idx=placeholder),
        qmath.dequantize(q, scale, args=args),
    )


@pytest.mark.parametrize(
    ("g_idx", "rule"),
    [
        pytest.param(torch.zeros(63, dtype=torch.int32), r"expected shape \(64,\)", id="short"),
        pytest.param(
            torch.full((64,), 4, dtype=torch.int32), r"must lie in \[0, 3\]", id="too-large"
        ),
        pytest.param(
            torch.tensor([-1] + [0] * 63, dtype=torch.int32), r"must lie in \[0, 3\]", id="negative"
        ),
        pytest.param(torch.zeros(64), "integer dtype", id="float"),
    ],
)
def test_check_g_idx_rejects(g_idx, rule):
    with pytest.raises(CTRefError, match=f"weight_g_idx: .*{rule}"):
        qmath.check_g_idx(g_idx, quant_args(num_bits=4, group_size=16), 64, name="weight_g_idx")
