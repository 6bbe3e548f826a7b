"""``ctref inspect``, ``verify`` and ``dequant`` on tiny checkpoints written in tmp_path.

The model is a 2-layer Llama (hidden 32, 2 heads, 1 KV head) in three formats: attention FP8
block 16x16 with static FP8 input scales (float-quantized), gate/up W4A16 group 16
(pack-quantized), down NVFP4 (nvfp4-pack-quantized); an FP8 KV cache; biases on the attention
projections; lm_head ignored. Three shards split the tensors in name order, so some modules
straddle two shards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import INDEX_FILE, encode, quant_config, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ctref.checkpoint
from ctref import open_checkpoint
from ctref.cli import main
from ctref.dequant import SafetensorsWriter
from ctref.presets import PRESET_SCHEMES

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 32, 2, 1, 16, 64, 48, 2
FP8_BLOCK = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "block",
    "block_structure": [16, 16],
}
FP8_TENSOR_STATIC = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "tensor",
    "dynamic": False,
}
W4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
NVFP4_WEIGHTS = PRESET_SCHEMES["NVFP4A16"]["weights"]
GROUPS = {
    "attention": {
        "targets": [r"re:.*self_attn\.(q|k|v|o)_proj$"],
        "weights": FP8_BLOCK,
        "input_activations": FP8_TENSOR_STATIC,
        "format": "float-quantized",
    },
    "gate_up": {
        "targets": [r"re:.*mlp\.(gate|up)_proj$"],
        "weights": W4_GROUP,
        "format": "pack-quantized",
    },
    "down": {
        "targets": [r"re:.*mlp\.down_proj$"],
        "weights": NVFP4_WEIGHTS,
        "format": "nvfp4-pack-quantized",
    },
}
FORMATS = {
    "attention": "float-quantized",
    "gate_up": "pack-quantized",
    "down": "nvfp4-pack-quantized",
}
MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
}
SHAPES = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (FFN, HIDDEN),
    "mlp.up_proj": (FFN, HIDDEN),
    "mlp.down_proj": (HIDDEN, FFN),
}


def _group_of(module: str) -> str | None:
    if ".self_attn." in module:
        return "attention"
    if module.endswith(("gate_proj", "up_proj")):
        return "gate_up"
    return "down" if module.endswith("down_proj") else None


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny model, quantized as the config says."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        "lm_head.weight": rand(VOCAB, HIDDEN),
        "model.norm.weight": rand(HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = rand(HIDDEN)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = rand(HIDDEN)
        for name, shape in SHAPES.items():
            module = f"{prefix}.{name}"
            group = GROUPS[_group_of(module)]
            tensors.update(encode(module, rand(*shape), group["format"], group["weights"]))
            if name.startswith("self_attn"):
                tensors[f"{module}.bias"] = rand(shape[0])
                tensors[f"{module}.input_scale"] = torch.tensor([0.05], dtype=torch.bfloat16)
        for kind in ("k", "v"):
            tensors[f"{prefix}.self_attn.{kind}_scale"] = torch.tensor([0.1], dtype=torch.bfloat16)
    return tensors


def checkpoint_config(**extra: Any) -> dict[str, Any]:
    return quant_config(GROUPS, ignore=["lm_head"], kv_cache_scheme=FP8_TENSOR_STATIC, **extra)


def write_model(
    directory: Path, tensors: Mapping[str, torch.Tensor] | None = None, *, shards: int = 3
) -> Path:
    write_checkpoint(
        directory,
        model_tensors() if tensors is None else tensors,
        checkpoint_config(),
        shards=shards,
        model_config=MODEL_CONFIG,
    )
    (directory / "generation_config.json").write_text('{"do_sample": false}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    return directory


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def shard_of(directory: Path, tensor: str) -> str:
    index = directory / INDEX_FILE
    if index.exists():
        return json.loads(index.read_text())["weight_map"][tensor]
    return "model.safetensors"


def header_facts(directory: Path) -> dict[str, tuple[str, list[int], str]]:
    """tensor → (dtype, shape, file), read with safetensors itself."""
    facts = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                facts[name] = (piece.get_dtype(), piece.get_shape(), file.name)
    return facts


def data_bytes(directory: Path) -> int:
    total = 0
    for file in directory.glob("*.safetensors"):
        with file.open("rb") as handle:
            total += file.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")
    return total


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_table_folds_layers_and_shows_scheme_format_strategy_bits(model, capsys) -> None:
    code, out, err = run(capsys, "inspect", model)
    assert code == 0
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith("model.layers")
    }
    assert rows["model.layers.*.mlp.up_proj"][:6] == [
        "model.layers.*.mlp.up_proj",
        "2",
        "gate_up",
        "pack-quantized",
        "group",
        "16",
    ]
    assert "int4" in rows["model.layers.*.mlp.up_proj"]
    assert rows["model.layers.*.mlp.down_proj"][3:5] == ["nvfp4-pack-quantized", "tensor_group"]
    q_proj = rows["model.layers.*.self_attn.q_proj"]
    assert q_proj[2:6] == ["attention", "float-quantized", "block", "16x16"]
    assert "fp8 tensor static" in " ".join(q_proj)
    assert q_proj[-1] == "bias,input_scale,weight,weight_scale"
    assert "flagged" not in out, "a clean checkpoint has nothing to flag"


def test_inspect_lists_modules_the_reader_cannot_resolve(tmp_path, capsys) -> None:
    tensors = model_tensors()
    unresolvable = "model.layers.1.self_attn.v_proj.weight"
    tensors[unresolvable] = tensors[unresolvable].view(torch.int8)
    directory = write_model(tmp_path / "m", tensors)
    code, report = run_json(capsys, "inspect", directory)
    assert code == 0
    (error,) = report["errors"]
    assert error["tensor"] == unresolvable and "float-quantized" in error["rule"]
    assert "model.layers.1.self_attn.v_proj" not in {m["name"] for m in report["modules"]}
    assert report["flagged"] == [], "its scale and bias are not reported as leftovers"
    _, out, _ = run(capsys, "inspect", directory)
    assert "modules the reader cannot resolve (1):" in out


def test_inspect_all_lists_every_module(model, capsys) -> None:
    _, out, _ = run(capsys, "inspect", model, "--all")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("model.layers.")]
    assert "model.layers.1.mlp.up_proj" in listed and "model.layers.0.mlp.up_proj" in listed
    assert not any("*" in name for name in listed)


def test_inspect_json_agrees_with_the_headers(model, capsys) -> None:
    code, report = run_json(capsys, "inspect", model)
    assert code == 0
    facts = header_facts(model)
    modules = {m["name"]: m for m in report["modules"]}
    assert len(modules) == 2 + 1 + LAYERS * (2 + len(SHAPES))
    down = modules["model.layers.1.mlp.down_proj"]
    assert (down["scheme"], down["format"], down["weight_shape"]) == (
        "down",
        "nvfp4-pack-quantized",
        [HIDDEN, FFN],
    )
    assert down["weights"]["strategy"] == "tensor_group" and down["weights"]["num_bits"] == 4
    for module in modules.values():
        for tensor in module["tensors"]:
            dtype, shape, file = facts[tensor["name"]]
            assert (tensor["shape"], tensor["file"]) == (shape, file)
    counted = sum(row["bytes"] for row in report["formats"].values())
    assert counted + report["outside_modules"]["bytes"] == data_bytes(model)
    assert report["formats"]["pack-quantized"]["modules"] == 2 * LAYERS
    assert report["formats"]["dense"]["modules"] == 3 + 2 * LAYERS
    assert report["flagged"] == [] and report["errors"] == []


def test_inspect_reads_no_tensor_data(model, capsys, monkeypatch) -> None:
    """Only headers, and the 2-entry ``weight_shape`` vectors that give packed modules' K."""
    reads: list[str] = []
    real_safe_open = ctref.checkpoint.safe_open

    class Counting:
        def __init__(self, handle: Any) -> None:
            self._handle = handle

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self._handle.get_tensor(name)

        def __getattr__(self, attribute: str) -> Any:
            return getattr(self._handle, attribute)

    monkeypatch.setattr(
        ctref.checkpoint, "safe_open", lambda *a, **k: Counting(real_safe_open(*a, **k))
    )
    assert run(capsys, "inspect", model)[0] == 0
    assert run(capsys, "inspect", model, "--json")[0] == 0
    assert reads, "the counting handle must be the one the reader uses"
    assert {name.rpartition(".")[2] for name in reads} == {"weight_shape"}


