"""The vLLM adapter: its table and architecture rows, the stand-in layer vLLM matches class-name
targets on, and a clean not-supported where vllm is absent; scheme selection against the
installed engine where there is one (never imitated here).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ckpt_helpers import encode, quant_config, write_checkpoint

from conformance import arch
from conformance.backends import vllm
from conformance.backends.base import NotSupported
from conformance.cases import load_case

HAS_VLLM = importlib.util.find_spec("vllm") is not None
FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel"}
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
MX_CLASSES = {
    "CompressedTensorsW4A16Mxfp4",
    "CompressedTensorsW4A4Mxfp4",
    "CompressedTensorsW8A8Mxfp8",
}
"""2026 classes whose minimum capability engines.md does not establish ("varies")."""


def fp8_case(directory):
    tensors = encode(
        "model.layers.0.mlp.down_proj",
        torch.randn(16, 64).to(torch.bfloat16) * 0.05,
        "float-quantized",
        FP8_CHANNEL,
    )
    group = {
        "targets": ["Linear"],
        "weights": FP8_CHANNEL,
        "input_activations": FP8_TOKEN,
        "format": "float-quantized",
    }
    return load_case(write_checkpoint(directory, tensors, quant_config({"group_0": group})))


def test_stand_in_layers_carry_the_class_name() -> None:
    assert type(vllm.stand_in(("QKVParallelLinear", "LinearBase"))).__name__ == "QKVParallelLinear"
    assert type(vllm.stand_in(())).__name__ == "Linear"
    assert isinstance(vllm.stand_in(("Embedding",)), torch.nn.Module)


def test_every_scheme_class_has_architecture_rows_unless_not_established() -> None:
    labels = {row.label for row in arch.expected_rows("vllm")} - {None}
    without_rows = {label for label in labels if not arch.load_table().kernels_for("vllm", label)}
    assert without_rows == MX_CLASSES


def test_minimum_capabilities() -> None:
    table = arch.load_table()
    archs = {k.label: set(k.archs) for k in table.kernels if k.backend == "vllm"}
    assert archs["CompressedTensorsW8A8Fp8"] == {"sm89", "sm90", "sm100", "sm120"}
    assert archs["CompressedTensorsW4A8Fp8"] == {"sm90"}  # exactly 90
    assert archs["CompressedTensorsW4A4Fp4"] == {"sm100", "sm120"}
    assert archs["CompressedTensorsW4A8Int"] == set()


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_absent_engine_is_not_supported_with_the_reason(tmp_path) -> None:
    case = fp8_case(tmp_path)
    backend = vllm.VLLMBackend()
    with pytest.raises(NotSupported, match="vllm is not installed"):
        backend.engine_version()
    with pytest.raises(NotSupported, match="vllm is not installed"):
        backend.load(case.directory, device="cuda", module_classes=case.module_classes)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scheme_selection_against_the_installed_engine(tmp_path) -> None:
    case = fp8_case(tmp_path)
    loaded = vllm.VLLMBackend().load(
        case.directory, device="cuda", module_classes=case.module_classes
    )
    label = loaded.modules()["model.layers.0.mlp.down_proj"].label
    supported = (
        arch.gate(
            "vllm",
            "vllm",
            "config",
            arch.device_arch("cuda"),
            [
                arch.ModuleKey(
                    "model.layers.0.mlp.down_proj",
                    "W float8 channel sym | A float8 token sym dynamic",
                    "float-quantized",
                )
            ],
        )
        is None
    )
    assert label == ("CompressedTensorsW8A8Fp8" if supported else "CompressedTensorsW8A16Fp8")
