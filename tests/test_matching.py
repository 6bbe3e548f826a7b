"""Target/ignore matching, scheme priority and format resolution of ctref.matching (§1.5, §1.6)."""

from __future__ import annotations

from typing import Any

import pytest

from ctref.config import QuantizationConfig, QuantScheme
from ctref.matching import infer_format, is_ignored, matches, resolve_format, resolve_scheme
from ctref.presets import PRESET_SCHEMES

LINEAR = ("Linear", "Module")
W4A16 = {"num_bits": 4, "group_size": 128}
W8 = {"num_bits": 8, "strategy": "channel"}


def _config(groups: dict[str, Any], **top: Any) -> QuantizationConfig:
    return QuantizationConfig.from_dict({"config_groups": groups, **top})


def _group(*targets: str, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"targets": list(targets), "weights": weights or W4A16}


def _scheme(group: dict[str, Any] | str) -> QuantScheme:
    """A scheme from a group dict or a preset name."""
    body = {"targets": ["Linear"], **PRESET_SCHEMES[group]} if isinstance(group, str) else group
    return QuantScheme.from_dict(body, "group")


# ---------------------------------------------------------------------------------------------
# matches (§1.6)


@pytest.mark.parametrize(
    ("target", "name", "class_names", "expected"),
    [
        pytest.param("re:.*q_proj", "model.layers.0.self_attn.q_proj", (), True, id="regex"),
        pytest.param("re:.*q_proj", "x.q_proj_extra", (), True, id="regex-not-anchored-at-end"),
        pytest.param("re:q_proj", "model.q_proj", (), False, id="regex-anchored-at-start"),
        pytest.param("re:.*mlp.gate$", "model.mlp.gate_proj", (), False, id="regex-explicit-end"),
        pytest.param("re:.*mlp.gate$", "model.mlp.gate", (), True, id="regex-explicit-end-hit"),
        pytest.param("lm_head", "lm_head", (), True, id="exact-name"),
        pytest.param("lm_head", "model.lm_head", (), False, id="name-is-not-a-suffix"),
        pytest.param("q_proj", "model.layers.0.self_attn.q_proj", (), False, id="no-suffix-match"),
        pytest.param("Linear", "model.x", LINEAR, True, id="class-name"),
        pytest.param("Module", "model.x", LINEAR, True, id="ancestor-class-name"),
        pytest.param("Linear", "model.x", ("Embedding", "Module"), False, id="other-class"),
        pytest.param(
            "Linear", "model.x", ("QKVParallelLinear", "LinearBase"), True, id="vllm-base"
        ),
        pytest.param("re:Linear", "model.x", LINEAR, False, id="regex-never-matches-class"),
        pytest.param("Linear", "Linear", (), True, id="class-string-as-name"),
    ],
)
def test_matches(target: str, name: str, class_names: tuple[str, ...], expected: bool) -> None:
    assert matches(target, name, class_names) is expected


# ---------------------------------------------------------------------------------------------
# ignore (§1.6): class name, exact name, regex, and the `model.` prefix


@pytest.mark.parametrize(
    ("ignore", "name", "class_names", "ignored"),
    [
        pytest.param("MoEGate", "model.layers.0.mlp.gate", ("MoEGate", "Linear"), True, id="class"),
        pytest.param("MoEGate", "model.layers.0.mlp.up_proj", LINEAR, False, id="class-miss"),
        pytest.param("lm_head", "lm_head", LINEAR, True, id="exact-name"),
        pytest.param("re:.*mlp.gate$", "model.layers.0.mlp.gate", LINEAR, True, id="regex"),
        pytest.param(
            "re:.*mlp.gate$", "model.layers.0.mlp.gate_proj", LINEAR, False, id="regex-miss"
        ),
        pytest.param(
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.o_proj",
            LINEAR,
            True,
            id="with-model-prefix",
        ),
        pytest.param(
            "layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.o_proj",
            LINEAR,
            False,
            id="without-model-prefix-does-not-match",
        ),
    ],
)
def test_ignore_entries(
    ignore: str, name: str, class_names: tuple[str, ...], ignored: bool
) -> None:
    config = _config({"g": _group("Linear")}, ignore=[ignore])
    assert is_ignored(config, name, class_names) is ignored
    resolved = resolve_scheme(config, name, class_names)
    assert (resolved is None) is ignored
    if not ignored:
        assert resolved is not None and resolved[0] == "g"


def test_ignore_beats_an_exact_name_target() -> None:
    config = _config({"g": _group("lm_head")}, ignore=["re:lm_"])
    assert resolve_scheme(config, "lm_head", LINEAR) is None


# ---------------------------------------------------------------------------------------------
# resolve_scheme priority (§1.6)

PRIORITY_CONFIG = {
    "by_class": _group("Linear"),
    "by_regex": _group("re:.*q_proj"),
    "by_name": _group("model.layers.0.q_proj"),
}


