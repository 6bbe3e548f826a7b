"""ctref.forward: activation fake-quantization and the reference Linear.

Dynamic schemes are checked against their literal definitions and, bit for bit, against the peer
library's own fake quantization (the function its forward pass applies to activations); static
ones must use the stored parameters and clamp what lies beyond them.
"""

from __future__ import annotations

import pytest
import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.forward import linear, quantize_activation


def args_of(**fields) -> QuantArgs:
    return QuantArgs.from_dict(fields, key="input_activations")


def activation(shape=(1, 5, 64), dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 3).to(dtype)


INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}


def test_dynamic_int8_token_is_per_row_amax_over_127_5():
    x = activation()
    out = quantize_activation(x, args_of(**INT8_TOKEN))
    rows = x.reshape(-1, 64)
    scale = rows.abs().amax(dim=-1, keepdim=True) / 127.5
    codes = torch.round(torch.clamp(rows / scale, -128, 127))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out.reshape(-1, 64), (codes * scale).to(x.dtype))
    # One scale per token: tokens of very different magnitude keep their relative precision.
    big = x.clone()
    big[0, 0] *= 1000
    again = quantize_activation(big, args_of(**INT8_TOKEN))
    assert torch.equal(again[0, 1:], out[0, 1:])


def test_dynamic_tensor_uses_one_scale_for_everything():
    x = activation()
    out = quantize_activation(x, args_of(num_bits=8, type="float", strategy="tensor", dynamic=True))
    scale = x.abs().amax() / 448
    expected = torch.clamp(x / scale, -448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale
    assert torch.equal(out, expected.to(x.dtype))


def test_dynamic_group_scales_each_group_of_k():
    x = activation(shape=(3, 64))
    x[:, 32:] *= 100  # the second group is much larger: a per-group scale keeps group 0 precise
    args = args_of(num_bits=8, type="int", strategy="group", group_size=32, dynamic=True)
    out = quantize_activation(x, args)
    first = quantize_activation(x[:, :32].contiguous(), args_of(**INT8_TOKEN))
    assert torch.equal(out[:, :32], first)


def test_static_uses_stored_scale_and_clamps_outliers_without_nan():
    """N1: values beyond input_scale * 448 must saturate, not turn into NaN (e4m3fn has no inf)."""
    args = args_of(num_bits=8, type="float", strategy="tensor", dynamic=False)
    scale = torch.tensor([0.01], dtype=torch.bfloat16)
    x = torch.tensor([[1.0, -100.0, 1000.0]], dtype=torch.bfloat16)
    out = quantize_activation(x, args, scale=scale)
    assert torch.isfinite(out).all()
    assert out[0, 1].item() == pytest.approx(-448 * 0.01, rel=1e-2)
    assert out[0, 2].item() == pytest.approx(448 * 0.01, rel=1e-2)


def test_static_asymmetric_applies_the_stored_zero_point():
    args = args_of(num_bits=8, type="int", strategy="tensor", symmetric=False, dynamic=False)
    scale = torch.tensor([0.5], dtype=torch.float32)
    zero_point = torch.tensor([-100], dtype=torch.int8)
    x = torch.tensor([[0.0, 10.0, 200.0]], dtype=torch.float32)
    out = quantize_activation(x, args, scale=scale, zero_point=zero_point)
    # q = clamp(round(x / 0.5 - 100), -128, 127); x = (q + 100) * 0.5: 200 saturates at 113.5.
    assert out.tolist() == [[0.0, 10.0, 113.5]]


def test_static_group_scales_apply_to_every_token():
    """A static group input scale is stored as (K/g,) and shared by all tokens."""
    args = args_of(num_bits=8, type="int", strategy="group", group_size=32, dynamic=False)
    scale = torch.tensor([0.5, 0.25], dtype=torch.float32)
    x = activation(shape=(3, 64), dtype=torch.float32)
    out = quantize_activation(x, args, scale=scale)
    per_column = scale.repeat_interleave(32)
    assert torch.equal(out, torch.round(torch.clamp(x / per_column, -128, 127)) * per_column)


def test_local_tensor_group_divides_by_the_stored_global_scale():
    args = args_of(
        num_bits=4,
        type="float",
        strategy="tensor_group",
        group_size=16,
        dynamic="local",
        scale_dtype="torch.float8_e4m3fn",
    )
    x = activation(shape=(2, 32), dtype=torch.float32)
    gs = qmath.global_scale_for(x)
    out = quantize_activation(x, args, global_scale=gs)
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
    local = (x.reshape(2, 2, 16).abs().amax(-1) / 6 * gs).to(torch.float8_e4m3fn).float() / gs
    values = out.reshape(2, 2, 16) / local.unsqueeze(-1)
    assert torch.isin(values.abs().round(decimals=4), grid).all()


def test_mx_activation_scales_are_powers_of_two():
    args = args_of(
        num_bits=8,
        type="float",
        strategy="group",
        group_size=32,
        dynamic=True,
        scale_dtype="torch.uint8",
    )
    x = activation(shape=(2, 64), dtype=torch.float32)
    out = quantize_activation(x, args)
    low, high = qmath.observe_min_max(x, args)
    scale = qmath.calculate_qparams(low, high, args)[0]
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
    assert torch.equal(out, qmath.dequantize(qmath.quantize(x, scale, args=args), scale, args=args))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}, "input_scale"),
        (
            {
                "num_bits": 4,
                "type": "float",
                "strategy": "tensor_group",
                "group_size": 16,
                "dynamic": "local",
            },
            "input_global_scale",
        ),
    ],
    ids=["static-without-scale", "local-without-global-scale"],
)
def test_missing_stored_parameters_raise(fields, message):
    with pytest.raises(CTRefError, match=message):
        quantize_activation(activation(), args_of(**fields))