def test_inspect_flags_unknown_and_unused_tensors(tmp_path, capsys) -> None:
    tensors = model_tensors()
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["lm_head.weight_scale"] = torch.ones(1, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.up_proj.weight_zero_point"] = torch.zeros(FFN, 2, dtype=torch.int8)
    directory = write_model(tmp_path / "m", tensors)
    code, report = run_json(capsys, "inspect", directory)
    assert code == 0
    flags = {f["tensor"]: f["flag"] for f in report["flagged"]}
    assert flags == {
        "model.rotary_emb.inv_freq": "unknown",
        "lm_head.weight_scale": "unused",
        "model.layers.0.mlp.up_proj.weight_zero_point": "unused",
    }
    _, out, _ = run(capsys, "inspect", directory)
    assert "flagged tensors (3)" in out and "model.rotary_emb.inv_freq" in out


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_clean_checkpoint_exits_0(model, capsys) -> None:
    code, out, err = run(capsys, "verify", model)
    assert (code, out) == (0, "")
    assert "clean" in err and err.count("\n") == 1
    code, report = run_json(capsys, "verify", model)
    assert (code, report["clean"], report["findings"]) == (0, True, [])
    assert report["modules"] == 3 + LAYERS * (2 + len(SHAPES))


def _findings(report: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["check"], f["tensor"]): f for f in report["findings"]}


