"""The fixture catalog: it loads, its names are unique and stable, it covers what the issue
asks for, and an impossible entry fails naming the entry, the field and the rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.fixtures import catalog as catalog_module
from ctref.fixtures.catalog import load_catalog, parse_catalog
from ctref.formats import format_names
from ctref.presets import PRESET_SCHEMES

CATALOG = load_catalog()
NAMES_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "case-names.txt"


def all_schemes():
    for case in CATALOG.cases:
        for group, scheme in zip(case.groups, case.config.config_groups.values()):
            yield case, group, scheme


def test_names_are_unique_and_kebab_case():
    names = CATALOG.names()
    assert len(names) == len(set(names))
    assert all(catalog_module.NAME_PATTERN.match(name) for name in names)


def test_names_are_stable():
    """Names key caches, golden files and vendors' expectation lists: renaming or dropping a case
    is a breaking change, made on purpose by editing fixtures/case-names.txt too."""
    recorded = [
        line
        for line in NAMES_FILE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    missing = sorted(set(recorded) - set(CATALOG.names()))
    unrecorded = sorted(set(CATALOG.names()) - set(recorded))
    assert not missing, f"cases removed or renamed (breaking): {missing}"
    assert not unrecorded, f"new cases: add them to {NAMES_FILE.name}: {unrecorded}"


def test_every_preset_is_written_by_some_case():
    used = {group.preset.upper() for _, group, _ in all_schemes() if group.preset}
    wanted = {
        "W4A16",
        "W4A16_ASYM",
        "W8A16",
        "W8A8",
        "INT8",
        "FP8",
        "FP8_DYNAMIC",
        "FP8_BLOCK",
        "NVFP4",
        "NVFP4A16",
        "MXFP4",
        "MXFP4A16",
        "MXFP4XFP8",
        "MXFP6A16",
        "MXFP6A8",
        "MXFP8",
        "MXFP8A16",
        "W4AFP8",
        "W4A8",
        "UNQUANTIZED",
    }
    assert wanted <= set(PRESET_SCHEMES)
    assert wanted <= used, sorted(wanted - used)


def test_every_format_strategy_combination_is_covered():
    seen = {
        (group.format, scheme.weights.strategy)
        for _, group, scheme in all_schemes()
        if scheme.weights
    }
    formats = {fmt for case in CATALOG.cases for fmt in case.formats}
    expected = (
        {("pack-quantized", s) for s in ("tensor", "channel", "group")}
        | {
            (f, s)
            for f in ("naive-quantized", "int-quantized")
            for s in ("tensor", "channel", "group", "block")
        }
        | {("float-quantized", s) for s in ("tensor", "channel", "group", "block")}
        | {
            ("nvfp4-pack-quantized", "group"),
            ("nvfp4-pack-quantized", "tensor_group"),
            ("mxfp4-pack-quantized", "group"),
            ("mxfp6-pack-quantized", "group"),
            ("mxfp8-quantized", "group"),
            ("marlin-24", "group"),
            ("marlin-24", "channel"),
        }
    )
    assert expected <= seen, sorted(expected - seen)
    assert set(format_names()) - {
        "naive-quantized",
        "int-quantized",
        "float-quantized",
    } <= formats | {"naive-quantized"}
    bits = {
        (scheme.weights.num_bits, scheme.weights.strategy, scheme.weights.symmetric)
        for _, group, scheme in all_schemes()
        if group.format == "pack-quantized"
    }
    assert {
        (b, s, sym)
        for b in range(1, 9)
        for s in ("tensor", "channel", "group")
        for sym in (True, False)
    } <= bits


def test_activation_schemes_dtypes_and_sizes_are_covered():
    inputs = {(a.dynamic, a.strategy) for _, _, s in all_schemes() if (a := s.input_activations)}
    assert {
        (True, "token"),
        (True, "tensor"),
        (True, "group"),
        (True, "tensor_group"),
        ("local", "tensor_group"),
        (False, "tensor"),
        (False, "group"),
    } <= inputs
    assert {str(case.dtype) for case in CATALOG.cases} == {"torch.bfloat16", "torch.float16"}
    models = {case.model.architecture for case in CATALOG.cases if case.model}
    assert models == {"LlamaForCausalLM", "Qwen3MoeForCausalLM"}
    assert any(len(case.groups) >= 3 for case in CATALOG.cases)
    assert any(case.kv_cache_scheme for case in CATALOG.cases)
    assert any(case.transform_config for case in CATALOG.cases)
    assert any(group.as_preset_list for _, group, _ in all_schemes())


def test_edge_cases_of_the_bug_catalog_are_present():
    covers = {bug for case in CATALOG.cases for bug in case.covers}
    for bug in (
        "A1",
        "A2",
        "A3",
        "A4",
        "B1",
        "B2",
        "B3",
        "C1",
        "C3",
        "D1",
        "D6",
        "E3",
        "F1",
        "F3",
        "G1",
        "G2",
        "G3",
        "H4",
        "J2",
        "J3",
        "J5",
        "M3",
        "M4",
        "N1",
        "N3",
        "O2",
    ):
        assert bug in covers, bug
    shapes = {
        layer.shape[0]
        for case in CATALOG.cases
        for layer in case.layers
        if any(
            s.weights and s.weights.strategy == "block" for s in case.config.config_groups.values()
        )
    }
    assert {448, 576, 2112} <= shapes
    ratios = {case.draw.shard_ratio for case in CATALOG.cases}
    assert {1.25, 10.0} <= ratios
    assert any(case.draw.global_scale == 3584.0 for case in CATALOG.cases)
    assert {case.draw.zero_points for case in CATALOG.cases} == {"random", "edges", "zero"}
    assert any(case.draw.zero_group for case in CATALOG.cases)
    assert any(case.draw.outlier_group for case in CATALOG.cases)
    ragged = [
        case
        for case in CATALOG.cases
        for layer in case.layers
        for s in case.config.config_groups.values()
        if s.weights and s.weights.strategy == "group" and layer.shape[-1] % s.weights.group_size
    ]
    assert ragged


def test_legacy_writers_are_present():
    by_version = {}
    for case in CATALOG.cases:
        by_version.setdefault(case.writer_version, []).append(case)
    assert {"0.20.0", "0.17.1", "0.14.0", "0.9.3"} <= set(by_version)
    legacy_bits = {
        s.weights.num_bits
        for case in by_version["0.17.1"]
        for s in case.config.config_groups.values()
    }
    assert {3, 5, 6, 7} <= legacy_bits
    assert all(case.packing_layout == "legacy" for case in by_version["0.17.1"])
    assert any(
        s.weights.legacy_group_actorder
        for case in by_version["0.14.0"]
        for s in case.config.config_groups.values()
    )


def test_ignore_spellings_resolve_as_the_library_matches():
    """Exact and regex spellings ignore down_proj; without the model. prefix they do not."""
    down = next(
        layer
        for layer in CATALOG.case("ignore-exact-names").layers
        if layer.name.endswith("down_proj")
    )
    assert CATALOG.case("ignore-exact-names").scheme_of(down) is None
    assert CATALOG.case("ignore-regex").scheme_of(down) is None
    assert CATALOG.case("ignore-no-model-prefix").scheme_of(down) is not None
    assert CATALOG.case("ignore-regex-no-model-prefix").scheme_of(down) is not None
    moe = CATALOG.case("moe-ignore-router-by-class")
    router = next(layer for layer in moe.layers if layer.name.endswith("mlp.gate"))
    assert moe.scheme_of(router) is None


def test_catalog_location_can_be_overridden(tmp_path, monkeypatch):
    other = tmp_path / "catalog.toml"
    other.write_text(
        '[[case]]\nname = "only"\ndescription = "d"\nformat = "pack-quantized"\npreset = "W4A16"\n'
        '[layer_sets.default]\n"model.layers.0.mlp.down_proj" = [8, 128]\n'
        '[defaults]\nlayers = "default"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("CTREF_CATALOG", str(other))
    assert catalog_module.catalog_path() == other
    assert load_catalog().names() == ["only"]


# ---------------------------------------------------------------------------------------------
# Impossible entries

BASE = {
    "defaults": {
        "writer_version": "0.20.0",
        "dtype": "bfloat16",
        "layers": "default",
        "ignore": ["lm_head"],
    },
    "layer_sets": {"default": {"model.layers.0.self_attn.q_proj": [37, 256], "lm_head": [16, 256]}},
    "case": [{"name": "x", "description": "d", "format": "pack-quantized", "preset": "W4A16"}],
}


def with_case(**fields):
    data = copy.deepcopy(BASE)
    data["case"][0].update(fields)
    return data


def test_base_entry_is_valid():
    (case,) = parse_catalog(BASE)
    assert case.name == "x" and case.groups[0].format == "pack-quantized"


INT4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}
FP4_16 = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": 16,
    "scale_dtype": "torch.float8_e4m3fn",
}


@pytest.mark.parametrize(
    ("data", "key", "rule"),
    [
        pytest.param(with_case(colour="red"), "case.x.colour", "unknown key", id="unknown-key"),
        pytest.param(with_case(name="Bad_Name"), "case[0].name", "lowercase", id="bad-name"),
        pytest.param(
            {**BASE, "case": BASE["case"] * 2}, "case.x.name", "duplicate", id="duplicate-name"
        ),
        pytest.param(
            with_case(format="mxfp4-pack-quantized"),
            "case.x.format",
            "FP4",
            id="int-weights-in-mxfp4",
        ),
        pytest.param(
            with_case(
                preset=None,
                weights={
                    **INT4,
                    "strategy": "block",
                    "group_size": None,
                    "block_structure": [32, 32],
                },
            ),
            "case.x.format",
            "strategy",
            id="pack-block",
        ),
        pytest.param(
            with_case(format="nvfp4-pack-quantized", preset="NVFP4", layers={"a.q_proj": [16, 40]}),
            "case.x.layers",
            "K % 16",
            id="nvfp4-ragged-k",
        ),
        pytest.param(
            with_case(preset=None, weights={**INT4, "actorder": "group"}),
            "case.x.writer_version",
            "removed in 0.19",
            id="group-actorder-on-0.20",
        ),
        pytest.param(
            with_case(format="mxfp6-pack-quantized", preset="MXFP6A16", writer_version="0.19.0"),
            "case.x.writer_version",
            "since 0.20",
            id="mxfp6-before-0.20",
        ),
        pytest.param(
            with_case(
                format="nvfp4-pack-quantized", preset=None, weights=FP4_16, writer_version="0.12.2"
            ),
            "case.x.writer_version",
            "since 0.13",
            id="scale-dtype-before-0.13",
        ),
        pytest.param(
            with_case(draw={"zero_points": "edges"}),
            "case.x.draw.zero_points",
            "asymmetric",
            id="zp-on-symmetric",
        ),
        pytest.param(
            with_case(
                format="nvfp4-pack-quantized", preset="NVFP4A16", draw={"outlier_group": True}
            ),
            "case.x.draw.outlier_group",
            "448",
            id="outlier-in-fp8-scales",
        ),
        pytest.param(
            with_case(
                format="mxfp4-pack-quantized",
                preset="MXFP4A16",
                draw={"shard_ratio": 10.0},
                layers={"a.k_proj": [32, 64]},
            ),
            "case.x.draw.shard_ratio",
            "powers of two",
            id="mx-shard-ratio",
        ),
        pytest.param(
            with_case(preset="W4A16", draw={"global_scale": 3584.0}),
            "case.x.draw.global_scale",
            "tensor_group",
            id="global-scale-without-tensor-group",
        ),
        pytest.param(
            with_case(weights=INT4), "case.x.weights", "preset or explicit", id="preset-and-weights"
        ),
        pytest.param(
            with_case(preset="W4A17"), "case.x.preset", "unknown preset", id="unknown-preset"
        ),
        pytest.param(
            with_case(preset_form="list", format="pack-quantized", preset="W8A8"),
            "case.x.format",
            "infer 'int-quantized'",
            id="list-form-infers-another-format",
        ),
        pytest.param(
            with_case(targets=["re:.*mlp.*"]),
            "case.x.targets",
            "quantizes no layer",
            id="targets-miss",
        ),
        pytest.param(
            with_case(
                format="marlin-24",
                preset=None,
                weights={**INT4, "group_size": 128},
                writer_version="0.14.0",
                sparsity={"format": "dense", "structure": "2:4"},
            ),
            "case.x.format",
            "float16",
            id="marlin-in-bf16",
        ),
        pytest.param(
            with_case(sparsity={"format": "sparse-24-bitmask", "structure": "2:4"}),
            "case.x.sparsity",
            "0.14",
            id="sparsity-on-0.20",
        ),
        pytest.param(
            with_case(
                preset=None, weights=INT4, input_activations={"num_bits": 8, "strategy": "token"}
            ),
            "case.x.input_activations.strategy",
            "dynamic",
            id="static-token-input",
        ),
        pytest.param(with_case(dtype="float32"), "case.x.dtype", "bfloat16", id="dtype"),
        pytest.param(
            with_case(layers="nope"), "case.x.layers", "no layer set", id="unknown-layer-set"
        ),
        pytest.param(with_case(model="nope"), "case.x.model", "no model", id="unknown-model"),
        pytest.param(
            with_case(
                preset=None,
                format="float-quantized",
                weights={"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False},
            ),
            "case.x.format",
            "symmetric only",
            id="asymmetric-float",
        ),
        pytest.param(
            with_case(kv_cache_scheme={"num_bits": 8, "type": "float"}),
            "case.x.layers",
            "k_proj",
            id="kv-without-attention",
        ),
    ],
)
def test_impossible_entries_fail_naming_entry_field_and_rule(data, key, rule):
    with pytest.raises(CTRefError) as raised:
        parse_catalog(data)
    assert raised.value.key == key, str(raised.value)
    assert rule in raised.value.rule


def test_catalog_entries_hold_valid_quantization_args():
    """Every args dict parses as the format validates it (an invalid one raises CTRefError)."""
    checked = 0
    for case, group, _ in all_schemes():
        for args in (group.weights, group.input_activations):
            if args is not None:
                assert isinstance(QuantArgs.from_dict(args, key=f"case.{case.name}"), QuantArgs)
                checked += 1
    assert checked > 0
