"""Architecture gating, the architecture and expected tables, and xdist GPU pinning (issue 6).

Everything here runs on the CPU: gating decisions take the architecture as a string, pinning
takes the worker id and the environment as arguments.
"""

from __future__ import annotations

import pytest
import torch

from conformance import arch
from conformance.backends.trtllm import MODULE_ALGOS
from conformance.levels import scheme_key
from conformance.results import Verdict
from ctref import matching
from ctref.fixtures.catalog import load_catalog

FP8_DYNAMIC = "W float8 channel sym | A float8 token sym dynamic"
FP8_BLOCK = "W float8 block128x128 sym | A float8 group128 sym dynamic"
NVFP4 = "W float4 tensor_group16 sym | A float4 tensor_group16 sym local"
W4A16 = "W int4 group128 sym | A none"
W4A8_FP8 = "W int4 group128 sym | A float8 token sym dynamic"
INT8_DYNAMIC_TENSOR = "W int8 channel sym | A int8 tensor sym dynamic"


def module(key: str, fmt: str = "float-quantized", sparsity: str | None = None) -> arch.ModuleKey:
    return arch.ModuleKey("model.layers.0.mlp.down_proj", key, fmt, sparsity)


# ---------------------------------------------------------------------------------------------
# The tables


def test_table_rows_cite_sources_and_known_architectures() -> None:
    table = arch.load_table()
    assert set(table.architectures) == {"sm80", "sm86", "sm89", "sm90", "sm100", "sm120"}
    for kernel in table.kernels:
        assert "engines.md" in kernel.source or "torch" in kernel.source, kernel
        assert set(kernel.archs) <= {*table.architectures, "cpu"}


def test_table_rejects_an_unknown_architecture(tmp_path) -> None:
    bad = tmp_path / "arch.toml"
    bad.write_text(
        'architectures = ["sm90"]\n[[kernel]]\nbackend = "x"\nlabel = "L"\nkernel = "k"\n'
        'archs = ["sm91"]\nsource = "s"\n',
        encoding="utf-8",
    )
    with pytest.raises(arch.ArchTableError, match="sm91"):
        arch.load_table(bad)


@pytest.mark.parametrize("table", ["trtllm", "vllm"])
def test_every_label_with_kernels_is_a_label_of_the_expected_table(table: str) -> None:
    labels = {row.label for row in arch.expected_rows(table)}
    # QuantAlgos TensorRT-LLM's Linear has although its parser maps no scheme to them (§4).
    module_only = {m.algo for m in MODULE_ALGOS} if table == "trtllm" else set()
    for kernel in arch.load_table().kernels:
        if kernel.backend == table:
            assert kernel.label in labels | module_only, kernel


def _catalog_modules():
    """(case, module, scheme key, format, sparsity) of every quantized catalog layer."""
    for case in load_catalog().cases:
        for size in case.sizes:
            for layer in case.layers_of(size):
                resolved = case.scheme_of(layer)
                if resolved is None:
                    continue
                scheme = resolved[1]
                sparsity = case.sparsity["format"] if case.is_sparse(layer) else None
                yield (
                    case.name,
                    layer.name,
                    scheme_key(scheme),
                    matching.resolve_format(case.config, scheme),
                    sparsity,
                )


CATALOG_MODULES = list(_catalog_modules())


@pytest.mark.parametrize("table", ["trtllm", "vllm"])
def test_every_catalog_module_has_an_explicit_row(table: str) -> None:
    """No catalog scheme falls through to the implicit refusal: each is decided by a row with
    a source."""
    assert len(CATALOG_MODULES) > 100
    unmatched = {
        (key, fmt, sparsity)
        for _, _, key, fmt, sparsity in CATALOG_MODULES
        if arch.matching_row(table, key, fmt=fmt, sparsity=sparsity) is None
    }
    assert not unmatched, sorted(unmatched, key=str)


