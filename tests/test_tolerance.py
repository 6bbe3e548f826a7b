"""ctref.tolerance: the policy table, its calibration, and its power both ways.

Legitimate variations of one computation (another accumulation order, bf16 math, fp16 split-K)
must stay well inside the bound; the errors of the common structural bugs must lie orders of
magnitude outside it. The end-to-end proofs with whole backends are in
tests/test_conformance_catches_bugs.py; here the numbers are checked directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from ctref import qmath, tolerance
from ctref.config import QuantArgs
from ctref.forward import linear, quantize_activation

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ACTIVATIONS = {
    "none": None,
    "int8-token": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
    "fp8-token": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
    "fp8-group": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "dynamic": True},
    "nvfp4": {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": True,
        "scale_dtype": "torch.float8_e4m3fn",
    },
}


def args_of(name: str) -> QuantArgs | None:
    spec = ACTIVATIONS[name]
    return None if spec is None else QuantArgs.from_dict(spec, key="input_activations")


def layer(k: int, n: int = 48, m: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 inputs (M, K) and a bf16 weight (N, K), as the fixtures hold them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=generator) / math.sqrt(k)).to(torch.bfloat16)
    return x, w


def reference(x: torch.Tensor, w: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    return linear(x, w, input_args=args)


def bound(x: torch.Tensor, w: torch.Tensor, args: QuantArgs | None, dtype: torch.dtype) -> tolerance.Bound:
    gap = tolerance.reference_gap(
        lambda of: linear(x, w, input_args=args, compute_dtype=of), x, w
    )
    return tolerance.layer_bound(args, dtype, x, w, reference_dtype=x.dtype, gap32=gap)


# --- the table ------------------------------------------------------------------------------


def test_every_row_has_a_derivation_and_every_dtype_a_finite_bound():
    table = tolerance.policy()
    assert table["policy"]["derivation"] and table["weights"]["derivation"]
    x, w = layer(64)
    for family in ("none", "int", "fp8", "fp6", "fp4"):
        assert table["activation"][family]["derivation"], family
    for name in ACTIVATIONS:
        for dtype in DTYPES:
            b = bound(x, w, args_of(name), dtype)
            assert 0 < b.rel_frobenius < 1 and 0 < b.max_normalized < 1, (name, dtype, b)
            assert "tolerances.toml" in b.derivation


def test_bounds_grow_with_the_compute_dtypes_roundoff_and_with_k():
    x, w = layer(256)
    fp64, fp32, bf16, fp16 = (bound(x, w, None, dtype).rel_frobenius for dtype in DTYPES)
    assert fp64 < fp32 < fp16 < bf16
    short, long = layer(16), layer(4096)
    assert bound(*short, None, torch.float32).rel_frobenius < bound(*long, None, torch.float32).rel_frobenius


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="no tolerance row"):
        tolerance.unit_roundoff(torch.int8)


# --- calibration: the model explains the reference's own fp32-vs-fp64 gap --------------------


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("k", [16, 256, 2048])
def test_error_model_covers_the_reference_own_gap(name, k):
    x, w = layer(k, seed=k)
    b = bound(x, w, args_of(name), torch.float32)
    gap = tolerance.reference_gap(lambda of: linear(x, w, input_args=args_of(name), compute_dtype=of), x, w)
    assert b.calibration == 1.0, f"the fp32 model is optimistic by {b.calibration:.3g}"
    assert gap[0] <= b.model.frobenius and gap[1] <= b.model.elementwise


def test_a_gap_above_the_model_widens_every_bound_by_the_same_factor():
    x, w = layer(64)
    plain = tolerance.layer_bound(None, torch.bfloat16, x, w)
    fp32_model = tolerance.layer_bound(None, torch.float32, x, w).model.frobenius
    widened = tolerance.layer_bound(None, torch.bfloat16, x, w, gap32=(10 * fp32_model, 0.0))
    assert widened.calibration == pytest.approx(10)
    assert widened.rel_frobenius == pytest.approx(10 * plain.rel_frobenius)


# --- legitimate variations pass -------------------------------------------------------------


def reversed_chunks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[0])
    for start in reversed(range(0, x.shape[1], 16)):
        out += x[:, start : start + 16].float() @ w[:, start : start + 16].float().T
    return out


def split_k_fp16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    half = x.shape[1] // 2
    x16, w16 = x.half().float(), w.half().float()
    return (x16[:, half:] @ w16[:, half:].T + x16[:, :half] @ w16[:, :half].T).half()


VARIANTS = {
    # name: (dtype activations are quantized in, GEMM)
    "fp32-blas": (torch.float32, lambda x, w: x.float() @ w.float().T),
    "fp32-reversed-chunks": (torch.float32, reversed_chunks),
    "bf16-math": (torch.bfloat16, lambda x, w: x.bfloat16() @ w.bfloat16().T),
    "fp16-split-k": (torch.float32, split_k_fp16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("k", [32, 512])
def test_legitimate_variations_stay_inside_the_bound(variant, name, k):
    activation_dtype, gemm = VARIANTS[variant]
    x, w = layer(k, seed=3 * k + 1)
    args = args_of(name)
    quantized = x.to(activation_dtype) if args is None else quantize_activation(x.to(activation_dtype), args)
    actual = gemm(quantized, w)
    b = bound(x, w, args, actual.dtype)
    error = tolerance.output_error(actual, reference(x, w, args), x, w)
    assert not b.violations(error)
    # With room to spare: a legitimate engine is not a coin flip away from failing.
    assert error.rel_frobenius <= b.rel_frobenius / 2 and error.max_normalized <= b.max_normalized / 2


# --- common bugs fail by orders of magnitude --------------------------------------------------

W4_GROUP = QuantArgs.from_dict(
    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False},
    key="weights",
)


def quantized_weight(w: torch.Tensor) -> tuple[torch.Tensor, qmath.QParams]:
    qparams = qmath.qparams_for(w, W4_GROUP)
    return qmath.quantize(w, qparams.scale, qparams.zero_point, args=W4_GROUP), qparams


def dequantized(codes: torch.Tensor, qparams: qmath.QParams) -> torch.Tensor:
    return qmath.dequantize(codes, qparams.scale, qparams.zero_point, args=W4_GROUP)


def swap_nibbles(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.reshape(codes.shape[0], -1, 2)
    return pairs.flip(-1).reshape(codes.shape)


BUGS = {
    "zero point off by one": lambda c, q: dequantized(c, qmath.QParams(q.scale, q.zero_point + 1)),
    "nibble order swapped": lambda c, q: dequantized(swap_nibbles(c), q),
    "scale read transposed": lambda c, q: dequantized(
        c, qmath.QParams(q.scale.t().contiguous().reshape(q.scale.shape), q.zero_point)
    ),
    "groups shifted by one column": lambda c, q: dequantized(c.roll(1, dims=1), q),
}


@pytest.mark.parametrize("bug", list(BUGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_structural_bugs_fail_by_orders_of_magnitude(bug, dtype):
    x, w = layer(128, n=32, seed=7)
    codes, qparams = quantized_weight(w.float())
    good = dequantized(codes, qparams)
    broken = BUGS[bug](codes, qparams)
    b = tolerance.layer_bound(None, dtype, x, good, reference_dtype=x.dtype)
    error = tolerance.output_error(x.to(dtype) @ broken.to(dtype).T, reference(x, good, None), x, good)
    assert error.rel_frobenius > 100 * b.rel_frobenius, (bug, error, b.rel_frobenius)
    assert error.max_normalized > 100 * b.max_normalized


def test_nvfp4_global_scale_multiplied_is_off_by_its_square():
    x, w = layer(64, n=16)
    args = QuantArgs.from_dict(ACTIVATIONS["nvfp4"] | {"dynamic": False}, key="weights")
    qparams = qmath.qparams_for(w, args)
    values = qmath.quantize(w, qparams.scale.to(w.dtype), args=args, global_scale=qparams.global_scale)
    good = qmath.dequantize(values, qparams.scale.to(torch.bfloat16), args=args, global_scale=qparams.global_scale)
    broken = qmath.dequantize(values, qparams.scale.to(torch.bfloat16), args=args, global_scale=1 / qparams.global_scale)
    b = tolerance.layer_bound(None, torch.float32, x, good)
    error = tolerance.output_error(x.float() @ broken.float().T, reference(x, good, None), x, good)
    assert error.rel_frobenius > 1e6 * b.rel_frobenius


def test_nan_and_inf_always_fail():
    x, w = layer(32)
    ref = reference(x, w, None)
    loose = tolerance.layer_bound(None, torch.float16, x, w, gap32=(1e3, 1e3))
    for poison in (math.nan, math.inf):
        actual = ref.float().clone()
        actual[0, 0] = poison
        violations = loose.violations(tolerance.output_error(actual, ref, x, w))
        assert violations == ["1 NaN/Inf output element(s) (always a failure)"]


# --- weights --------------------------------------------------------------------------------


def test_weights_same_dtype_must_be_exact():
    w = layer(64)[1]
    assert tolerance.weight_error(w.clone(), w).passed
    off = w.clone()
    off.view(torch.int16)[3, 5] += 1  # the next bf16 value: one ULP
    error = tolerance.weight_error(off, w)
    assert not error.passed and error.mismatches == 1 and error.worst_index == (3, 5)
    assert "[3, 5]" in error.describe()


def test_weights_in_another_dtype_are_held_to_the_coarser_dtypes_ulp_budget():
    w = layer(64)[1]
    assert tolerance.weight_error(w.float(), w).passed  # exact widening
    assert tolerance.weight_error(w.half(), w).passed  # bf16 values fit fp16 here
    precise = w.float() * (1 + 2.0**-12)  # finer than one bf16 ULP: the format's precision
    assert tolerance.weight_error(precise, w).passed
    one_step = w.float() * (1 + 2.0**-5)  # several bf16 ULPs
    error = tolerance.weight_error(one_step, w)
    assert not error.passed and error.max_ulp > 2


def test_nan_weights_fail():
    w = layer(16)[1]
    bad = w.clone()
    bad[0, 0] = math.nan
    error = tolerance.weight_error(bad, w)
    assert not error.passed and "NaN/Inf" in error.describe()


def test_logits_bound_scales_with_dtype_and_rejects_nan():
    logits = torch.randn(1, 4, 32, dtype=torch.float64)
    fp32 = tolerance.model_bound(torch.float32, 1e-7, quantized_layers=4, widest_activation_term=0.0)
    bf16 = tolerance.model_bound(torch.bfloat16, 1e-7, quantized_layers=4, widest_activation_term=0.0)
    assert fp32.rel_frobenius < bf16.rel_frobenius < 0.1
    close = tolerance.logits_error(logits.float(), logits)
    assert not fp32.violations(close)
    broken = logits.clone()
    broken[0, 1, 3] = math.nan
    assert fp32.violations(tolerance.logits_error(broken, logits))