def test_verify_collects_every_structural_finding(tmp_path, capsys) -> None:
    tensors = model_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(1, 1, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.gate_proj.weight_scale"] = tensors[
        "model.layers.0.mlp.gate_proj.weight_scale"
    ].to(torch.int32)
    tensors["model.layers.1.mlp.up_proj.weight_zero_point"] = torch.zeros(FFN, 2, dtype=torch.int8)
    tensors["lm_head.weight_scale"] = torch.ones(1, dtype=torch.bfloat16)
    del tensors["model.layers.1.self_attn.k_scale"]
    del tensors["model.layers.0.self_attn.v_proj.input_scale"]
    unresolvable = "model.layers.0.self_attn.k_proj.weight"
    tensors[unresolvable] = tensors[unresolvable].view(torch.int8)
    directory = write_model(tmp_path / "m", tensors)
    code, report = run_json(capsys, "verify", directory)
    assert code == 1 and not report["clean"]
    found = _findings(report)
    assert [f["tensor"] for f in report["findings"] if "k_proj" in f["tensor"]] == [unresolvable]
    assert "float-quantized" in found[("module", unresolvable)]["rule"]
    expected = {
        ("missing", "model.layers.0.mlp.up_proj.weight_scale"),
        ("shape", "model.layers.1.self_attn.o_proj.weight_scale"),
        ("dtype", "model.layers.0.mlp.gate_proj.weight_scale"),
        ("unused", "model.layers.1.mlp.up_proj.weight_zero_point"),
        ("unused", "lm_head.weight_scale"),
        ("missing", "model.layers.1.self_attn.k_scale"),
        ("missing", "model.layers.0.self_attn.v_proj.input_scale"),
    }
    assert expected <= set(found), sorted(set(found))
    assert found[("unused", "lm_head.weight_scale")]["severity"] == "warning"
    assert found[("unused", "model.layers.1.mlp.up_proj.weight_zero_point")]["severity"] == "error"
    for key in expected:
        finding = found[key]
        assert set(finding) == {"check", "rule", "file", "tensor", "severity"}
        if key[1] in tensors:
            assert finding["file"] == shard_of(directory, key[1])
        assert finding["rule"]
    # Modules with broken storage are not decoded as well (one finding per cause).
    assert not any(f["check"] == "decode" for f in report["findings"])