@pytest.mark.parametrize(
    ("table", "key", "fmt", "sparsity", "label"),
    [
        ("trtllm", FP8_DYNAMIC, "float-quantized", None, "FP8_PER_CHANNEL_PER_TOKEN"),
        ("trtllm", FP8_BLOCK, "float-quantized", None, "FP8_BLOCK_SCALES"),
        ("trtllm", NVFP4, "nvfp4-pack-quantized", None, "NVFP4"),
        ("trtllm", "W int8 channel sym | A int8 token sym dynamic", "int-quantized", None, None),
        (
            "trtllm",
            "W float8 tensor sym | A float8 tensor sym static",
            "float-quantized",
            None,
            None,
        ),
        ("trtllm", W4A16, "pack-quantized", None, None),
        (
            "trtllm",
            "W float4 group32 sym e8m0 | A none",
            "mxfp4-pack-quantized",
            None,
            "W4A16_MXFP4",
        ),
        (
            "trtllm",
            "W float4 group32 sym e8m0 | A float4 group32 sym e8m0 dynamic",
            "mxfp4-pack-quantized",
            None,
            None,
        ),
        ("trtllm", FP8_DYNAMIC, "float-quantized", "sparse-24-bitmask", None),
        ("vllm", W4A16, "pack-quantized", None, "CompressedTensorsWNA16"),
        ("vllm", W4A16, "marlin-24", None, "CompressedTensorsW4A16Sparse24"),
        ("vllm", W4A16, "dense", None, None),
        ("vllm", "W int8 group64 sym | A none", "naive-quantized", None, None),
        ("vllm", INT8_DYNAMIC_TENSOR, "int-quantized", None, None),
        (
            "vllm",
            "W int8 channel sym | A int8 tensor asym static",
            "int-quantized",
            None,
            "CompressedTensorsW8A8Int8",
        ),
        (
            "vllm",
            "W int8 channel sym | A int8 token sym dynamic",
            "int-quantized",
            "sparse-24-bitmask",
            "CompressedTensors24",
        ),
        (
            "vllm",
            "W int8 channel sym | A int8 token sym dynamic",
            "int-quantized",
            "sparse-bitmask",
            None,
        ),
        ("vllm", W4A8_FP8, "pack-quantized", None, "CompressedTensorsW4A8Fp8"),
        ("vllm", W4A8_FP8, "int-quantized", None, None),
        ("vllm", "W float8 group32 sym e8m0 | A none", "mxfp8-quantized", None, None),
        ("vllm", "unquantized", "dense", None, None),
    ],
)
def test_expected_labels(
    table: str, key: str, fmt: str, sparsity: str | None, label: str | None
) -> None:
    assert arch.expected_label(table, key, fmt=fmt, sparsity=sparsity) == label


# ---------------------------------------------------------------------------------------------
# Gating


def test_nvfp4_on_hopper_is_not_supported_for_kernel_levels_only() -> None:
    modules = [module(NVFP4, "nvfp4-pack-quantized")]
    gate = arch.gate("trtllm", "trtllm", "layer", "sm90", modules)
    assert gate is not None and gate.label == "NVFP4"
    assert "sm100" in gate.reason and "nvfp4_gemm" in gate.reason and "engines.md" in gate.reason
    assert arch.gate("trtllm", "trtllm", "layer", "sm100", modules) is None
    assert arch.gate("trtllm", "trtllm", "config", "sm90", modules) is None


def test_gating_follows_each_kernel_row() -> None:
    assert arch.gate("trtllm", "trtllm", "layer", "sm90", [module(FP8_BLOCK)]) is None
    assert arch.gate("trtllm", "trtllm", "layer", "sm89", [module(FP8_DYNAMIC)]) is not None
    assert arch.gate("vllm", "vllm", "layer", "sm90", [module(W4A8_FP8, "pack-quantized")]) is None
    assert (
        arch.gate("vllm", "vllm", "layer", "sm100", [module(W4A8_FP8, "pack-quantized")])
        is not None
    )
    # vLLM picks its scheme class by capability: even the config level depends on the GPU.
    assert arch.gate("vllm", "vllm", "config", "sm80", [module(FP8_DYNAMIC)]) is not None
    # The CPU has none of these kernels.
    assert arch.gate("trtllm", "trtllm", "layer", "cpu", [module(FP8_BLOCK)]) is not None


