"""The fixture generator: deterministic bytes, a truthful manifest, the cache, level coverage,
the expected/ files, refusals, and the command line."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from catalog_helpers import CATALOG
from safetensors.torch import load_file

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError
from ctref.fixtures import generate as generate_module
from ctref.fixtures.catalog import DrawOptions, load_catalog
from ctref.fixtures.generate import MANIFEST, build_case, entry_hash, generate, main
from ctref.fixtures.weights import draw_quantized
from ctref.formats import base as formats_base
from ctref.forward import linear

SAMPLE = ["preset-nvfp4", "pack-w3-legacy-0-17-1", "moe-w4a16", "int8-static-tensor-asym"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_hashes_every_written_file(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    assert set(manifest["cases"]) == {c.name for c in CATALOG.cases if not c.unregistered_formats}
    written = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()} - {
        MANIFEST
    }
    listed = {path for record in manifest["cases"].values() for path in record["files"]}
    assert written == listed
    for record in manifest["cases"].values():
        for path, digest in record["files"].items():
            assert sha256(cache / path) == digest, path


def test_same_bytes_on_every_run_and_with_parallel_workers(tmp_path):
    """Two fresh generations, serial and with two worker processes, write identical files."""
    first = generate(tmp_path / "a", SAMPLE, log=io.StringIO())
    second = generate(tmp_path / "b", SAMPLE, jobs=2, log=io.StringIO())
    assert first["generated"] == second["generated"] == sorted(SAMPLE)
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()


def test_unchanged_cases_are_cached_and_changed_ones_regenerated(tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate(out, SAMPLE, log=io.StringIO())
    again = generate(out, SAMPLE, log=io.StringIO())
    assert again["generated"] == [] and again["cached"] == sorted(SAMPLE)
    changed = tmp_path / "catalog.toml"
    changed.write_text(
        CATALOG.path.read_text(encoding="utf-8").replace(
            'description = "Preset NVFP4 as 0.20.0 writes it', 'description = "Changed: NVFP4'
        ),
        encoding="utf-8",
    )
    third = generate(out, SAMPLE, catalog=load_catalog(changed), log=io.StringIO())
    assert third["generated"] == ["preset-nvfp4"]
    forced = generate(out, ["moe-w4a1?"], force=True, log=io.StringIO())
    assert forced["generated"] == ["moe-w4a16"]
    (out / "moe-w4a16" / "layer" / "model.safetensors").unlink()
    assert generate(out, ["moe-w4a16"], log=io.StringIO())["generated"] == ["moe-w4a16"]


def test_cache_key_follows_the_generator_version(monkeypatch):
    case = CATALOG.case("preset-w4a16")
    key = entry_hash(case)
    monkeypatch.setattr(generate_module, "GENERATOR_VERSION", "changed")
    assert entry_hash(case) != key


@pytest.mark.parametrize(
    ("fields", "count"),
    [
        ({"num_bits": 8, "type": "int", "strategy": "channel"}, 256),
        (
            {
                "num_bits": 3,
                "type": "int",
                "strategy": "group",
                "group_size": 32,
                "symmetric": False,
            },
            8,
        ),
        ({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [16, 32]}, 253),
        (
            {
                "num_bits": 4,
                "type": "float",
                "strategy": "tensor_group",
                "group_size": 16,
                "scale_dtype": "torch.float8_e4m3fn",
            },
            15,
        ),
        (
            {
                "num_bits": 6,
                "type": "float",
                "strategy": "group",
                "group_size": 32,
                "scale_dtype": "torch.uint8",
            },
            63,
        ),
    ],
    ids=["int8", "int3-asym", "fp8-block", "fp4", "fp6"],
)
def test_draws_hold_every_level_even_with_an_empty_group(fields, count):
    args = QuantArgs.from_dict(fields, key="weights")
    draw = draw_quantized(
        args,
        (37, 96),
        torch.bfloat16,
        torch.Generator().manual_seed(0),
        options=DrawOptions(zero_group=True),
    )
    levels = draw.levels.to(torch.float32).unique()
    assert levels.numel() == count
    # The empty group dequantizes to zeros, with the scale a writer stores for [0, 0].
    dense = draw.dequantized(args).to(torch.float32)
    scale = draw.qparams.scale.reshape(-1)[-1].to(torch.float32)
    assert scale > 0
    owner = torch.zeros_like(draw.qparams.scale, dtype=torch.float32)
    owner.reshape(-1)[-1] = 1
    view, mask = qmath.broadcast(owner, args, (37, 96))
    assert bool((dense.reshape(view)[(torch.broadcast_to(mask, view) == 1)] == 0).all())


def test_case_json_describes_the_files_and_has_no_tolerance(cache):
    for name in ("preset-nvfp4", "mixed-fp8-attn-nvfp4-mlp", "kv-cache-fp8"):
        for size in CATALOG.case(name).sizes:
            root = cache / name / size
            document = json.loads((root / "expected" / "case.json").read_text())
            assert "tolerance" not in document
            assert document["case"] == name and document["size"] == size
            for path, digest in document["sha256"].items():
                assert sha256(root / path) == digest
            dense = load_file(root / document["expected"]["dense"])
            outputs = load_file(root / document["expected"]["outputs"])
            inputs = load_file(root / document["expected"]["inputs"])
            for record in document["modules"].values():
                assert record["dense"]["tensor"] in dense
                assert record["output"] in outputs and record["input"] in inputs
                assert list(dense[record["dense"]["tensor"]].shape) == record["shape"]
    kv = json.loads((cache / "kv-cache-fp8" / "layer" / "expected" / "case.json").read_text())
    assert kv["attention"] == {
        "model.layers.0.self_attn": {
            "k_scale": "model.layers.0.self_attn.k_scale",
            "v_scale": "model.layers.0.self_attn.v_scale",
        }
    }


@pytest.mark.parametrize(
    "name", ["int8-static-tensor-asym", "preset-nvfp4", "preset-fp8-block", "int8-bias"]
)
def test_outputs_are_the_reference_linear_of_inputs_and_dense(cache, name):
    root = cache / name / "layer"
    document = json.loads((root / "expected" / "case.json").read_text())
    stored = load_file(root / "model.safetensors")
    dense = load_file(root / "expected" / "dense.safetensors")
    inputs = load_file(root / "expected" / "inputs.safetensors")
    outputs = load_file(root / "expected" / "outputs.safetensors")
    for module, record in document["modules"].items():
        args = record["input_activations"]
        params = {full.rpartition(".")[2]: stored[full] for full in record["input_params"].values()}
        y = linear(
            inputs[module],
            dense[record["dense"]["tensor"]],
            bias=dense.get(record["bias"]) if record["bias"] else None,
            input_args=None if args is None else QuantArgs.from_dict(args, key="input_activations"),
            input_params=params,
        )
        assert torch.equal(y, outputs[module]), module


def test_input_outliers_exceed_the_stored_static_scale(cache):
    root = cache / "int8-static-tensor-asym" / "layer"
    stored = load_file(root / "model.safetensors")
    inputs = load_file(root / "expected" / "inputs.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    scale, zero_point = (
        stored[f"{name}.input_scale"].float(),
        stored[f"{name}.input_zero_point"].float(),
    )
    codes = inputs[name].float() / scale + zero_point
    assert bool((codes[0].abs() > 127).any()) and bool((codes[1:] <= 127.5).all())


def test_unregistered_format_is_refused_naming_the_case(monkeypatch):
    monkeypatch.delitem(formats_base._REGISTRY, "mxfp6-pack-quantized")
    with pytest.raises(CTRefError) as raised:
        build_case(CATALOG.case("preset-mxfp6a16"))
    assert raised.value.key == "case.preset-mxfp6a16.format"
    assert "not registered" in raised.value.rule


def test_a_failing_case_is_reported_and_the_others_still_written(tmp_path, monkeypatch):
    monkeypatch.delitem(formats_base._REGISTRY, "mxfp6-pack-quantized")
    summary = generate(tmp_path, ["preset-mxfp6a16", "preset-w4a16"], log=io.StringIO())
    assert summary["generated"] == ["preset-w4a16"]
    assert "not registered" in summary["failed"]["preset-mxfp6a16"]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert list(manifest["cases"]) == ["preset-w4a16"]


def test_command_line_lists_generates_and_refuses(tmp_path, capsys):
    assert main(["--list", "--json", "--case", "preset-fp8*"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {row["name"] for row in listed} == {
        "preset-fp8",
        "preset-fp8-dynamic",
        "preset-fp8-block",
        "preset-fp8-fp16",
        "preset-fp8-block-fp16",
        "preset-fp8-dynamic-group-key",
    }
    assert main(["--out", str(tmp_path), "--case", "pack-w2-group-sym", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["generated"] == ["pack-w2-group-sym"]
    assert "[1/1] pack-w2-group-sym" in captured.err and "generated 1 case(s)" in captured.err
    assert main(["--out", str(tmp_path), "--case", "no-such-case"]) == 2
    assert "no case matches" in capsys.readouterr().err
