"""Cross-check of ctref's config model and matching against compressed-tensors 0.20.x.

ctref accepts exactly the args and schemes the library accepts, resolves them alike, serializes
them alike, infers the same formats and selects the same scheme per module. The deliberate
differences are listed below, and tests keep those lists truthful.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip(
    "compressed_tensors", reason="peer extra (compressed-tensors 0.20.x) not installed"
)

from compressed_tensors import quantization as peer
from compressed_tensors.compressors.format import infer_module_format

from ctref.config import QuantArgs, QuantizationConfig, QuantScheme
from ctref.errors import CTRefError
from ctref.matching import infer_format, resolve_scheme
from ctref.presets import PRESET_SCHEMES

pytestmark = pytest.mark.peer

# The library raises NotImplementedError or TypeError from some validators, not ValidationError.
PEER_REJECTIONS = (ValueError, TypeError, NotImplementedError)


def _accepts(
    parse: Callable[[dict[str, Any]], object],
    d: dict[str, Any],
    rejections: type[Exception] | tuple[type[Exception], ...],
) -> bool:
    """Whether ``parse(d)`` returns rather than rejecting ``d`` with one of ``rejections``."""
    try:
        parse(d)
    except rejections:
        return False
    return True


def _peer_accepts_args(d: dict[str, Any]) -> bool:
    return _accepts(peer.QuantizationArgs.model_validate, d, PEER_REJECTIONS)


def _ctref_accepts_args(d: dict[str, Any]) -> bool:
    return _accepts(lambda args: QuantArgs.from_dict(args, "args"), d, CTRefError)


def _peer_accepts_scheme(d: dict[str, Any]) -> bool:
    return _accepts(peer.QuantizationScheme.model_validate, d, PEER_REJECTIONS)


def _ctref_accepts_scheme(d: dict[str, Any]) -> bool:
    return _accepts(lambda scheme: QuantScheme.from_dict(scheme, "scheme"), d, CTRefError)


def _assert_args_alike(ours: QuantArgs | None, theirs: peer.QuantizationArgs | None) -> None:
    assert (ours is None) == (theirs is None)
    if ours is not None and theirs is not None:
        assert ours.strategy == theirs.strategy
        assert ours.zp_dtype == theirs.zp_dtype
        assert ours.to_dict() == theirs.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# QuantizationArgs

FP = {"type": "float"}
VALID_ARGS = {
    "defaults": {},
    "int4-group": {"num_bits": 4, "group_size": 128},
    "int4-asym-zp_dtype": {
        "num_bits": 4,
        "symmetric": False,
        "group_size": 128,
        "strategy": "group",
        "zp_dtype": "torch.int8",
    },
    "int8-channel": {"num_bits": 8, "group_size": -1},
    "int16": {"num_bits": 16},
    "int32": {"num_bits": 32},
    "fp8-token-any-case": {"num_bits": 8, "type": "FLOAT", "strategy": "TOKEN", "dynamic": True},
    "fp8-block": {**FP, "strategy": "block", "block_structure": [128, 128]},
    "fp8-block-string": {**FP, "strategy": "block", "block_structure": "128x64"},
    "nvfp4-local": {
        **FP,
        "num_bits": 4,
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": "LOCAL",
        "scale_dtype": "float8_e4m3fn",
    },
    "mxfp4": {
        **FP,
        "num_bits": 4,
        "group_size": 32,
        "scale_dtype": "torch.uint8",
        "zp_dtype": "torch.uint8",
    },
    "fp6-group": {**FP, "num_bits": 6, "group_size": 32},
    "fp4-g16-group": {**FP, "num_bits": 4, "group_size": 16},
    "fp8-attn_head": {**FP, "strategy": "attn_head"},
    "dynamic-tensor": {"strategy": "tensor", "dynamic": True},
    "dynamic-group": {"strategy": "group", "group_size": 64, "dynamic": True},
    "actorder-weight": {"num_bits": 4, "group_size": 128, "actorder": "weight"},
    "actorder-static": {"num_bits": 4, "group_size": 128, "actorder": "static"},
    "actorder-false": {"num_bits": 4, "group_size": 128, "actorder": False},
    "v0.12.2-dump": {
        "num_bits": 4,
        "group_size": 128,
        "strategy": "group",
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "observer": "minmax",
        "observer_kwargs": {},
        "symmetric": True,
        "type": "int",
    },
    "observer-kwargs": {"observer": "mse", "observer_kwargs": {"maxshrink": 0.2}},
    "scale-bfloat16": {"scale_dtype": "bfloat16"},
    "scale-float-alias": {"scale_dtype": "float"},
}

INVALID_ARGS = {
    "unknown-key": {"bogus": 1},
    "num_bits-null": {"num_bits": None},
    "symmetric-null": {"symmetric": None},
    "unknown-type": {"type": "fp"},
    "float-5-bits": {**FP, "num_bits": 5},
    "float-16-bits": {**FP, "num_bits": 16},
    "group_size-minus-2": {"group_size": -2},
    "group_size-0": {"group_size": 0},
    "unknown-strategy": {"strategy": "row"},
    "static-token": {"strategy": "token"},
    "group-without-size": {"strategy": "group"},
    "group-channel-size": {"strategy": "group", "group_size": -1},
    "tensor_group-without-size": {"strategy": "tensor_group"},
    "channel-with-size": {"strategy": "channel", "group_size": 128},
    "block-without-structure": {"strategy": "block"},
    "structure-without-block": {"block_structure": [128, 128]},
    "block-zero": {"strategy": "block", "block_structure": [0, 128]},
    "block-three-dims": {"strategy": "block", "block_structure": [128, 128, 1]},
    "block-capital-x": {"strategy": "block", "block_structure": "128X128"},
    "dynamic-channel": {"strategy": "channel", "dynamic": True},
    "dynamic-attn_head": {"strategy": "attn_head", "dynamic": True},
    "local-group": {"strategy": "group", "group_size": 16, "dynamic": "local"},
    "dynamic-string": {"dynamic": "yes"},
    "dynamic-null": {"dynamic": None},
    "actorder-capital": {"actorder": "WEIGHT"},
    "actorder-unknown": {"actorder": "foo"},
    "scale-dtype-unknown": {"scale_dtype": "float9"},
    "zp-dtype-not-a-dtype": {"zp_dtype": "Tensor"},
    "observer-number": {"observer": 3},
    "observer-kwargs-list": {"observer_kwargs": []},
    "observer-kwargs-null": {"observer_kwargs": None},
}

# Legacy act-order that 0.19+ refuses but old checkpoints carry: ctref reads it (weight_g_idx).
LEGACY_ACCEPTED_BY_CTREF_ONLY = {
    "actorder-true": {"num_bits": 4, "group_size": 128, "actorder": True},
    "actorder-group": {"num_bits": 4, "group_size": 128, "actorder": "group"},
    "actorder-dynamic": {"num_bits": 4, "group_size": 128, "actorder": "dynamic"},
    "actorder-Group": {"num_bits": 4, "group_size": 128, "actorder": "Group"},
}

# Where ctref is stricter on purpose: bit widths no format can store, and pydantic's lax
# coercions of JSON types that no writer produces.
REJECTED_BY_CTREF_ONLY = {
    "int-0-bits": {"num_bits": 0},
    "int-64-bits": {"num_bits": 64},
    "float-5-bits-explicit-zp": {**FP, "num_bits": 5, "zp_dtype": "int8"},
    "num_bits-string": {"num_bits": "8"},
    "num_bits-float": {"num_bits": 8.0},
    "symmetric-string": {"symmetric": "true"},
    "group_size-float": {"group_size": 128.0},
    "dynamic-int": {"dynamic": 1},
}


@pytest.mark.parametrize("args", VALID_ARGS.values(), ids=VALID_ARGS.keys())
def test_valid_args_resolve_and_serialize_alike(args: dict[str, Any]) -> None:
    assert _peer_accepts_args(args) and _ctref_accepts_args(args)
    _assert_args_alike(
        QuantArgs.from_dict(args, "args"), peer.QuantizationArgs.model_validate(args)
    )


@pytest.mark.parametrize("args", INVALID_ARGS.values(), ids=INVALID_ARGS.keys())
def test_invalid_args_are_rejected_by_both(args: dict[str, Any]) -> None:
    assert not _peer_accepts_args(args)
    assert not _ctref_accepts_args(args)


@pytest.mark.parametrize(
    "args", LEGACY_ACCEPTED_BY_CTREF_ONLY.values(), ids=LEGACY_ACCEPTED_BY_CTREF_ONLY.keys()
)
def test_legacy_actorder_is_read_by_ctref_only(args: dict[str, Any]) -> None:
    assert not _peer_accepts_args(args)
    assert QuantArgs.from_dict(args, "args").legacy_group_actorder


@pytest.mark.parametrize("args", REJECTED_BY_CTREF_ONLY.values(), ids=REJECTED_BY_CTREF_ONLY.keys())
def test_ctref_is_stricter_on_purpose(args: dict[str, Any]) -> None:
    assert _peer_accepts_args(args)
    assert not _ctref_accepts_args(args)


def test_symmetric_zp_dtype_is_lost_in_the_peer_dump_too() -> None:
    """0.20.0 does not write a symmetric zp_dtype, so MX uint8 reads back as the inferred fp8."""
    peer_dump = peer.preset_name_to_scheme("MXFP8", ["Linear"]).weights.model_dump(mode="json")
    ours = QuantArgs.from_dict(PRESET_SCHEMES["MXFP8"]["weights"], "weights")
    reread = QuantArgs.from_dict(ours.to_dict(), "weights")
    assert ours.to_dict() == peer_dump
    assert (
        reread.zp_dtype
        == peer.QuantizationArgs.model_validate(peer_dump).zp_dtype
        == torch.float8_e4m3fn
    )


# ---------------------------------------------------------------------------------------------
# QuantizationScheme

W4 = {"num_bits": 4, "group_size": 128}
VALID_SCHEMES = {
    "targets-only": {"targets": ["Linear"]},
    "pack-format": {"targets": ["Linear"], "weights": W4, "format": "pack-quantized"},
    "legacy-format-value": {"targets": ["Linear"], "weights": W4, "format": "marlin-24"},
    "attn-head-inputs": {
        "targets": ["re:.*self_attn$"],
        "input_activations": {**FP, "strategy": "attn_head"},
    },
    "group-inputs": {
        "targets": ["Linear"],
        "weights": W4,
        "input_activations": {"strategy": "group", "group_size": 128, "dynamic": True},
    },
    "outputs": {"targets": ["Linear"], "weights": W4, "output_activations": {**FP}},
    "fp4-g64": {"targets": ["Linear"], "weights": {**FP, "num_bits": 4, "group_size": 64}},
    "fp8-g32-no-e8m0": {"targets": ["Linear"], "weights": {**FP, "group_size": 32}},
    "int16-weights": {"targets": ["Linear"], "weights": {"num_bits": 16, "group_size": -1}},
    "int4-with-fp8-tensor-inputs": {"targets": ["Linear"], "weights": W4, "input_activations": FP},
}

INVALID_SCHEMES = {
    "no-targets": {"weights": W4},
    "string-targets": {"targets": "Linear"},
    "unknown-key": {"targets": ["Linear"], "foo": 1},
    "mixed-precision": {"targets": ["Linear"], "format": "mixed-precision"},
    "unknown-format": {"targets": ["Linear"], "format": "nf4"},
    "channel-inputs": {"targets": ["Linear"], "input_activations": {"strategy": "channel"}},
    "block-inputs": {
        "targets": ["Linear"],
        "input_activations": {"strategy": "block", "block_structure": [2, 2]},
    },
    "input-actorder": {"targets": ["Linear"], "input_activations": {"actorder": "weight"}},
    "output-actorder": {"targets": ["Linear"], "output_activations": {"actorder": "static"}},
}


@pytest.mark.parametrize("scheme", VALID_SCHEMES.values(), ids=VALID_SCHEMES.keys())
def test_valid_schemes_agree_with_peer(scheme: dict[str, Any]) -> None:
    assert _peer_accepts_scheme(scheme) and _ctref_accepts_scheme(scheme)
    ours = QuantScheme.from_dict(scheme, "scheme")
    theirs = peer.QuantizationScheme.model_validate(scheme)
    assert ours.to_dict() == theirs.model_dump(mode="json")
    assert infer_format(ours) == infer_module_format(nn.Linear, theirs).value


@pytest.mark.parametrize("scheme", INVALID_SCHEMES.values(), ids=INVALID_SCHEMES.keys())
def test_invalid_schemes_are_rejected_by_both(scheme: dict[str, Any]) -> None:
    assert not _peer_accepts_scheme(scheme)
    assert not _ctref_accepts_scheme(scheme)


def test_empty_targets_are_rejected_by_ctref_only() -> None:
    """A group that can match nothing is a broken config; ctref says so."""
    assert _peer_accepts_scheme({"targets": []})
    assert not _ctref_accepts_scheme({"targets": []})


# ---------------------------------------------------------------------------------------------
# Presets

TARGETS = ["Linear", "re:.*lm_head"]


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_preset_agrees_with_peer(name: str) -> None:
    ours = QuantizationConfig.from_dict({"config_groups": {name: TARGETS}}).config_groups[name]
    theirs = peer.preset_name_to_scheme(name, TARGETS)
    assert ours.to_dict() == theirs.model_dump(mode="json")
    _assert_args_alike(ours.weights, theirs.weights)
    _assert_args_alike(ours.input_activations, theirs.input_activations)
    assert infer_format(ours, (0, 20, 0)) == infer_module_format(nn.Linear, theirs).value


def test_peer_has_no_preset_ctref_lacks() -> None:
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as PEER_PRESETS

    assert set(PRESET_SCHEMES) == set(PEER_PRESETS)


# ---------------------------------------------------------------------------------------------
# QuantizationConfig

FULL_CONFIG = {
    "config_groups": {
        "w4a16": ["Linear"],
        "NVFP4": ["re:.*mlp.*"],
        "custom": {"targets": ["lm_head"], "weights": W4, "format": "pack-quantized"},
    },
    "ignore": ["re:.*gate$", "model.embed_tokens"],
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    "format": "mixed-precision",
    "quantization_status": "compressed",
    "global_compression_ratio": 1.5,
    "moe_sparsity_config": {"method": "prune", "num_experts": [None, 8, 6]},
    "version": "0.20.0",
    "sparsity_config": {},
    "transform_config": {},
}


def test_config_dump_agrees_with_peer() -> None:
    theirs = peer.QuantizationConfig.model_validate(FULL_CONFIG).model_dump(mode="json")
    ours = QuantizationConfig.from_dict(FULL_CONFIG).to_dict()
    assert {key: ours[key] for key in theirs} == theirs


# ---------------------------------------------------------------------------------------------
# Which scheme each module gets: ctref's resolve_scheme against the library's apply


class QKVLinear(nn.Linear):
    pass


class MoEGate(nn.Linear):
    pass


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = QKVLinear(16, 16)
        self.k_proj = nn.Linear(16, 16)
        self.o_proj = nn.Linear(16, 16)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = MoEGate(16, 4)
        self.up_proj = nn.Linear(16, 16)
        self.down_proj = nn.Linear(16, 16)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()
        self.mlp = Mlp()


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"layers": nn.ModuleList([Layer(), Layer()])})
        self.lm_head = nn.Linear(16, 32)


MATCHING_CONFIG = {
    "config_groups": {
        "all_linear": {"targets": ["Linear"], "weights": W4},
        "attn": {"targets": [r"re:.*self_attn\.(q|k)_proj"], "weights": {"num_bits": 8}},
        "named": {
            "targets": ["re:.*down_proj$", "model.layers.1.self_attn.k_proj"],
            "weights": {"num_bits": 2, "group_size": 16},
        },
        "qkv_and_linear": {
            "targets": ["QKVLinear", "Linear"],
            "weights": {"num_bits": 3, "group_size": 16},
        },
    },
    "ignore": [
        "lm_head",
        "MoEGate",
        "re:.*layers.0.mlp.up_proj$",
        "layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ],
}


def test_resolve_scheme_selects_what_the_library_applies() -> None:
    model = TinyModel()
    peer.apply_quantization_config(
        model, peer.QuantizationConfig.model_validate(MATCHING_CONFIG), show_progress=False
    )
    config = QuantizationConfig.from_dict(MATCHING_CONFIG)
    selected = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        class_names = [cls.__name__ for cls in type(module).__mro__ if issubclass(cls, nn.Module)]
        ours = resolve_scheme(config, name, class_names)
        theirs = getattr(module, "quantization_scheme", None)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            assert ours[1].to_dict() == theirs.model_dump(mode="json"), name
            selected.add(ours[0])
    # the model exercises every group (the later "Linear" takes all_linear's modules)
    assert selected == {"attn", "named", "qkv_and_linear"}
