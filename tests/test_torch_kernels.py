"""The torch-kernels backend: kernel selection, operand layouts, and its kernels against ctref.

The layouts cuBLASLt and tinygemm demand are checked on the CPU (shapes, strides, and that the
operands dequantize back to ctref's dense weight); the kernels PyTorch also implements on the CPU
(``_scaled_mm`` per-tensor and row-wise, ``_int_mm``, tinygemm's CPU variant) run through the
conformance levels here; the CUDA-only ones (block-wise ``scaled_mm``, tinygemm on CUDA) are in
the GPU-marked tests at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import encode, quant_config, write_checkpoint

from conformance import arch, levels
from conformance.backends import torch_kernels
from conformance.backends.base import NotSupported
from conformance.backends.torch_kernels import TorchKernelsBackend
from conformance.cases import Case, load_case
from conformance.results import ConformanceFailure
from ctref import QuantArgs, qmath

FP8_BLOCK = "W float8 block128x128 sym | A float8 group128 sym dynamic"
FP8_DYNAMIC = "W float8 channel sym | A float8 token sym dynamic"
NVFP4 = "W float4 tensor_group16 sym | A float4 tensor_group16 sym local"
MXFP4 = "W float4 group32 sym e8m0 | A none"
W4A16 = "W int4 group128 sym | A none"
MODULE = "model.layers.0.mlp.down_proj"

FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel"}
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
FP8_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor"}
FP8_TENSOR_STATIC = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
FP8_BLOCK_ARGS = {
    "num_bits": 8,
    "type": "float",
    "strategy": "block",
    "block_structure": [128, 128],
}
FP8_GROUP_INPUT = {
    "num_bits": 8,
    "type": "float",
    "strategy": "group",
    "group_size": 128,
    "dynamic": True,
}
INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel"}
INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
INT4_GROUP = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * 0.05).to(torch.bfloat16)


def write_case(
    directory: Path,
    fmt: str,
    weights: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    shape: tuple[int, int] = (40, 256),
) -> Case:
    """One Linear ``MODULE`` encoded with ctref's encoders (static inputs get an input_scale)."""
    tensors = encode(MODULE, _weight(*shape, seed=shape[0] + shape[1]), fmt, weights)
    if inputs is not None and inputs.get("dynamic") is False:
        tensors[f"{MODULE}.input_scale"] = torch.tensor([0.02], dtype=torch.bfloat16)
    group: dict[str, Any] = {"targets": ["Linear"], "weights": weights, "format": fmt}
    if inputs is not None:
        group["input_activations"] = inputs
    write_checkpoint(directory, tensors, quant_config({"group_0": group}))
    return load_case(directory)


def run_levels(case: Case, device: str = "cpu") -> tuple[dict[str, str], dict[str, str]]:
    """(verdict by level for weights and layer, the kernel report)."""
    loaded = TorchKernelsBackend().load(
        case.directory, device=device, module_classes=case.module_classes
    )
    verdicts = {}
    for level, check in (("weights", levels.check_weights), ("layer", levels.check_layer)):
        try:
            check(loaded, case, lambda **_: None)
            verdicts[level] = "pass"
        except ConformanceFailure as failure:
            verdicts[level] = f"fail: {failure}"
    return verdicts, loaded.kernel_report()


# ---------------------------------------------------------------------------------------------
# Selection: the architecture table decides the kernel


@pytest.mark.parametrize(
    ("key", "fmt", "device_arch", "label"),
    [
        (FP8_BLOCK, "float-quantized", "sm90", "scaled_mm-blockwise"),
        (FP8_BLOCK, "float-quantized", "sm89", "dequant-matmul"),
        (FP8_DYNAMIC, "float-quantized", "sm90", "scaled_mm-rowwise"),
        (FP8_DYNAMIC, "float-quantized", "sm100", "dequant-matmul"),
        (
            "W float8 tensor sym | A float8 tensor sym static",
            "float-quantized",
            "sm89",
            "scaled_mm-tensorwise",
        ),
        (NVFP4, "nvfp4-pack-quantized", "sm90", "dequant-matmul"),
        (MXFP4, "mxfp4-pack-quantized", "sm90", "dequant-matmul"),
        (W4A16, "pack-quantized", "sm80", "int4pack_mm"),
        ("W int4 group128 asym | A none", "pack-quantized", "sm90", "dequant-matmul"),
        ("W int8 channel sym | A int8 token sym dynamic", "int-quantized", "sm86", "int_mm"),
    ],
)
def test_the_table_selects_the_kernel(key: str, fmt: str, device_arch: str, label: str) -> None:
    assert arch.load_table().select(torch_kernels.BACKEND, key, fmt, device_arch).label == label


