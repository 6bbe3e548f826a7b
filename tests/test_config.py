"""The config model of ctref.config: defaults, every validation rule, legacy spellings, presets,
serialization and immutability (spec §1, §5.1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ctref.config import QuantArgs, QuantizationConfig, QuantScheme
from ctref.errors import CTRefError
from ctref.presets import PRESET_SCHEMES

GROUP = "config_groups.group_0"


def _config(group: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"config_groups": {"group_0": group}, **top}


def _weights_config(weights: dict[str, Any]) -> dict[str, Any]:
    return _config({"targets": ["Linear"], "weights": weights})


def _args(**fields: Any) -> QuantArgs:
    return QuantArgs.from_dict(fields, "weights")


def _assert_error(error: pytest.ExceptionInfo[CTRefError], key: str, rule_fragment: str) -> None:
    """The message leads with the exact key path and carries the rule."""
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}: ")
    assert rule_fragment in str(error.value)


# ---------------------------------------------------------------------------------------------
# QuantizationArgs rules (§1.4), each reached through a full config to check the key path.

ARGS_RULES = [
    pytest.param({"num_bits": 4, "bogus": 1}, "bogus", "unknown key", id="unknown-key"),
    pytest.param({"num_bits": "8"}, "num_bits", "integer", id="num_bits-string"),
    pytest.param({"num_bits": True}, "num_bits", "integer", id="num_bits-bool"),
    pytest.param({"num_bits": 0}, "num_bits", "1..32", id="int-0-bits"),
    pytest.param({"num_bits": 33}, "num_bits", "1..32", id="int-33-bits"),
    pytest.param({"num_bits": 5, "type": "float"}, "num_bits", "4, 6 or 8", id="float-5-bits"),
    pytest.param({"num_bits": 16, "type": "float"}, "num_bits", "4, 6 or 8", id="float-16-bits"),
    pytest.param({"type": "fp"}, "type", "int, float", id="unknown-type"),
    pytest.param({"symmetric": "yes"}, "symmetric", "true or false", id="symmetric-string"),
    pytest.param({"group_size": -2}, "group_size", "-1 (channel)", id="group_size-below-minus-1"),
    pytest.param({"group_size": 0}, "group_size", "0 is not a group size", id="group_size-0"),
    pytest.param({"strategy": "row"}, "strategy", "tensor_group", id="unknown-strategy"),
    pytest.param(
        {"strategy": "block", "block_structure": [0, 128]},
        "block_structure",
        "positive",
        id="block-zero-rows",
    ),
    pytest.param(
        {"strategy": "block", "block_structure": [128]},
        "block_structure",
        "two positive",
        id="block-one-dim",
    ),
    pytest.param(
        {"strategy": "block", "block_structure": "128by128"},
        "block_structure",
        "'RxC'",
        id="block-bad-string",
    ),
    pytest.param({"dynamic": "yes"}, "dynamic", "'local'", id="dynamic-unknown-string"),
    pytest.param({"dynamic": None}, "dynamic", "'local'", id="dynamic-null"),
    pytest.param(
        {"actorder": "sometimes"}, "actorder", "'weight', 'static'", id="actorder-unknown"
    ),
    pytest.param({"actorder": "WEIGHT"}, "actorder", "'weight', 'static'", id="actorder-case"),
    pytest.param({"scale_dtype": "float9"}, "scale_dtype", "unknown torch dtype", id="dtype-name"),
    pytest.param({"zp_dtype": "Tensor"}, "zp_dtype", "unknown torch dtype", id="dtype-not-dtype"),
    pytest.param({"observer": 3}, "observer", "string", id="observer-not-string"),
    pytest.param({"observer_kwargs": []}, "observer_kwargs", "object", id="observer_kwargs-list"),
    pytest.param({"strategy": "token"}, "strategy", "requires dynamic", id="static-token"),
    pytest.param(
        {"strategy": "group"}, "group_size", "required for strategy 'group'", id="group-no-size"
    ),
    pytest.param(
        {"strategy": "tensor_group", "group_size": -1},
        "group_size",
        "required for strategy 'tensor_group'",
        id="tensor_group-channel-size",
    ),
    pytest.param(
        {"strategy": "channel", "group_size": 128},
        "group_size",
        "needs strategy 'group' or 'tensor_group'",
        id="positive-size-other-strategy",
    ),
    pytest.param({"strategy": "block"}, "block_structure", "required", id="block-no-structure"),
    pytest.param(
        {"strategy": "tensor", "block_structure": [128, 128]},
        "block_structure",
        "needs strategy 'block'",
        id="structure-without-block",
    ),
    pytest.param(
        {"strategy": "channel", "dynamic": True}, "dynamic", "token", id="dynamic-channel"
    ),
    pytest.param(
        {"strategy": "block", "block_structure": [128, 128], "dynamic": True},
        "dynamic",
        "token",
        id="dynamic-block",
    ),
    pytest.param({"strategy": "attn_head", "dynamic": True}, "dynamic", "token", id="dynamic-head"),
    pytest.param(
        {"strategy": "group", "group_size": 16, "dynamic": "local"},
        "dynamic",
        "'local' needs strategy 'tensor_group'",
        id="local-not-tensor_group",
    ),
]


@pytest.mark.parametrize(("weights", "field", "rule"), ARGS_RULES)
def test_invalid_args_name_key_path_and_rule(
    weights: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_dict(_weights_config(weights))
    _assert_error(error, f"{GROUP}.weights.{field}", rule)


@pytest.mark.parametrize(
    ("weights", "field"),
    [
        # field checks run before the cross-field rules, as pydantic's field validators do
        pytest.param({"group_size": -2, "strategy": "token"}, "group_size", id="size-before-token"),
        pytest.param(
            {"strategy": "token", "block_structure": [1, 2]}, "strategy", id="token-first"
        ),
        pytest.param({"strategy": "group", "dynamic": "local"}, "group_size", id="group-first"),
        pytest.param(
            {"type": "float", "num_bits": 5, "strategy": "token"}, "strategy", id="bits-last"
        ),
    ],
)
def test_rules_apply_in_library_order(weights: dict[str, Any], field: str) -> None:
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_dict(_weights_config(weights))
    assert error.value.key == f"{GROUP}.weights.{field}"


def test_defaults_fill_every_missing_key() -> None:
    args = QuantArgs.from_dict({}, "weights")
    assert (args.num_bits, args.type, args.symmetric, args.group_size) == (8, "int", True, None)
    assert (args.strategy, args.block_structure, args.dynamic, args.actorder) == (
        "tensor",
        None,
        False,
        None,
    )
    assert (args.scale_dtype, args.zp_dtype, args.observer) == (None, torch.int8, None)
    assert dict(args.observer_kwargs) == {}


@pytest.mark.parametrize(
    ("group_size", "strategy"),
    [
        pytest.param(None, "tensor", id="null"),
        pytest.param(128, "group", id="positive"),
        pytest.param(-1, "channel", id="minus-1"),
    ],
)
def test_strategy_is_inferred_from_group_size(group_size: int | None, strategy: str) -> None:
    assert _args(group_size=group_size).strategy == strategy


def test_type_strategy_and_dynamic_are_case_insensitive() -> None:
    args = _args(type="FLOAT", num_bits=4, strategy="Tensor_Group", group_size=16, dynamic="LOCAL")
    assert (args.type, args.strategy, args.dynamic) == ("float", "tensor_group", "local")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        pytest.param("torch.float8_e4m3fn", torch.float8_e4m3fn, id="torch-prefixed"),
        pytest.param("float8_e4m3fn", torch.float8_e4m3fn, id="bare"),
        pytest.param("torch.uint8", torch.uint8, id="uint8"),
        pytest.param("bfloat16", torch.bfloat16, id="bfloat16"),
    ],
)
def test_dtype_names_map_to_torch_dtypes(name: str, dtype: torch.dtype) -> None:
    assert _args(scale_dtype=name).scale_dtype == dtype


# ---------------------------------------------------------------------------------------------
# QuantizationScheme and QuantizationConfig rules (§1.2, §1.3, §1.8, §1.9)

SCHEME_RULES = [
    pytest.param({"weights": {"num_bits": 4}}, f"{GROUP}.targets", "required", id="no-targets"),
    pytest.param({"targets": []}, f"{GROUP}.targets", "at least one", id="empty-targets"),
    pytest.param({"targets": "Linear"}, f"{GROUP}.targets", "list of strings", id="string-targets"),
    pytest.param({"targets": ["Linear", 3]}, f"{GROUP}.targets[1]", "string", id="non-string"),
    pytest.param(
        {"targets": ["Linear"], "foo": 1}, f"{GROUP}.foo", "unknown key", id="unknown-key"
    ),
    pytest.param(
        {"targets": ["Linear"], "format": "mixed-precision"},
        f"{GROUP}.format",
        "top-level summary",
        id="mixed-precision-group",
    ),
    pytest.param(
        {"targets": ["Linear"], "format": "nf4"},
        f"{GROUP}.format",
        "pack-quantized",
        id="unknown-format",
    ),
    pytest.param(
        {"targets": ["Linear"], "input_activations": {"strategy": "channel"}},
        f"{GROUP}.input_activations.strategy",
        "input activations take strategy",
        id="input-channel",
    ),
    pytest.param(
        {
            "targets": ["Linear"],
            "input_activations": {"strategy": "block", "block_structure": [2, 2]},
        },
        f"{GROUP}.input_activations.strategy",
        "input activations take strategy",
        id="input-block",
    ),
    pytest.param(
        {"targets": ["Linear"], "input_activations": {"actorder": "weight"}},
        f"{GROUP}.input_activations.actorder",
        "weights only",
        id="input-actorder",
    ),
    pytest.param(
        {"targets": ["Linear"], "output_activations": {"actorder": True}},
        f"{GROUP}.output_activations.actorder",
        "weights only",
        id="output-legacy-actorder",
    ),
]


@pytest.mark.parametrize(("group", "key", "rule"), SCHEME_RULES)
def test_invalid_scheme_names_key_path_and_rule(group: dict[str, Any], key: str, rule: str) -> None:
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_dict(_config(group))
    _assert_error(error, key, rule)


W4 = {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}}
TRANSFORM_U = {"type": "hadamard", "apply": [{"targets": ["Linear"], "location": "weight_input"}]}

CONFIG_RULES = [
    pytest.param({}, "config_groups", "required", id="no-config_groups"),
    pytest.param({"config_groups": []}, "config_groups", "object", id="config_groups-list"),
    pytest.param(
        {"config_groups": {"W9A9": ["Linear"]}},
        "config_groups.W9A9",
        "unknown preset",
        id="unknown-preset",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "quant_method": "gptq"},
        "quant_method",
        "compressed-tensors",
        id="quant_method",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "quantization_status": "done"},
        "quantization_status",
        "compressed",
        id="status",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "ignore": "lm_head"},
        "ignore",
        "list of strings",
        id="ignore-string",
    ),
    pytest.param({"config_groups": {"g": W4}, "format": 3}, "format", "string", id="format-number"),
    pytest.param(
        {"config_groups": {"g": W4}, "version": 0.12}, "version", "string", id="version-number"
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "global_compression_ratio": "1.5"},
        "global_compression_ratio",
        "number",
        id="ratio-string",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "kv_cache_scheme": {"num_bits": 8, "strategy": "token"}},
        "kv_cache_scheme.strategy",
        "requires dynamic",
        id="kv-static-token",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "sparsity_config": {"format": "sparse-bitmask", "foo": 1}},
        "sparsity_config.foo",
        "unknown key",
        id="sparsity-unknown-key",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "sparsity_config": {"format": "bitmask"}},
        "sparsity_config.format",
        "sparse-24-bitmask",
        id="sparsity-format",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "sparsity_config": {"targets": ["Linear"]}},
        "sparsity_config.format",
        "required",
        id="sparsity-no-format",
    ),
    pytest.param(
        {
            "config_groups": {"g": W4},
            "transform_config": {"config_groups": {"u": {**TRANSFORM_U, "type": "dct"}}},
        },
        "transform_config.config_groups.u.type",
        "random-hadamard",
        id="transform-type",
    ),
    pytest.param(
        {
            "config_groups": {"g": W4},
            "transform_config": {
                "config_groups": {
                    "u": {**TRANSFORM_U, "apply": [{"targets": "Linear", "location": "x"}]}
                }
            },
        },
        "transform_config.config_groups.u.apply[0].location",
        "weight_input",
        id="transform-location",
    ),
    pytest.param(
        {
            "config_groups": {"g": W4},
            "transform_config": {"config_groups": {"u": {**TRANSFORM_U, "precision": "f9"}}},
        },
        "transform_config.config_groups.u.precision",
        "unknown torch dtype",
        id="transform-precision",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "transform_config": {"groups": {}}},
        "transform_config.groups",
        "unknown key",
        id="transform-unknown-key",
    ),
    pytest.param(
        {"config_groups": {"g": W4}, "moe_sparsity_config": {"method": "drop", "num_experts": []}},
        "moe_sparsity_config.method",
        "prune",
        id="moe-method",
    ),
    pytest.param(
        {
            "config_groups": {"g": W4},
            "moe_sparsity_config": {"method": "prune", "num_experts": [None, "8"]},
        },
        "moe_sparsity_config.num_experts[1]",
        "integer",
        id="moe-count",
    ),
]


@pytest.mark.parametrize(("qc", "key", "rule"), CONFIG_RULES)
def test_invalid_config_names_key_path_and_rule(qc: dict[str, Any], key: str, rule: str) -> None:
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_dict(qc)
    _assert_error(error, key, rule)


def test_config_defaults_and_ignored_top_level_keys() -> None:
    qc = QuantizationConfig.from_dict({"config_groups": {"g": W4}, "run_compressed": True, "x": 1})
    assert qc.format == "fakequant"
    assert qc.quantization_status == "initialized"
    assert qc.quant_method == "compressed-tensors"
    assert (qc.ignore, qc.kv_cache_scheme, qc.version, qc.global_compression_ratio) == (
        (),
        None,
        None,
        None,
    )
    assert (qc.sparsity_config, qc.transform_config, qc.moe_sparsity_config) == (None, None, None)


def test_legacy_sparseml_quant_method_is_accepted() -> None:
    assert (
        QuantizationConfig.from_dict({"config_groups": {}, "quant_method": "sparseml"}).quant_method
        == "sparseml"
    )


@pytest.mark.parametrize(
    "section",
    [pytest.param({}, id="empty-object"), pytest.param(None, id="null")],
)
def test_empty_sparsity_and_transform_sections_mean_none(section: dict[str, Any] | None) -> None:
    qc = QuantizationConfig.from_dict(
        {"config_groups": {"g": W4}, "sparsity_config": section, "transform_config": section}
    )
    assert qc.sparsity_config is None
    assert qc.transform_config is None


def test_sparsity_config_reads_registry_artefact_and_defaults() -> None:
    qc = QuantizationConfig.from_dict(
        {
            "config_groups": {"g": W4},
            "sparsity_config": {
                "format": "sparse-24-bitmask",
                "sparsity_structure": None,
                "registry_requires_subclass": False,
            },
        }
    )
    sparsity = qc.sparsity_config
    assert sparsity is not None
    assert sparsity.format == "sparse-24-bitmask"
    assert sparsity.targets is None  # null targets mean every module
    assert (sparsity.ignore, sparsity.global_sparsity, sparsity.sparsity_structure) == (
        (),
        0.0,
        "unstructured",
    )


def test_transform_config_defaults_and_single_string_targets() -> None:
    qc = QuantizationConfig.from_dict(
        {
            "config_groups": {"g": W4},
            "transform_config": {
                "config_groups": {
                    "v": {
                        "type": "random-hadamard",
                        "head_dim": 64,
                        "apply": [
                            {"targets": "re:.*down_proj$", "location": "input"},
                            {
                                "targets": ["Linear"],
                                "location": "weight_input",
                                "inverse": True,
                                "ignore": "lm_head",
                            },
                        ],
                    }
                }
            },
        }
    )
    assert qc.transform_config is not None
    scheme = qc.transform_config.config_groups["v"]
    assert (scheme.type, scheme.head_dim, scheme.randomize, scheme.requires_grad) == (
        "random-hadamard",
        64,
        False,
        False,
    )
    assert scheme.precision == torch.float32
    first, second = scheme.apply
    assert (first.targets, first.location, first.inverse, first.ignore) == (
        ("re:.*down_proj$",),
        "input",
        False,
        (),
    )
    assert (second.targets, second.inverse, second.ignore) == (("Linear",), True, ("lm_head",))


# ---------------------------------------------------------------------------------------------
# Legacy spellings (ctref must read old checkpoints)


def test_string_block_structure_is_converted() -> None:
    args = _args(num_bits=8, type="float", strategy="block", block_structure="128x64")
    assert args.block_structure == (128, 64)
    assert args.to_dict()["block_structure"] == [128, 64]


@pytest.mark.parametrize(
    ("written", "actorder", "legacy"),
    [
        pytest.param(True, "group", True, id="true"),
        pytest.param("group", "group", True, id="group"),
        pytest.param("dynamic", "group", True, id="dynamic-alias"),
        pytest.param("Group", "group", True, id="group-any-case"),
        pytest.param(False, None, False, id="false"),
        pytest.param(None, None, False, id="null"),
        pytest.param("weight", "weight", False, id="weight"),
        pytest.param("static", "static", False, id="static-kept-as-written"),
    ],
)
def test_actorder_spellings(written: Any, actorder: str | None, legacy: bool) -> None:
    args = _args(num_bits=4, group_size=128, actorder=written)
    assert args.actorder == actorder
    assert args.legacy_group_actorder is legacy


V0_12_2_DUMP = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 128,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
            "format": "pack-quantized",
        },
        "group_1": {
            "input_activations": {
                "actorder": None,
                "block_structure": None,
                "dynamic": True,
                "group_size": None,
                "num_bits": 8,
                "observer": None,
                "observer_kwargs": {},
                "strategy": "token",
                "symmetric": True,
                "type": "float",
            },
            "output_activations": None,
            "targets": ["re:.*mlp.down_proj$"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": None,
                "num_bits": 8,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "channel",
                "symmetric": True,
                "type": "float",
            },
            "format": "float-quantized",
        },
    },
    "format": "mixed-precision",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {
        "format": "dense",
        "global_sparsity": 0.0,
        "ignore": [],
        "registry_requires_subclass": False,
        "sparsity_structure": "unstructured",
        "targets": [],
    },
    "transform_config": {},
    "version": "0.12.2",
}


def test_v0_12_2_dump_with_every_field_written_parses() -> None:
    qc = QuantizationConfig.from_dict(V0_12_2_DUMP)
    int4 = qc.config_groups["group_0"]
    fp8 = qc.config_groups["group_1"]
    assert (
        int4.weights is not None and fp8.weights is not None and fp8.input_activations is not None
    )
    assert (int4.weights.num_bits, int4.weights.strategy, int4.weights.observer) == (
        4,
        "group",
        "minmax",
    )
    assert (fp8.weights.strategy, fp8.weights.zp_dtype) == ("channel", torch.float8_e4m3fn)
    assert fp8.input_activations.dynamic is True
    assert (int4.format, fp8.format, qc.format) == (
        "pack-quantized",
        "float-quantized",
        "mixed-precision",
    )
    assert qc.sparsity_config is not None and qc.sparsity_config.format == "dense"
    assert qc.transform_config is None
    assert qc.packing_layout == "legacy"


# ---------------------------------------------------------------------------------------------
# zp_dtype inference (§1.4)


@pytest.mark.parametrize(
    ("qtype", "num_bits", "symmetric", "zp_dtype"),
    [
        pytest.param("int", 1, True, torch.int8, id="int1"),
        pytest.param("int", 4, False, torch.int8, id="int4-asym"),
        pytest.param("int", 8, True, torch.int8, id="int8"),
        pytest.param("int", 9, True, torch.int16, id="int9"),
        pytest.param("int", 16, True, torch.int16, id="int16"),
        pytest.param("int", 17, True, torch.int32, id="int17"),
        pytest.param("int", 32, True, torch.int32, id="int32"),
        pytest.param("float", 4, True, torch.float8_e4m3fn, id="fp4"),
        pytest.param("float", 6, True, torch.float8_e4m3fn, id="fp6"),
        pytest.param("float", 8, True, torch.float8_e4m3fn, id="fp8"),
    ],
)
def test_zp_dtype_is_inferred_even_for_symmetric_args(
    qtype: str, num_bits: int, symmetric: bool, zp_dtype: torch.dtype
) -> None:
    args = _args(type=qtype, num_bits=num_bits, symmetric=symmetric)
    assert args.zp_dtype == zp_dtype
    assert args.zp_dtype_explicit is False


def test_written_zp_dtype_wins_over_inference() -> None:
    args = _args(num_bits=4, type="float", group_size=32, zp_dtype="torch.uint8")
    assert args.zp_dtype == torch.uint8
    assert args.zp_dtype_explicit is True


# ---------------------------------------------------------------------------------------------
# Presets (§5.1)

# name -> (weights, inputs) as (type, bits, strategy, group_size or block, symmetric, scale dtype),
# inputs add dynamic; transcribed from the table of §5.1, independent of ctref/presets.py.
_FP8, _U8 = torch.float8_e4m3fn, torch.uint8
PRESET_TABLE: dict[str, tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]] = {
    "UNQUANTIZED": (None, None),
    "W4A16": (("int", 4, "group", 128, True, None), None),
    "W8A16": (("int", 8, "group", 128, True, None), None),  # int8 channel before 0.16
    "W3A8": (("int", 3, "group", 128, True, None), ("int", 8, "token", None, True, None, True)),
    "W2A4": (("int", 2, "group", 128, True, None), ("int", 4, "token", None, True, None, True)),
    "W4A16_ASYM": (("int", 4, "group", 128, False, None), None),
    "W8A8": (("int", 8, "channel", None, True, None), ("int", 8, "token", None, True, None, True)),
    "INT8": (("int", 8, "channel", None, True, None), ("int", 8, "token", None, True, None, True)),
    "W4AFP8": (("int", 4, "group", 128, True, None), ("float", 8, "token", None, True, None, True)),
    "FP8": (
        ("float", 8, "tensor", None, True, None),
        ("float", 8, "tensor", None, True, None, False),
    ),
    "FP8_DYNAMIC": (
        ("float", 8, "channel", None, True, None),
        ("float", 8, "token", None, True, None, True),
    ),
    "FP8_BLOCK": (
        ("float", 8, "block", (128, 128), True, None),
        ("float", 8, "group", 128, True, None, True),
    ),
    "NVFP4A16": (("float", 4, "tensor_group", 16, True, _FP8), None),
    "NVFP4": (
        ("float", 4, "tensor_group", 16, True, _FP8),
        ("float", 4, "tensor_group", 16, True, _FP8, "local"),
    ),
    "MXFP4A16": (("float", 4, "group", 32, True, _U8), None),
    "MXFP4": (("float", 4, "group", 32, True, _U8), ("float", 4, "group", 32, True, _U8, True)),
    "MXFP4XFP8": (
        ("float", 4, "group", 32, True, _U8),
        ("float", 8, "group", 128, True, None, True),
    ),
    "MXFP6A16": (("float", 6, "group", 32, True, _U8), None),
    "MXFP6A8": (("float", 6, "group", 32, True, _U8), ("float", 8, "group", 32, True, _U8, True)),
    "MXFP8A16": (("float", 8, "group", 32, True, _U8), None),
    "MXFP8": (("float", 8, "group", 32, True, _U8), ("float", 8, "group", 32, True, _U8, True)),
}

WXAY_FAMILY = [
    "W2A4", "W2A8", "W2A16", "W3A4", "W3A8", "W3A16", "W4A4", "W4A8", "W4A16",
    "W5A8", "W5A16", "W6A8", "W6A16", "W7A8", "W7A16", "W8A16",
]  # fmt: skip


def _summary(args: QuantArgs | None, *, with_dynamic: bool) -> tuple[Any, ...] | None:
    if args is None:
        return None
    grouping = args.block_structure if args.strategy == "block" else args.group_size
    summary = (args.type, args.num_bits, args.strategy, grouping, args.symmetric, args.scale_dtype)
    return (*summary, args.dynamic) if with_dynamic else summary


def test_preset_names_are_the_0_20_0_set() -> None:
    named = set(PRESET_TABLE) - set(WXAY_FAMILY)
    assert set(PRESET_SCHEMES) == named | set(WXAY_FAMILY)


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_preset_matches_the_spec_table(name: str) -> None:
    scheme = QuantizationConfig.from_dict({"config_groups": {name: ["Linear"]}}).config_groups[name]
    weights, inputs = PRESET_TABLE[name]
    assert _summary(scheme.weights, with_dynamic=False) == weights
    assert _summary(scheme.input_activations, with_dynamic=True) == inputs
    assert scheme.output_activations is None
    assert scheme.weights is None or scheme.weights.dynamic is False


@pytest.mark.parametrize("name", WXAY_FAMILY)
def test_wxay_template(name: str) -> None:
    weight_bits, act_bits = (int(part) for part in name[1:].split("A"))
    scheme = QuantizationConfig.from_dict({"config_groups": {name: ["Linear"]}}).config_groups[name]
    assert _summary(scheme.weights, with_dynamic=False) == (
        "int",
        weight_bits,
        "group",
        128,
        True,
        None,
    )
    expected_inputs = None if act_bits == 16 else ("int", act_bits, "token", None, True, None, True)
    assert _summary(scheme.input_activations, with_dynamic=True) == expected_inputs


@pytest.mark.parametrize("name", sorted(PRESET_SCHEMES))
def test_preset_equals_its_expanded_form(name: str) -> None:
    targets = ["Linear", "re:.*lm_head"]
    preset = QuantizationConfig.from_dict({"config_groups": {name.lower(): targets}})
    expanded = QuantizationConfig.from_dict(
        {"config_groups": {"g": {"targets": targets, **PRESET_SCHEMES[name]}}}
    )
    assert preset.config_groups[name.lower()] == expanded.config_groups["g"]
    assert preset.config_groups[name.lower()].targets == tuple(targets)


def test_presets_share_no_state_with_parsed_configs() -> None:
    before = json.dumps(PRESET_SCHEMES, sort_keys=True)
    qc = QuantizationConfig.from_dict(
        {"config_groups": {"MXFP4": ["Linear"], "MXFP4A16": ["Embedding"]}}
    )
    assert qc.config_groups["MXFP4"].weights == qc.config_groups["MXFP4A16"].weights
    assert json.dumps(PRESET_SCHEMES, sort_keys=True) == before


# ---------------------------------------------------------------------------------------------
# Serialization (§1.4 "Serialization")


def test_args_to_dict_omits_what_0_20_0_omits() -> None:
    assert _args(num_bits=4, group_size=128).to_dict() == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "group_size": 128,
        "strategy": "group",
        "dynamic": False,
    }


@pytest.mark.parametrize(
    ("fields", "expected_extra"),
    [
        pytest.param({"observer": "minmax"}, {"observer": "minmax"}, id="observer-written"),
        pytest.param({"observer": None}, {}, id="observer-null-omitted"),
        pytest.param({"observer_kwargs": {"p": 2}}, {"observer_kwargs": {"p": 2}}, id="kwargs"),
        pytest.param({"actorder": "static"}, {"actorder": "static"}, id="actorder-static"),
        pytest.param({"actorder": True}, {"actorder": "group"}, id="legacy-actorder"),
        pytest.param(
            {"scale_dtype": "float16"}, {"scale_dtype": "torch.float16"}, id="scale_dtype"
        ),
        pytest.param({"zp_dtype": "int8"}, {}, id="symmetric-zp_dtype-omitted"),
        pytest.param({"symmetric": False}, {"symmetric": False}, id="asym-inferred-zp-omitted"),
        pytest.param(
            {"symmetric": False, "zp_dtype": "int8"},
            {"symmetric": False, "zp_dtype": "torch.int8"},
            id="asym-written-zp",
        ),
    ],
)
def test_args_to_dict_optional_fields(
    fields: dict[str, Any], expected_extra: dict[str, Any]
) -> None:
    base = {"num_bits": 4, "group_size": 128}
    expected = {**_args(**base).to_dict(), **expected_extra}
    assert _args(**base, **fields).to_dict() == expected


ROUND_TRIP_CONFIGS = {
    "presets": {
        "config_groups": {name: ["Linear"] for name in ("W4A16", "NVFP4", "FP8_BLOCK", "W8A8")}
    },
    "v0.12.2-dump": V0_12_2_DUMP,
    "everything": {
        "config_groups": {
            "attn": {
                "targets": ["re:.*self_attn$"],
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "attn_head"},
                "format": "dense",
            },
            "W4A16_ASYM": ["Linear"],
        },
        "ignore": ["lm_head", "re:.*gate$"],
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": "0.20.0",
        "global_compression_ratio": 3.5,
        "sparsity_config": {
            "format": "sparse-bitmask",
            "targets": ["Linear"],
            "sparsity_structure": "2:4",
        },
        "transform_config": {"config_groups": {"u": TRANSFORM_U}},
        "moe_sparsity_config": {"method": "novice", "num_experts": [None, 129, 253]},
    },
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_config_to_dict_round_trips(name: str) -> None:
    qc = QuantizationConfig.from_dict(ROUND_TRIP_CONFIGS[name])
    dumped = qc.to_dict()
    assert QuantizationConfig.from_dict(json.loads(json.dumps(dumped))) == qc
    assert dumped["quant_method"] == "compressed-tensors"


def test_symmetric_zp_dtype_is_dropped_as_0_20_0_drops_it() -> None:
    """MX presets set zp_dtype uint8, which 0.20.0 does not write for symmetric args; read
    back, it is inferred (fp8). Harmless: symmetric checkpoints store no zero point."""
    weights = (
        QuantizationConfig.from_dict({"config_groups": {"MXFP8": ["Linear"]}})
        .config_groups["MXFP8"]
        .weights
    )
    assert weights is not None and weights.zp_dtype == torch.uint8
    reread = QuantArgs.from_dict(json.loads(json.dumps(weights.to_dict())), "weights")
    assert reread.zp_dtype == torch.float8_e4m3fn
    assert dataclasses.replace(reread, zp_dtype=torch.uint8) == weights


def test_config_to_dict_keeps_the_written_envelope() -> None:
    dumped = QuantizationConfig.from_dict(ROUND_TRIP_CONFIGS["everything"]).to_dict()
    assert dumped["version"] == "0.20.0"
    assert list(dumped["config_groups"]) == ["attn", "W4A16_ASYM"]
    assert dumped["moe_sparsity_config"] == {"method": "novice", "num_experts": [None, 129, 253]}
    assert dumped["transform_config"]["config_groups"]["u"]["precision"] == "torch.float32"
    assert dumped["sparsity_config"]["sparsity_structure"] == "2:4"


def test_absent_sections_serialize_as_empty_objects() -> None:
    dumped = QuantizationConfig.from_dict({"config_groups": {"g": W4}}).to_dict()
    assert (dumped["sparsity_config"], dumped["transform_config"]) == ({}, {})
    assert "version" not in dumped


# ---------------------------------------------------------------------------------------------
# Immutability


def test_fields_cannot_be_assigned() -> None:
    qc = QuantizationConfig.from_dict(ROUND_TRIP_CONFIGS["everything"])
    scheme = qc.config_groups["W4A16_ASYM"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.weights.num_bits = 8  # type: ignore[misc, union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        qc.ignore = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        qc.config_groups["new"] = scheme  # type: ignore[index]
    with pytest.raises(TypeError):
        qc.moe_sparsity_config["method"] = "prune"  # type: ignore[index]
    assert isinstance(qc.moe_sparsity_config["num_experts"], tuple)
    assert isinstance(scheme.targets, tuple)


def test_parsed_config_does_not_alias_the_source_dict() -> None:
    kwargs = {"p": 2.0}
    args = _args(observer_kwargs=kwargs)
    with pytest.raises(TypeError):
        args.observer_kwargs["p"] = 3.0  # type: ignore[index]
    kwargs["p"] = 3.0
    assert args.observer_kwargs["p"] == 2.0


def test_args_are_hashable_and_compare_by_value() -> None:
    first = _args(num_bits=4, group_size=128, observer_kwargs={"p": 2})
    second = _args(num_bits=4, group_size=128, observer_kwargs={"p": 2})
    assert first == second
    assert len({first, second}) == 1
    assert first != _args(num_bits=4, group_size=64, observer_kwargs={"p": 2})


# ---------------------------------------------------------------------------------------------
# Version and packing layout (§0 fact 3, §8 trap 4)


@pytest.mark.parametrize(
    ("version", "version_tuple", "layout", "known"),
    [
        pytest.param("0.17.1", (0, 17, 1), "legacy", True, id="0.17.1"),
        pytest.param("0.12.2", (0, 12, 2), "legacy", True, id="0.12.2"),
        pytest.param("0.14.0.1", (0, 14, 0), "legacy", True, id="0.14.0.1"),
        pytest.param("0.18.0", (0, 18, 0), "dense", True, id="0.18.0"),
        pytest.param("0.18.1.dev0+gabc", (0, 18, 1), "dense", True, id="0.18.1.dev0+gabc"),
        pytest.param("1.2", (1, 2, 0), "dense", True, id="two-components"),
        pytest.param(None, None, "dense", False, id="absent"),
        pytest.param("unknown", None, "dense", False, id="unparseable"),
    ],
)
def test_version_tuple_and_packing_layout(
    version: str | None, version_tuple: tuple[int, int, int] | None, layout: str, known: bool
) -> None:
    qc = QuantizationConfig.from_dict({"config_groups": {"g": W4}, "version": version})
    assert qc.version_tuple == version_tuple
    assert qc.packing_layout == layout
    assert qc.packing_layout_known is known


# ---------------------------------------------------------------------------------------------
# Finding the section in config.json (§1.1)

QC = {"config_groups": {"W8A8": ["Linear"]}, "version": "0.20.0"}


@pytest.mark.parametrize(
    "config_json",
    [
        pytest.param({"quantization_config": QC}, id="quantization_config"),
        pytest.param({"text_config": {"quantization_config": QC}}, id="text_config"),
        pytest.param({"compression_config": QC}, id="compression_config"),
    ],
)
def test_config_is_found_where_the_library_looks(config_json: dict[str, Any]) -> None:
    qc = QuantizationConfig.from_model_config({"model_type": "llama", **config_json})
    assert list(qc.config_groups) == ["W8A8"]


def test_top_level_quantization_config_wins_over_text_config() -> None:
    other = {"config_groups": {"FP8": ["Linear"]}}
    qc = QuantizationConfig.from_model_config(
        {
            "quantization_config": QC,
            "text_config": {"quantization_config": other},
            "compression_config": other,
        }
    )
    assert list(qc.config_groups) == ["W8A8"]


def test_missing_section_names_the_file() -> None:
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_model_config({"model_type": "llama"}, source="ckpt/config.json")
    assert str(error.value).startswith("ckpt/config.json: ")
    assert "quantization_config" in error.value.rule


def test_invalid_section_error_names_file_and_key() -> None:
    config_json = {"quantization_config": _weights_config({"strategy": "group"})}
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.from_model_config(config_json, source="ckpt/config.json")
    assert str(error.value).startswith(f"ckpt/config.json: {GROUP}.weights.group_size: ")


def test_load_from_directory_and_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": QC}))
    from_dir = QuantizationConfig.load(tmp_path)
    from_file = QuantizationConfig.load(tmp_path / "config.json")
    assert from_dir == from_file
    assert from_dir.version == "0.20.0"


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        pytest.param(None, "file not found", id="missing"),
        pytest.param("{not json", "not valid JSON", id="bad-json"),
    ],
)
def test_load_errors_name_the_file(tmp_path: Path, content: str | None, rule: str) -> None:
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(CTRefError) as error:
        QuantizationConfig.load(tmp_path)
    assert error.value.file == str(tmp_path / "config.json")
    assert rule in str(error.value)


def test_scheme_from_dict_is_usable_alone() -> None:
    scheme = QuantScheme.from_dict(
        {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32}}, "s"
    )
    assert scheme.weights is not None and scheme.weights.strategy == "group"
    assert scheme.format is None


@pytest.mark.parametrize(
    "version, known",
    [("0.17.1", True), ("0.17.2.dev5+gabc", False), ("0.18.0.dev1+gdef", True), ("0.18.0", True)],
)
def test_packing_layout_unknown_for_dev_builds_around_the_switch(version: str, known: bool) -> None:
    config = QuantizationConfig.from_dict(
        {"quant_method": "compressed-tensors", "version": version, "config_groups": {}}
    )
    assert config.packing_layout_known is known