def test_linear_is_fakequant_input_times_weight_transposed_plus_bias():
    x = activation(shape=(5, 64))
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 64, generator=generator).to(torch.bfloat16)
    bias = torch.randn(7, generator=generator).to(torch.bfloat16)
    args = args_of(**FP8_TOKEN)
    y = linear(x, weight, bias=bias, input_args=args)
    fake = quantize_activation(x, args).double()
    expected = torch.zeros(5, 7, dtype=torch.float64)
    for k in range(64):  # the sum runs in index order, whatever the CPU
        expected = expected + fake[:, k : k + 1] * weight[:, k].double()
    assert y.dtype == torch.float64 and torch.equal(y, expected + bias.double())
    assert torch.allclose(linear(x, weight), x.double() @ weight.double().T, rtol=1e-12, atol=1e-12)
    with pytest.raises(CTRefError, match="weight"):
        linear(x, weight[:, :32])


PEER_CASES = [
    pytest.param(INT8_TOKEN, {}, id="int8-token"),
    pytest.param(dict(INT8_TOKEN, symmetric=False), {}, id="int8-token-asym"),
    pytest.param(FP8_TOKEN, {}, id="fp8-token"),
    pytest.param(
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True}, {}, id="fp8-tensor"
    ),
    pytest.param(
        {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "dynamic": True},
        {},
        id="fp8-group32",
    ),
    pytest.param(
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "group",
            "group_size": 32,
            "dynamic": True,
            "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8",
        },
        {},
        id="mxfp4",
    ),
    pytest.param(
        {
            "num_bits": 8,
            "type": "float",
            "strategy": "group",
            "group_size": 32,
            "dynamic": True,
            "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8",
        },
        {},
        id="mxfp8",
    ),
    pytest.param(
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "dynamic": "local",
            "scale_dtype": "torch.float8_e4m3fn",
            "zp_dtype": "torch.float8_e4m3fn",
        },
        {"global": True},
        id="nvfp4-local",
    ),
    pytest.param(
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "dynamic": True,
            "scale_dtype": "torch.float8_e4m3fn",
            "zp_dtype": "torch.float8_e4m3fn",
        },
        {},
        id="fp4-tensor-group-dynamic",
    ),
    pytest.param(
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
        {"static": True},
        id="fp8-static",
    ),
]


@pytest.mark.peer
@pytest.mark.parametrize(("fields", "extra"), PEER_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_the_peer_fake_quantization(fields, extra, dtype):
    ct = pytest.importorskip("compressed_tensors", reason="peer library not installed")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    del ct
    x = activation(shape=(1, 5, 64), dtype=dtype, seed=3)
    x[0, 2, 5] = 40.0  # an outlier token
    peer_args = QuantizationArgs(**fields)
    args = args_of(**fields)
    global_scale = qmath.global_scale_for(x) if extra.get("global") else None
    scale = zero_point = None
    if extra.get("static"):
        scale = (x.abs().amax() / 448 / 4).reshape(1)  # a quarter of the range: outliers clamp
        peer_scale, peer_zp = scale, None
    else:
        peer_scale, peer_zp = compute_dynamic_scales_and_zp(
            value=x, args=peer_args, module=torch.nn.Module(), global_scale=global_scale
        )
    expected = fake_quantize(
        x=x, scale=peer_scale, zero_point=peer_zp, args=peer_args, global_scale=global_scale
    )
    ours = quantize_activation(
        x, args, scale=scale, zero_point=zero_point, global_scale=global_scale
    )
    assert ours.dtype == expected.dtype
    assert torch.equal(ours, expected)