@pytest.mark.parametrize(
    ("name", "class_names", "group"),
    [
        pytest.param("model.layers.0.q_proj", LINEAR, "by_name", id="exact-name-first"),
        pytest.param("model.layers.1.q_proj", LINEAR, "by_regex", id="regex-before-class"),
        pytest.param("model.layers.1.k_proj", LINEAR, "by_class", id="class-last"),
        pytest.param("model.layers.1.k_proj", ("Conv1d", "Module"), None, id="no-match"),
    ],
)
def test_exact_name_then_regex_then_class(
    name: str, class_names: tuple[str, ...], group: str | None
) -> None:
    for order in (list(PRIORITY_CONFIG), list(reversed(PRIORITY_CONFIG))):
        config = _config({key: PRIORITY_CONFIG[key] for key in order})
        resolved = resolve_scheme(config, name, class_names)
        assert (None if resolved is None else resolved[0]) == group


@pytest.mark.parametrize(
    "groups",
    [
        pytest.param(
            {"first": _group("re:model.*"), "second": _group("re:.*proj")}, id="listed-last"
        ),
        pytest.param(
            {"second": _group("re:.*proj"), "first": _group("re:model.*")}, id="listed-first"
        ),
    ],
)
def test_regex_targets_go_alphabetically_not_by_group_order(groups: dict[str, Any]) -> None:
    # "re:.*proj" < "re:model.*" because "." sorts before "m"
    resolved = resolve_scheme(_config(groups), "model.layers.0.q_proj", LINEAR)
    assert resolved is not None and resolved[0] == "second"


def test_class_targets_go_alphabetically_not_by_closeness() -> None:
    config = _config({"own_class": _group("QKVLinear"), "ancestor": _group("Linear")})
    resolved = resolve_scheme(config, "model.qkv", ("QKVLinear", "Linear", "Module"))
    assert resolved is not None and resolved[0] == "ancestor"


def test_same_target_in_two_groups_goes_to_the_later_group() -> None:
    config = _config({"early": _group("Linear"), "late": _group("Embedding", "Linear", weights=W8)})
    resolved = resolve_scheme(config, "model.layers.0.mlp.up_proj", LINEAR)
    assert resolved is not None
    group_name, scheme = resolved
    assert group_name == "late"
    assert scheme.weights is not None and scheme.weights.num_bits == 8


def test_a_target_unique_to_the_earlier_group_still_selects_it() -> None:
    config = _config({"early": _group("Linear", "Embedding"), "late": _group("Linear", weights=W8)})
    resolved = resolve_scheme(config, "model.embed_tokens", ("Embedding", "Module"))
    assert resolved is not None and resolved[0] == "early"


# ---------------------------------------------------------------------------------------------
# resolve_format (§1.5 recommended resolution)


def test_group_format_wins_over_top_level_and_inference() -> None:
    config = _config(
        {"g": {**_scheme("W4AFP8").to_dict(), "format": "pack-quantized"}},
        format="int-quantized",
    )
    assert resolve_format(config, config.config_groups["g"]) == "pack-quantized"


def test_concrete_top_level_format_fills_groups_without_one() -> None:
    config = _config({"W4A16": ["Linear"]}, format="naive-quantized", version="0.10.2")
    assert resolve_format(config, config.config_groups["W4A16"]) == "naive-quantized"


@pytest.mark.parametrize(
    "top_level",
    [
        pytest.param({"format": "mixed-precision"}, id="mixed-precision"),
        pytest.param({"format": "fakequant"}, id="fakequant"),
        pytest.param({"format": None}, id="null"),
        pytest.param({}, id="absent"),
    ],
)
def test_summary_top_level_format_falls_back_to_inference(top_level: dict[str, Any]) -> None:
    config = _config({"W4AFP8": ["Linear"]}, **top_level)
    assert resolve_format(config, config.config_groups["W4AFP8"]) == "int-quantized"


def test_inference_follows_the_writer_version() -> None:
    config = _config({"W3A16": ["Linear"]}, version="0.16.0")
    assert resolve_format(config, config.config_groups["W3A16"]) == "naive-quantized"


def test_inference_uses_the_legacy_sparsity_structure() -> None:
    config = _config(
        {"W4A16": ["Linear"]},
        version="0.12.2",
        sparsity_config={"format": "dense", "sparsity_structure": "2:4"},
    )
    assert resolve_format(config, config.config_groups["W4A16"]) == "marlin-24"


# ---------------------------------------------------------------------------------------------
# infer_format per writer version (§1.5, §7)

MXFP8_NO_E8M0 = {"num_bits": 8, "type": "float", "group_size": 32}
FP4_G32 = {"num_bits": 4, "type": "float", "group_size": 32}
FP4_G64 = {"num_bits": 4, "type": "float", "group_size": 64}
FP8_WEIGHT_ONLY = {"num_bits": 8, "type": "float", "strategy": "channel"}
INT16_WEIGHT_ONLY = {"num_bits": 16, "strategy": "channel"}
INT4_TENSOR = {"num_bits": 4}
V20, V18, V17, V16, V14, V13, V12 = (
    (0, 20, 0),
    (0, 18, 0),
    (0, 17, 1),
    (0, 16, 0),
    (0, 14, 0),
    (0, 13, 0),
    (0, 12, 2),
)

