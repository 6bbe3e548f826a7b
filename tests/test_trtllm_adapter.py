"""The TensorRT-LLM adapter: what runs without tensorrt_llm (conversion of compressed-tensors
tensors to TensorRT-LLM's names and layouts, the module-level mapping, the tables), and a clean
not-supported where it is absent. Nothing here stands in for TensorRT-LLM's answers: the
engine-driven tests at the end run only where tensorrt_llm is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ckpt_helpers import encode, quant_config, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance import arch
from conformance.backends import trtllm
from conformance.backends.base import NotSupported
from conformance.cases import load_case
from ctref import QuantArgs, get_format, packing

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel"}
FP8_BLOCK = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}
INT4_GROUP = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
INT8_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel"}
NVFP4 = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": 16,
    "scale_dtype": "torch.float8_e4m3fn",
    "zp_dtype": "torch.float8_e4m3fn",
}


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * 0.05).to(torch.bfloat16)


def stored(
    fmt: str, fields: dict, rows: int = 16, cols: int = 128
) -> tuple[dict, QuantArgs, torch.Tensor]:
    """A module's stored tensors, its args, and ctref's dense weight of them."""
    args = QuantArgs.from_dict(fields, key="weights")
    codec = get_format(fmt)
    tensors = codec.encode(_weight(rows, cols), args)
    return tensors, args, codec.decode(tensors, args, layout="dense")


# ---------------------------------------------------------------------------------------------
# Conversion to TensorRT-LLM's names and layouts


def test_int4_pairs_pack_along_n_low_nibble_first() -> None:
    codes = torch.tensor([[1, -8], [-2, 7]], dtype=torch.int8)  # rows 0 and 1
    packed = trtllm.pack_int4_along_n(codes)
    assert packed.shape == (1, 2)
    assert packed.view(torch.uint8).tolist() == [[0xE1, 0x78]]  # row 1 high, row 0 low


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 8).map(lambda r: 2 * r), cols=st.integers(1, 9), seed=st.integers(0, 2**16)
)
def test_int4_packing_along_n_round_trips(rows: int, cols: int, seed: int) -> None:
    codes = torch.randint(
        -8, 8, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8
    )
    assert torch.equal(trtllm.unpack_int4_along_n(trtllm.pack_int4_along_n(codes)), codes)


def test_odd_n_cannot_be_packed_in_pairs() -> None:
    with pytest.raises(NotSupported, match="N=3 is odd"):
        trtllm.pack_int4_along_n(torch.zeros(3, 4, dtype=torch.int8))


def test_w4a16_awq_holds_the_same_weight() -> None:
    tensors, args, dense = stored("pack-quantized", INT4_GROUP)
    converted = trtllm.w4a16_awq(tensors, args, "dense")
    assert set(converted) == {"weight", "weight_scale", "pre_quant_scale"}
    assert converted["weight"].shape == (8, 128) and converted["weight"].dtype == torch.int8
    codes = trtllm.unpack_int4_along_n(converted["weight"])
    assert torch.equal(codes, packing.unpack(tensors["weight_packed"], 4, 128))
    # TensorRT-LLM's dequantization, (q) * scale per group, gives ctref's weight bit for bit.
    scale = converted["weight_scale"].repeat_interleave(32, dim=1)
    assert torch.equal((codes.to(scale.dtype) * scale), dense)
    assert torch.equal(converted["pre_quant_scale"], torch.ones(128, dtype=torch.bfloat16))


def test_weight_only_int8_from_pack_quantized() -> None:
    tensors, args, dense = stored("pack-quantized", INT8_CHANNEL)
    converted = trtllm.weight_only(tensors, args, "dense")
    assert converted["weight"].dtype == torch.int8 and converted["weight"].shape == (16, 128)
    assert converted["weight_scale"].shape == (16,)
    assert torch.equal(
        converted["weight"].to(torch.bfloat16) * converted["weight_scale"][:, None], dense
    )


def test_fp8_rowwise_flattens_the_channel_scale() -> None:
    tensors, args, dense = stored("float-quantized", FP8_CHANNEL)
    converted = trtllm.fp8_rowwise(tensors, args, "dense")
    assert tensors["weight_scale"].shape == (16, 1) and converted["weight_scale"].shape == (16,)
    assert converted["weight"] is tensors["weight"]
    restored = converted["weight"].float() * converted["weight_scale"][:, None]
    assert torch.equal(restored.to(dense.dtype), dense)


def test_fp8_block_keeps_names_with_float32_scales() -> None:
    tensors, args, _ = stored("float-quantized", FP8_BLOCK, rows=200, cols=300)
    converted = trtllm.fp8_block(tensors, args, "dense")
    assert (
        converted["weight_scale"].shape == (2, 3)
        and converted["weight_scale"].dtype == torch.float32
    )


def test_nvfp4_names_and_reciprocal_global_scales() -> None:
    tensors, args, _ = stored("nvfp4-pack-quantized", NVFP4)
    tensors["input_global_scale"] = torch.tensor([4.0])
    converted = trtllm.nvfp4(tensors, args, "dense")
    assert set(converted) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}
    assert torch.equal(converted["weight"], tensors["weight_packed"])  # same bytes
    assert converted["weight_scale"] is tensors["weight_scale"]
    assert float(converted["weight_scale_2"]) == pytest.approx(
        1 / float(tensors["weight_global_scale"])
    )
    assert float(converted["input_scale"]) == 0.25
    assert float(trtllm.invert_global_scale(torch.tensor([0.0]))) == 0.0


# ---------------------------------------------------------------------------------------------
# Mappings and tables


@pytest.mark.parametrize(
    ("key", "fmt", "algo"),
    [
        ("W float8 tensor sym | A float8 tensor sym static", "float-quantized", "FP8"),
        ("W int4 group128 sym | A none", "pack-quantized", "W4A16_AWQ"),
        ("W int4 channel sym | A none", "pack-quantized", "W4A16"),
        ("W int8 channel sym | A none", "pack-quantized", "W8A16"),
        ("W int4 group128 asym | A none", "pack-quantized", None),
        ("W int4 group128 sym g_idx | A none", "pack-quantized", None),
        ("W int4 group128 sym | A none", "marlin-24", None),
        ("W int8 channel sym | A int8 token sym dynamic", "int-quantized", None),
    ],
)
def test_module_level_mapping(key: str, fmt: str, algo: str | None) -> None:
    assert trtllm.module_algo(key, fmt) == algo


def test_every_algo_with_a_linear_has_a_converter_and_architecture_rows() -> None:
    parser_labels = {row.label for row in arch.expected_rows("trtllm")} - {None, "W4A16_MXFP4"}
    module_labels = {m.algo for m in trtllm.MODULE_ALGOS}
    for algo in parser_labels | module_labels:
        assert algo in trtllm.CONVERTERS, algo
        assert arch.load_table().kernels_for("trtllm", algo), algo


def test_the_int8_w8a8_misroute_is_expected_to_be_refused() -> None:
    """main maps INT8 W8A8 to FP8_PER_CHANNEL_PER_TOKEN; the table must call that wrong."""
    key = "W int8 channel sym | A int8 token sym dynamic"
    assert arch.expected_label("trtllm", key, fmt="int-quantized") is None
    assert (
        arch.expected_label("trtllm", key.replace("int8", "float8"), fmt="float-quantized")
        == "FP8_PER_CHANNEL_PER_TOKEN"
    )


# ---------------------------------------------------------------------------------------------
# Without tensorrt_llm


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed")
def test_absent_engine_is_not_supported_with_the_reason(tmp_path) -> None:
    tensors = encode(
        "model.layers.0.mlp.down_proj", _weight(16, 128), "float-quantized", FP8_CHANNEL
    )
    group = {"targets": ["Linear"], "weights": FP8_CHANNEL, "format": "float-quantized"}
    case = load_case(write_checkpoint(tmp_path, tensors, quant_config({"group_0": group})))
    backend = trtllm.TensorRTLLMBackend()
    with pytest.raises(NotSupported, match="tensorrt_llm is not installed"):
        backend.engine_version()
    with pytest.raises(NotSupported, match="NVIDIA's own index"):
        backend.load(case.directory, device="cuda", module_classes=case.module_classes)


# ---------------------------------------------------------------------------------------------
# With tensorrt_llm (its real answers)


@pytest.mark.skipif(not HAS_TRTLLM, reason="tensorrt_llm is not installed")
@pytest.mark.parametrize(
    ("weights", "inputs", "fmt", "expected"),
    [
        (
            FP8_CHANNEL,
            {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            "float-quantized",
            "FP8_PER_CHANNEL_PER_TOKEN",
        ),
        (INT4_GROUP, None, "pack-quantized", None),
    ],
)
def test_parser_probe_against_the_installed_engine(weights, inputs, fmt, expected) -> None:
    group = {"targets": ["Linear"], "weights": weights, "format": fmt}
    if inputs is not None:
        group["input_activations"] = inputs
    answer = trtllm.probe_parser(quant_config({"group_0": group}), ["model.layers.0.mlp.down_proj"])
    if expected is None:
        assert answer.quant_algo is None and (answer.refusal or answer.crash)
    else:
        assert answer.quant_algo == expected