def test_one_unsupported_module_gates_the_case_and_refused_ones_do_not() -> None:
    refused = module("W int8 channel sym | A int8 token sym dynamic", "int-quantized")
    assert arch.gate("trtllm", "trtllm", "layer", "sm90", [refused]) is None
    gate = arch.gate(
        "trtllm", "trtllm", "layer", "sm90", [refused, module(FP8_BLOCK), module(NVFP4)]
    )
    assert gate is not None and gate.label == "NVFP4"


def test_backends_without_a_table_are_never_gated() -> None:
    for backend in ("torch-kernels", "transformers", "reference"):
        assert arch.gate(backend, None, "layer", "sm80", [module(NVFP4)]) is None


@pytest.mark.parametrize("raw", [Verdict.FAIL, Verdict.ERROR])
def test_gated_failures_become_not_supported_arch(raw: Verdict) -> None:
    gate = arch.gate("trtllm", "trtllm", "layer", "sm90", [module(NVFP4)])
    verdict, message = arch.apply_gate(gate, raw, "nvfp4_gemm: no kernel image")
    assert verdict is Verdict.NOT_SUPPORTED
    assert message.startswith("(arch) ") and "nvfp4_gemm: no kernel image" in message


def test_a_gated_refusal_keeps_the_engines_reason() -> None:
    gate = arch.gate("trtllm", "trtllm", "layer", "sm90", [module(NVFP4)])
    refusal = (Verdict.NOT_SUPPORTED, "tensorrt_llm is not installed")
    assert arch.apply_gate(gate, *refusal) == refusal


def test_a_gated_pass_stays_a_pass_and_asks_for_the_table_fix() -> None:
    gate = arch.gate("trtllm", "trtllm", "layer", "sm90", [module(NVFP4)])
    verdict, message = arch.apply_gate(gate, Verdict.PASS, "")
    assert verdict is Verdict.PASS
    assert arch.is_unexpected_pass(verdict, message) and "fix the table" in message
    assert arch.apply_gate(None, Verdict.FAIL, "wrong") == (Verdict.FAIL, "wrong")


# ---------------------------------------------------------------------------------------------
# Devices and xdist pinning


def test_device_arch_of_the_cpu() -> None:
    assert arch.device_arch("cpu") == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_arch_of_the_gpu() -> None:
    major, minor = torch.cuda.get_device_capability()
    assert arch.device_arch("cuda") == f"sm{major}{minor}"


@pytest.mark.parametrize(
    ("worker", "visible", "count", "chosen"),
    [
        ("gw0", None, 4, "0"),
        ("gw5", None, 4, "1"),
        ("gw3", "4,6", 8, "6"),
        ("gw2", "4, 6", 8, "4"),
    ],
)
def test_each_worker_is_pinned_to_one_visible_gpu(worker, visible, count, chosen) -> None:
    environ = {arch.WORKER_ENV: worker}
    if visible is not None:
        environ[arch.VISIBLE_ENV] = visible
    assert arch.pin_xdist_worker(environ, count=count) == chosen
    assert environ[arch.VISIBLE_ENV] == chosen


@pytest.mark.parametrize("environ", [{}, {arch.WORKER_ENV: "master"}, {arch.WORKER_ENV: "gw1"}])
def test_no_pinning_outside_workers_or_without_gpus(environ) -> None:
    before = dict(environ)
    assert arch.pin_xdist_worker(environ, count=0) is None
    assert environ == before


def test_worker_ids() -> None:
    assert arch.worker_index("gw12") == 12
    assert arch.worker_index(None) is None
    assert arch.worker_index("gw") is None