INFERENCE_CASES = [
    # 0.18+ (and unknown versions)
    pytest.param("W4AFP8", V20, "int-quantized", id="W4AFP8-by-inference-is-int-quantized"),
    pytest.param("W4AFP8", None, "int-quantized", id="W4AFP8-unknown-version"),
    pytest.param("W4A8", V18, "int-quantized", id="W4A8-0.18"),
    pytest.param("W3A16", V18, "pack-quantized", id="W3A16-0.18"),
    pytest.param("UNQUANTIZED", V20, "dense", id="no-weights-dense"),
    pytest.param("MXFP8", V20, "mxfp8-quantized", id="MXFP8"),
    pytest.param({"weights": MXFP8_NO_E8M0}, V20, "naive-quantized", id="fp8-g32-no-uint8-naive"),
    pytest.param(
        {
            "weights": MXFP8_NO_E8M0,
            "input_activations": {"type": "float", "strategy": "token", "dynamic": True},
        },
        V20,
        "float-quantized",
        id="fp8-g32-no-uint8-with-inputs",
    ),
    pytest.param("MXFP6A8", V20, "mxfp6-pack-quantized", id="MXFP6A8"),
    pytest.param("NVFP4", V20, "nvfp4-pack-quantized", id="NVFP4"),
    pytest.param({"weights": FP4_G64}, V20, "naive-quantized", id="fp4-g64-naive"),
    pytest.param({"weights": FP8_WEIGHT_ONLY}, V20, "naive-quantized", id="fp8-weight-only-naive"),
    pytest.param({"weights": INT16_WEIGHT_ONLY}, V20, "naive-quantized", id="int16-naive"),
    pytest.param("FP8_DYNAMIC", V20, "float-quantized", id="FP8_DYNAMIC"),
    # 0.15-0.17: pack before int, weight-only; 4/8 bits until 0.16, 1-8 bits in 0.17
    pytest.param("W3A16", V16, "naive-quantized", id="W3A16-0.16"),
    pytest.param("W3A16", V17, "pack-quantized", id="W3A16-0.17"),
    pytest.param("W4A16", V16, "pack-quantized", id="W4A16-0.16"),
    pytest.param("W4A8", V17, "int-quantized", id="W4A8-0.17"),
    pytest.param("W4AFP8", V16, "int-quantized", id="W4AFP8-0.16"),
    pytest.param("MXFP8", V16, "mxfp8-quantized", id="MXFP8-0.16"),
    pytest.param("MXFP4", V16, "mxfp4-pack-quantized", id="MXFP4-0.16"),
    pytest.param({"weights": FP8_WEIGHT_ONLY}, V16, "naive-quantized", id="fp8-weight-only-0.16"),
    # <=0.14
    pytest.param("W4A16", V14, "pack-quantized", id="W4A16-0.14"),
    pytest.param("W3A16", V14, "naive-quantized", id="W3A16-0.14"),
    pytest.param("W8A8", V12, "int-quantized", id="W8A8-0.12"),
    pytest.param("W4AFP8", V14, "int-quantized", id="W4AFP8-0.14"),
    pytest.param("FP8", V12, "float-quantized", id="FP8-0.12"),
    pytest.param({"weights": FP8_WEIGHT_ONLY}, V12, "naive-quantized", id="fp8-weight-only-0.12"),
    pytest.param({"weights": FP4_G32}, V12, "nvfp4-pack-quantized", id="fp4-g32-0.12-nvfp4"),
    pytest.param({"weights": FP4_G32}, V13, "mxfp4-pack-quantized", id="fp4-g32-0.13-mxfp4"),
    pytest.param({"weights": FP4_G64}, V13, "nvfp4-pack-quantized", id="fp4-g64-0.13-nvfp4"),
    pytest.param("UNQUANTIZED", V12, "dense", id="no-weights-0.12"),
]


@pytest.mark.parametrize(("scheme", "version", "expected"), INFERENCE_CASES)
def test_infer_format(
    scheme: str | dict[str, Any], version: tuple[int, int, int] | None, expected: str
) -> None:
    body = scheme if isinstance(scheme, str) else {"targets": ["Linear"], **scheme}
    assert infer_format(_scheme(body), version) == expected


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        pytest.param(W4A16, "marlin-24", id="group"),
        pytest.param({"num_bits": 8, "group_size": -1}, "marlin-24", id="channel"),
        pytest.param(INT4_TENSOR, "pack-quantized", id="tensor-stays-packed"),
        pytest.param({"num_bits": 3, "group_size": 128}, "naive-quantized", id="3-bit-naive"),
    ],
)
def test_v0_14_marlin_24_for_2_4_sparse_models(weights: dict[str, Any], expected: str) -> None:
    scheme = _scheme({"targets": ["Linear"], "weights": weights})
    assert infer_format(scheme, V14, sparsity_structure="2:4") == expected
    assert infer_format(scheme, V18, sparsity_structure="2:4") != "marlin-24"