def test_every_kernel_row_has_a_builder_except_the_fallback() -> None:
    rows = {k.label for k in arch.load_table().kernels if k.backend == torch_kernels.BACKEND}
    assert rows == {*torch_kernels.BUILDERS, torch_kernels.FALLBACK}


# ---------------------------------------------------------------------------------------------
# Layouts


def test_blockwise_operands_have_the_strides_cublaslt_demands() -> None:
    args = QuantArgs.from_dict(FP8_BLOCK_ARGS, key="weights")
    weight = _weight(200, 300, 1)
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, args=args)
    scale = qparams.scale.float()
    mat2, scale_b = torch_kernels.blockwise_scale_operands(codes, scale)
    assert mat2.shape == (384, 256) and mat2.stride() == (1, 384)  # column-major K' x N'
    assert scale_b.shape == (4, 2) and scale_b.stride() == (1, 4)  # K blocks rounded up to 4
    # The operands hold the same weight: dequantized through qmath's block broadcast.
    dense = qmath.dequantize(mat2.t().float(), scale_b.t()[:, :3].contiguous(), args=args)[
        :200, :300
    ]
    assert torch.equal(dense, qmath.dequantize(codes.float(), scale, args=args))


def test_blockwise_activation_operands() -> None:
    args = QuantArgs.from_dict(FP8_GROUP_INPUT, key="input_activations")
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    codes, scale = torch_kernels.blockwise_activation_operands(x, args, 300)
    assert codes.shape == (16, 384) and codes.dtype == torch.float8_e4m3fn
    assert scale.shape == (16, 3) and scale.stride() == (1, 16)  # column-major, M padded to 16
    restored = codes.float().unflatten(-1, (3, 128)) * scale.unsqueeze(-1)
    restored = restored.flatten(-2)[:5, :300]
    assert torch.allclose(restored, x.float(), rtol=2**-3, atol=0)  # e4m3 keeps 3 mantissa bits
    assert not codes.float()[5:].any()


def test_int4pack_operands_read_back_as_ctrefs_weight_on_the_cpu_kernel() -> None:
    """tinygemm's CPU variant on one-hot rows returns the weight it holds, bit for bit."""
    args = QuantArgs.from_dict({**INT4_GROUP, "group_size": 64}, key="weights")
    weight = _weight(37, 128, 3)
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, args=args)
    values, scales_and_zeros = torch_kernels.int4pack_operands(codes, qparams.scale, 64)
    assert values.shape == (64, 128) and scales_and_zeros.shape == (2, 64, 2)
    packed = torch_kernels.tinygemm_pack(values, 4)
    probe = torch.eye(128, dtype=torch.bfloat16)
    held = torch.ops.aten._weight_int4pack_mm_for_cpu(probe, packed, 64, scales_and_zeros).T[:37]
    assert torch.equal(held, qmath.dequantize(codes, qparams.scale, args=args))


def test_int_mm_operands() -> None:
    weight = torch.randint(-128, 128, (37, 200), dtype=torch.int8)
    mat2 = torch_kernels.int_mm_operands(weight)
    assert mat2.shape == (200, 40) and mat2.stride() == (1, 200)
    assert torch.equal(mat2.t()[:37], weight) and not mat2.t()[37:].any()


# ---------------------------------------------------------------------------------------------
# The kernels PyTorch runs on the CPU, through the conformance levels


@pytest.mark.parametrize(
    ("fmt", "weights", "inputs", "kernel"),
    [
        ("float-quantized", FP8_CHANNEL, FP8_TOKEN, "scaled_mm-rowwise"),
        ("float-quantized", FP8_TENSOR, FP8_TENSOR_STATIC, "scaled_mm-tensorwise"),
        ("int-quantized", INT8_CHANNEL, INT8_TOKEN, "int_mm"),
        ("pack-quantized", INT4_GROUP, None, "int4pack_mm"),
        ("float-quantized", FP8_BLOCK_ARGS, FP8_GROUP_INPUT, "dequant-matmul"),
    ],
)
def test_cpu_kernels_pass_the_weights_and_layer_levels(
    tmp_path, fmt, weights, inputs, kernel
) -> None:
    case = write_case(tmp_path, fmt, weights, inputs)
    verdicts, report = run_levels(case)
    assert verdicts == {"weights": "pass", "layer": "pass"}
    assert report[MODULE] == kernel