def test_verify_numeric_checks(tmp_path, capsys) -> None:
    tensors = model_tensors()
    tensors["model.norm.weight"][3] = float("nan")
    tensors["model.layers.0.self_attn.q_proj.bias"][0] = float("inf")
    scale = tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    scale[0, 0] = -scale[0, 0]
    nvfp4_scale = tensors["model.layers.0.mlp.down_proj.weight_scale"].view(torch.uint8)
    nvfp4_scale[0, 0] = 0  # fp8 +0.0
    fp8_weight = tensors["model.layers.0.self_attn.o_proj.weight"].view(torch.uint8)
    fp8_weight[1, 1] = 0x7F  # an FP8 E4M3 NaN code
    global_scale = "model.layers.1.mlp.down_proj.weight_global_scale"
    tensors[global_scale] = torch.tensor([0.0])
    directory = write_model(tmp_path / "m", tensors)
    code, report = run_json(capsys, "verify", directory)
    assert code == 1
    found = _findings(report)
    assert {
        ("finite", "model.norm.weight"),
        ("finite", "model.layers.0.self_attn.q_proj.bias"),
        ("scale", "model.layers.1.self_attn.k_proj.weight_scale"),
        ("scale", "model.layers.0.mlp.down_proj.weight_scale"),
        ("decode", global_scale),
    } <= set(found), sorted(set(found))
    # The format may refuse the NaN code itself; otherwise the decoded weight holds a NaN.
    fp8_nan = {
        check for check, tensor in found if tensor == "model.layers.0.self_attn.o_proj.weight"
    }
    assert fp8_nan & {"decode", "finite"}
    assert found[("decode", global_scale)]["file"] == shard_of(directory, global_scale)
    assert "1 NaN/Inf" in found[("finite", "model.norm.weight")]["rule"]
    code, report = run_json(capsys, "verify", directory, "--structure-only")
    assert code == 0 and report["findings"] == [], "numeric problems need the numeric pass"


def _naive_int4_asym(directory: Path, codes_fix: int | None, zero_point_fix: int | None) -> Path:
    args = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}
    tensors = encode(
        "model.layers.0.mlp.up_proj", torch.randn(8, 16).bfloat16(), "naive-quantized", args
    )
    if codes_fix is not None:
        tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = codes_fix
    if zero_point_fix is not None:
        tensors["model.layers.0.mlp.up_proj.weight_zero_point"][2, 0] = zero_point_fix
    group = {"targets": ["re:.*up_proj$"], "weights": args, "format": "naive-quantized"}
    write_checkpoint(directory, tensors, quant_config({"g": group}))
    return directory


def test_verify_zero_points_and_codes_in_range(tmp_path, capsys) -> None:
    assert run(capsys, "verify", _naive_int4_asym(tmp_path / "ok", None, None))[0] == 0
    code, report = run_json(capsys, "verify", _naive_int4_asym(tmp_path / "zp", None, 9))
    assert code == 1
    (finding,) = report["findings"]
    assert (finding["check"], finding["tensor"]) == (
        "decode",
        "model.layers.0.mlp.up_proj.weight_zero_point",
    )
    assert "[-8, 7]" in finding["rule"] and finding["file"] == "model.safetensors"
    code, report = run_json(capsys, "verify", _naive_int4_asym(tmp_path / "q", 8, None))
    (finding,) = report["findings"]
    assert (code, finding["check"], finding["tensor"]) == (
        1,
        "decode",
        "model.layers.0.mlp.up_proj.weight",
    )


