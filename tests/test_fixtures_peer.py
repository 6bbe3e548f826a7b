"""Interop proof for every fixture: the peer library and ctref's reader decode each checkpoint to
exactly the dense weights in ``expected/``, and the reference outputs agree with the peer's own
activation quantization.

Legacy layouts (pre-0.18 sub-byte words, group act-order, unpacked int8 zero points, sparsity,
marlin-24) are beyond 0.20.0, which cannot parse or decode them; they are marked ``peer_legacy``
and checked against 0.14.0.1 in ``nox -s peer-legacy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from catalog_helpers import CATALOG, skip_unregistered
from safetensors.torch import load_file

from ctref import open_checkpoint
from ctref.fixtures.catalog import Case

RAGGED_GROUP = "0.20.0's decompress refuses K % group_size != 0 (ct-format.md §2.3); ctref reads it"


def legacy_reason(case: Case) -> str | None:
    """Why 0.20.0 cannot be the peer for this case, or None."""
    if case.sparsity is not None or "marlin-24" in case.formats:
        return "sparsity / marlin-24 compressors exist up to 0.14.0.1 only"
    for scheme in case.config.config_groups.values():
        args = scheme.weights
        if args is None:
            continue
        if args.legacy_group_actorder:
            return "0.19+ refuses to parse actorder 'group'"
        if case.packing_layout == "legacy" and args.num_bits in (3, 5, 6, 7):
            return "0.20.0 reads the dense (0.18+) word layout only"
        if case.version < (0, 9, 4) and not args.symmetric:
            return "0.20.0 expects packed int32 zero points (written since 0.9.4)"
    return None


def ragged(case: Case) -> bool:
    return any(
        scheme.weights is not None
        and scheme.weights.strategy == "group"
        and layer.shape[-1] % scheme.weights.group_size != 0
        for layer in case.layers
        if (resolved := case.scheme_of(layer)) and (scheme := resolved[1])
    )


def peer_params() -> list:
    params = []
    for case in CATALOG.cases:
        reason = legacy_reason(case)
        if reason:
            params.append(
                pytest.param(case.name, reason, marks=pytest.mark.peer_legacy, id=case.name)
            )
        elif ragged(case):
            mark = pytest.mark.xfail(raises=ValueError, strict=True, reason=RAGGED_GROUP)
            params.append(pytest.param(case.name, None, marks=mark, id=case.name))
        else:
            params.append(pytest.param(case.name, None, id=case.name))
    return params


def load_case(root: Path) -> tuple[dict, dict, dict]:
    document = json.loads((root / "expected" / "case.json").read_text())
    stored: dict[str, torch.Tensor] = {}
    for name in document["checkpoint"]["files"]:
        stored.update(load_file(root / name))
    return document, stored, load_file(root / document["expected"]["dense"])


def module_tensors(stored: dict, module: str, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        name.rpartition(".")[2]: tensor
        for name, tensor in stored.items()
        if name.rpartition(".")[0] == module and name.rpartition(".")[2].startswith(prefix)
    }


@pytest.mark.peer
@pytest.mark.parametrize(("name", "legacy"), peer_params())
def test_peer_decodes_every_layer_fixture_bit_for_bit(cache, name, legacy):
    pytest.importorskip("compressed_tensors", reason="peer library not installed")
    skip_unregistered(name)
    if legacy:
        pytest.skip(f"beyond 0.20.0 ({legacy}); the peer-legacy session checks it against 0.14.0.1")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    document, stored, dense = load_case(cache / name / "layer")
    config = QuantizationConfig.model_validate(document["quantization_config"])
    decoded = 0
    for module, record in document["modules"].items():
        expected = dense[record["dense"]["tensor"]]
        if record["format"] == "dense":
            assert torch.equal(stored[f"{module}.weight"], expected), module
            continue
        scheme = config.config_groups[record["group"]]
        compressor = BaseCompressor.get_value_from_registry(record["format"])
        weight = compressor.decompress(module_tensors(stored, module, "weight"), scheme)["weight"]
        assert weight.dtype == expected.dtype, module
        assert torch.equal(weight, expected), module
        decoded += 1
    assert decoded or all(r["format"] == "dense" for r in document["modules"].values())


@pytest.mark.parametrize(
    "size_and_name",
    [
        pytest.param((size, case.name), id=f"{case.name}-{size}")
        for case in CATALOG.cases
        for size in case.sizes
    ],
)
def test_ctref_reader_decodes_every_fixture(cache, size_and_name):
    size, name = size_and_name
    skip_unregistered(name)
    root = cache / name / size
    document, _, dense = load_case(root)
    classes = {module: tuple(record["classes"]) for module, record in document["modules"].items()}
    with open_checkpoint(root, module_classes=classes) as checkpoint:
        found = {info.name for info in checkpoint.modules()}
        assert set(document["modules"]) <= found
        for extra in found - set(document["modules"]):  # embeddings, norms, transform matrices
            if f"{extra}.weight" in dense:
                assert torch.equal(checkpoint.dequantize(extra), dense[f"{extra}.weight"]), extra
            else:
                assert record_is_transform(document, extra), extra
        for module, record in document["modules"].items():
            weight = checkpoint.dequantize(module)
            expected = dense[record["dense"]["tensor"]]
            assert weight.dtype == expected.dtype, module
            assert torch.equal(weight, expected), module
            assert checkpoint.module_info(module).format == record["format"], module


def record_is_transform(document: dict, module: str) -> bool:
    """Whether ``module`` is an online transform matrix a case.json record points to."""
    return any(
        (transform["tensor"] or "").rpartition(".")[0] == module
        for record in document["modules"].values()
        for transform in record["transforms"]
    )


def output_params() -> list:
    params = []
    for case in CATALOG.cases:
        if legacy_reason(case) or case.transform_config:
            continue
        inputs = [
            s.input_activations for s in case.config.config_groups.values() if s.input_activations
        ]
        if not inputs:
            continue
        params.append(pytest.param(case.name, id=case.name))
    return params


@pytest.mark.peer
@pytest.mark.parametrize("name", output_params())
def test_reference_outputs_match_the_peer_activation_quantization(cache, name):
    """outputs = peer_fakequant(x) @ Wᵀ (+ b), up to float64 summation order."""
    pytest.importorskip("compressed_tensors", reason="peer library not installed")
    skip_unregistered(name)
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    root = cache / name / "layer"
    document, stored, dense = load_case(root)
    inputs = load_file(root / "expected" / "inputs.safetensors")
    outputs = load_file(root / "expected" / "outputs.safetensors")
    for module, record in document["modules"].items():
        if record["input_activations"] is None:
            continue
        args = QuantizationArgs.model_validate(record["input_activations"])
        params = module_tensors(stored, module, "input_")
        x = inputs[module].unsqueeze(0)  # (batch, tokens, K): the peer's per-token layout
        global_scale = params.get("input_global_scale")
        if args.dynamic in (True, "local"):
            scale, zero_point = compute_dynamic_scales_and_zp(
                value=x, args=args, module=torch.nn.Module(), global_scale=global_scale
            )
        else:
            scale, zero_point = params["input_scale"], params.get("input_zero_point")
            if args.strategy == "group":
                # 0.20.0 initializes a static group input scale as (K/g,) but its forward only
                # broadcasts (1, K/g): the same values, one row for all tokens.
                scale = scale.reshape(1, -1)
                zero_point = None if zero_point is None else zero_point.reshape(1, -1)
        quantized = fake_quantize(x, scale, zero_point, args, global_scale=global_scale)[0].double()
        weight = dense[record["dense"]["tensor"]].double()
        expected = quantized @ weight.T
        if record["bias"]:
            expected = expected + dense[record["bias"]].double()
        # Only the order of the float64 sum differs: bound it by K ulps of the absolute sum.
        bound = (
            (quantized.abs() @ weight.abs().T) * weight.shape[-1] * torch.finfo(torch.float64).eps
        )
        assert bool(((outputs[module] - expected).abs() <= bound + 1e-300).all()), module