def test_a_layout_the_kernel_does_not_fit_falls_back_and_says_why(tmp_path) -> None:
    case = write_case(tmp_path, "pack-quantized", INT4_GROUP, shape=(40, 200))
    verdicts, report = run_levels(case)
    assert verdicts == {"weights": "pass", "layer": "pass"}
    assert report[MODULE].startswith("dequant-matmul (int4pack_mm: ") and "K=200" in report[MODULE]


def test_a_wrong_operand_layout_fails_the_weights_and_layer_levels(tmp_path, monkeypatch) -> None:
    """Scales laid out per input group instead of per output row (transposed): the suite sees it."""
    real = torch_kernels.int4pack_operands

    def transposed_scales(codes, scale, group):
        values, scales_and_zeros = real(codes, scale, group)
        flipped = scales_and_zeros[..., 0].flip(1)
        return values, torch.stack([flipped, scales_and_zeros[..., 1]], dim=-1).contiguous()

    monkeypatch.setattr(torch_kernels, "int4pack_operands", transposed_scales)
    case = write_case(tmp_path, "pack-quantized", INT4_GROUP)
    verdicts, _ = run_levels(case)
    assert verdicts["weights"].startswith("fail") and MODULE in verdicts["weights"]
    assert verdicts["layer"].startswith("fail")


def test_cuda_without_a_gpu_is_not_supported(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    case = write_case(tmp_path, "pack-quantized", INT4_GROUP)
    with pytest.raises(NotSupported, match="no CUDA device"):
        TorchKernelsBackend().load(case.directory, device="cuda", module_classes={})


# ---------------------------------------------------------------------------------------------
# On the GPU

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    ("fmt", "weights", "inputs", "hopper_kernel"),
    [
        ("float-quantized", FP8_BLOCK_ARGS, FP8_GROUP_INPUT, "scaled_mm-blockwise"),
        ("float-quantized", FP8_CHANNEL, FP8_TOKEN, "scaled_mm-rowwise"),
        ("float-quantized", FP8_TENSOR, FP8_TENSOR_STATIC, "scaled_mm-tensorwise"),
        ("int-quantized", INT8_CHANNEL, INT8_TOKEN, "int_mm"),
        ("pack-quantized", INT4_GROUP, None, "int4pack_mm"),
    ],
)
def test_gpu_kernels_pass_the_weights_and_layer_levels(
    tmp_path, fmt, weights, inputs, hopper_kernel
) -> None:
    case = write_case(
        tmp_path, fmt, weights, inputs, shape=(200, 300) if "block" in str(weights) else (40, 256)
    )
    verdicts, report = run_levels(case, device="cuda")
    assert verdicts == {"weights": "pass", "layer": "pass"}
    device_arch = arch.device_arch("cuda")
    expected = (
        arch.load_table()
        .select(
            torch_kernels.BACKEND,
            levels.scheme_key(levels.reference(case).module_info(MODULE).scheme),
            fmt,
            device_arch,
        )
        .label
    )
    assert report[MODULE].split(" (")[0] == expected
    if device_arch == "sm90":
        assert expected == hopper_kernel


@pytest.mark.gpu
@requires_gpu
def test_tinygemm_cuda_packing_matches_the_cpu_kernel() -> None:
    """Two nibbles per byte, even K high: the CUDA kernel holds the same weight as the CPU one."""
    args = QuantArgs.from_dict(INT4_GROUP, key="weights")
    weight = _weight(64, 256, 5)
    qparams = qmath.qparams_for(weight, args)
    codes = qmath.quantize(weight, qparams.scale, args=args)
    values, scales_and_zeros = torch_kernels.int4pack_operands(codes, qparams.scale, 64)
    probe = torch.eye(256, dtype=torch.bfloat16)
    on_cpu = torch.ops.aten._weight_int4pack_mm_for_cpu(
        probe, torch_kernels.tinygemm_pack(values, 8), 64, scales_and_zeros
    )
    packed = torch_kernels.tinygemm_pack(values.cuda(), 8)
    on_gpu = torch._weight_int4pack_mm(probe.cuda(), packed, 64, scales_and_zeros.cuda())
    assert torch.equal(on_gpu.cpu(), on_cpu)