def _act_order(directory: Path, g_idx: torch.Tensor) -> Path:
    from ctref import QuantArgs, get_format, qmath

    args_dict = {**W4_GROUP, "actorder": "group"}
    args = QuantArgs.from_dict(args_dict, key="weights")
    weight = torch.randn(8, 32).bfloat16()
    stored = get_format("pack-quantized").encode(
        weight, args, qparams=qmath.qparams_for(weight, args, g_idx)
    )
    tensors = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in stored.items()}
    group = {"targets": ["re:.*up_proj$"], "weights": args_dict, "format": "pack-quantized"}
    write_checkpoint(directory, tensors, quant_config({"g": group}, version="0.12.2"))
    return directory


def test_verify_g_idx_must_give_each_group_group_size_columns(tmp_path, capsys) -> None:
    balanced = torch.arange(32, dtype=torch.int32).flip(0) % 2
    assert run(capsys, "verify", _act_order(tmp_path / "ok", balanced))[0] == 0
    lopsided = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)
    code, report = run_json(capsys, "verify", _act_order(tmp_path / "bad", lopsided))
    (finding,) = report["findings"]
    assert (code, finding["check"], finding["tensor"]) == (
        1,
        "decode",
        "model.layers.0.mlp.up_proj.weight_g_idx",
    )
    assert "group 0" in finding["rule"] and "20" in finding["rule"]


def test_verify_lists_every_index_disagreement(model, capsys) -> None:
    index_path = model / INDEX_FILE
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    moved = "model.layers.0.mlp.up_proj.weight_scale"
    wrong_file = next(f for f in set(weight_map.values()) if f != weight_map[moved])
    weight_map[moved] = wrong_file
    weight_map["model.ghost.weight"] = wrong_file
    del weight_map["lm_head.weight"]
    index_path.write_text(json.dumps(index))
    code, report = run_json(capsys, "verify", model)
    assert code == 1
    assert {f["tensor"] for f in report["findings"]} == {
        moved,
        "model.ghost.weight",
        "lm_head.weight",
    }
    assert all(f["check"] == "index" for f in report["findings"])


def test_verify_text_lines_name_file_tensor_and_rule(tmp_path, capsys) -> None:
    tensors = model_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    directory = write_model(tmp_path / "m", tensors)
    code, out, err = run(capsys, "verify", directory)
    assert code == 1
    (line,) = out.splitlines()
    file = shard_of(directory, "model.layers.0.mlp.up_proj.weight_packed")
    assert line.startswith(f"error: {file}: model.layers.0.mlp.up_proj.weight_scale: ")
    assert line.endswith("[missing]")
    assert "1 error" in err


# ---------------------------------------------------------------------------------------------
# dequant


def _load_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def test_dequant_writes_a_dense_checkpoint_equal_to_the_reader(model, tmp_path, capsys) -> None:
    out = tmp_path / "dense"
    code, stdout, err = run(capsys, "dequant", model, out)
    assert code == 0 and stdout == ""
    assert "ctref dequant:" in err and err.count("\n") == 1
    dense = _load_dir(out)
    with open_checkpoint(model) as checkpoint:
        infos = checkpoint.modules()
        split = [
            info.name
            for info in infos
            if len({checkpoint.header(n).file for n in info.tensor_names}) > 1
        ]
        assert split, "the fixture must have a module spread over two shards"
        for info in infos:
            expected = checkpoint.dequantize(info.name)
            if info.format != "dense":
                expected = expected.to(torch.bfloat16)
            got = dense[f"{info.name}.weight"]
            assert got.dtype == expected.dtype and torch.equal(got, expected), info.name
            assert shard_of(out, f"{info.name}.weight") == info.file
        for name in checkpoint.tensor_names():
            if name.endswith(".bias"):
                assert torch.equal(dense[name], checkpoint.read(name))
    assert not any(name.endswith(("_scale", "_packed", "_shape", "zero_point")) for name in dense)
    assert len(dense) == 3 + LAYERS * (2 + len(SHAPES) + 4)


def test_dequant_keeps_shard_names_and_a_consistent_index(model, tmp_path, capsys) -> None:
    out = tmp_path / "dense"
    assert run(capsys, "dequant", model, out)[0] == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in model.glob("*.safetensors")
    )
    index = json.loads((out / INDEX_FILE).read_text())
    facts = header_facts(out)
    assert index["weight_map"] == {name: file for name, (_, _, file) in facts.items()}
    assert index["metadata"]["total_size"] == data_bytes(out)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((model / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {k: v for k, v in source_config.items() if k != "quantization_config"}
    for small in ("generation_config.json", "tokenizer.json"):
        assert (out / small).read_bytes() == (model / small).read_bytes()
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("dtype", ["keep", "fp32"])
def test_dequant_dtype_option(model, tmp_path, capsys, dtype) -> None:
    out = tmp_path / dtype
    assert run(capsys, "dequant", model, out, "--dtype", dtype)[0] == 0
    dense = _load_dir(out)
    with open_checkpoint(model) as checkpoint:
        for info in checkpoint.modules():
            expected = checkpoint.dequantize(info.name)
            if dtype == "fp32" and info.format != "dense":
                expected = expected.to(torch.float32)
            got = dense[f"{info.name}.weight"]
            assert got.dtype == expected.dtype and torch.equal(got, expected), info.name


def test_dequant_single_file_checkpoint_has_no_index(tmp_path, capsys) -> None:
    source = write_model(tmp_path / "one", shards=1)
    out = tmp_path / "dense"
    assert run(capsys, "dequant", source, out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_dequant_output_loads_in_transformers(model, tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers", reason="loading check needs transformers")
    out = tmp_path / "dense"
    assert run(capsys, "dequant", model, out)[0] == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    state = loaded.state_dict()
    dense = _load_dir(out)
    assert set(state) == set(dense)
    for name, tensor in dense.items():
        assert torch.equal(state[name], tensor), name


def test_dequant_refuses_a_non_empty_output_and_the_input_itself(model, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    code, _, err = run(capsys, "dequant", model, out)
    assert code == 2 and "not an empty directory" in err
    code, _, err = run(capsys, "dequant", model, model)
    assert code == 2 and "input directory" in err


def test_dequant_failing_module_leaves_no_shard_behind(tmp_path, capsys) -> None:
    tensors = model_tensors()
    tensors["model.layers.1.mlp.down_proj.weight_global_scale"] = torch.tensor([0.0])
    source = write_model(tmp_path / "m", tensors)
    out = tmp_path / "dense"
    code, _, err = run(capsys, "dequant", source, out)
    assert code == 2
    assert "model.layers.1.mlp.down_proj.weight_global_scale" in err and err.count("\n") == 1
    assert not list(out.glob("*.safetensors*")), "no shard, whole or partial, is left behind"


@pytest.mark.gpu
def test_dequant_on_cuda_equals_cpu(model, tmp_path, capsys) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert run(capsys, "dequant", model, tmp_path / "cpu")[0] == 0
    assert run(capsys, "dequant", model, tmp_path / "cuda", "--device", "cuda")[0] == 0
    cpu, cuda = _load_dir(tmp_path / "cpu"), _load_dir(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    assert all(torch.equal(cpu[name], cuda[name]) for name in cpu)


def test_streaming_writer_places_tensors_in_write_order(tmp_path) -> None:
    """Tensors land in write order, the header (written last) pads to its reserved room."""
    tensors = {
        "b.float": torch.arange(5, dtype=torch.float32),
        "a.half": torch.arange(3, dtype=torch.bfloat16),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [(name, tuple(t.shape)) for name, t in tensors.items()])
    for name, tensor in tensors.items():
        writer.write_tensor(name, tensor)
    writer.close()
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    assert header["b.float"]["data_offsets"] == [0, 20]
    assert header["a.half"]["data_offsets"] == [20, 26]
    reference = tmp_path / "ref.safetensors"
    save_file(tensors, str(reference))
    assert path.stat().st_size - header_length == reference.stat().st_size - int.from_bytes(
        reference.read_bytes()[:8], "little"
    )
