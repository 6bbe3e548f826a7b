"""The lazy checkpoint reader: opening, module resolution, dequantization and its errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import INDEX_FILE, encode, quant_config, write_checkpoint

import ctref
import ctref.checkpoint
from ctref import CTRefError, QuantArgs, get_format, open_checkpoint
from ctref.presets import PRESET_SCHEMES

HIDDEN, KV, FFN, VOCAB = 32, 16, 64, 48
W4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
W3_GROUP = {**W4_GROUP, "num_bits": 3}
W8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
FP8_TOKEN = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
}

ATTENTION = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
}
MLP = {"gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}


def _weights(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense bf16 weights of a tiny Llama-like model, by module name."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    weights = {
        "model.embed_tokens": rand(VOCAB, HIDDEN),
        "lm_head": rand(VOCAB, HIDDEN),
        "model.norm": rand(HIDDEN),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm"] = rand(HIDDEN)
        for name, shape in ATTENTION.items():
            weights[f"{prefix}.self_attn.{name}"] = rand(*shape)
        for name, shape in MLP.items():
            weights[f"{prefix}.mlp.{name}"] = rand(*shape)
    return weights


Plan = Callable[[str], tuple[str, dict[str, Any] | None]]
"""Picks the (format, args) a module is encoded with, by its name."""


def _encode_model(
    weights: dict[str, torch.Tensor], plan: Plan, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Encode every module with the (format, args) ``plan`` picks for its name."""
    tensors = {}
    for module, weight in weights.items():
        fmt, args = plan(module)
        tensors.update(encode(module, weight, fmt, args, **kwargs))
    return tensors


def _round_trip(
    weight: torch.Tensor, fmt: str, args: dict[str, Any], layout: str = "dense"
) -> torch.Tensor:
    quant_args = QuantArgs.from_dict(args, key="weights")
    form = get_format(fmt)
    return form.decode(form.encode(weight, quant_args, layout=layout), quant_args, layout=layout)


def _is_projection(module: str) -> bool:
    return module.endswith("_proj")


def _projections_in(fmt: str, args: dict[str, Any]) -> Plan:
    """Every ``*_proj`` module in ``fmt`` with ``args``, everything else dense."""
    return lambda module: (fmt, args) if _is_projection(module) else ("dense", None)


def _linear_config(fmt: str, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One group quantizing every Linear but ``lm_head`` in ``fmt`` with ``args``."""
    group = {"targets": ["Linear"], "weights": args, "format": fmt}
    return quant_config({"group_0": group}, ignore=["lm_head"], **extra)


_w4a16_plan = _projections_in("pack-quantized", W4_GROUP)


def _w4a16_config() -> dict[str, Any]:
    return _linear_config("pack-quantized", W4_GROUP, format="pack-quantized")


@pytest.fixture
def w4a16_sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = _weights()
    write_checkpoint(tmp_path, _encode_model(weights, _w4a16_plan), _w4a16_config(), shards=3)
    return tmp_path, weights


def _error(path: Path, action: Callable[[ctref.Checkpoint], Any] | None = None) -> str:
    """The message of the CTRefError that opening (and then ``action``) raises."""
    with pytest.raises(CTRefError) as caught:
        with open_checkpoint(path) as checkpoint:
            if action is not None:
                action(checkpoint)
    return str(caught.value)


def _file_of(path: Path, tensor: str) -> str:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"][tensor]


# ---------------------------------------------------------------------------------------------
# Opening and module resolution


def test_sharded_checkpoint_lists_modules_with_group_format_and_shape(w4a16_sharded) -> None:
    path, weights = w4a16_sharded
    with open_checkpoint(path) as checkpoint:
        infos = {info.name: info for info in checkpoint.modules()}
        assert set(infos) == set(weights)
        q_proj = infos["model.layers.0.self_attn.q_proj"]
        assert (q_proj.group, q_proj.format, q_proj.weight_shape) == (
            "group_0",
            "pack-quantized",
            (HIDDEN, HIDDEN),
        )
        assert q_proj.scheme.weights.num_bits == 4
        assert set(q_proj.tensor_names) == {
            f"model.layers.0.self_attn.q_proj.{local}"
            for local in ("weight_packed", "weight_shape", "weight_scale")
        }
        assert q_proj.file == _file_of(path, "model.layers.0.self_attn.q_proj.weight_packed")
        assert infos["model.layers.0.mlp.down_proj"].weight_shape == (HIDDEN, FFN)
        for unquantized in (
            "lm_head",
            "model.embed_tokens",
            "model.norm",
            "model.layers.1.input_layernorm",
        ):
            assert (
                infos[unquantized].scheme,
                infos[unquantized].group,
                infos[unquantized].format,
            ) == (None, None, "dense")
        assert [info.name for info in checkpoint.modules()][:3] == [
            "lm_head",
            "model.embed_tokens",
            "model.layers.0.input_layernorm",
        ]


def test_dequantize_equals_the_encoder_round_trip_bit_for_bit(w4a16_sharded) -> None:
    path, weights = w4a16_sharded
    with open_checkpoint(path) as checkpoint:
        for module in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
            got = checkpoint.dequantize(module)
            expected = _round_trip(weights[module], "pack-quantized", W4_GROUP)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, expected)
            assert not torch.equal(got, weights[module]), "4-bit quantization must lose something"


def test_unquantized_and_ignored_modules_come_back_unchanged(w4a16_sharded) -> None:
    path, weights = w4a16_sharded
    with open_checkpoint(path) as checkpoint:
        for module in ("lm_head", "model.embed_tokens", "model.norm"):
            got = checkpoint.dequantize(module)
            assert got.dtype == weights[module].dtype
            assert torch.equal(got, weights[module])


def test_unsharded_single_file_and_iter_dequantized(tmp_path: Path) -> None:
    weights = _weights(layers=1)
    write_checkpoint(tmp_path, _encode_model(weights, _w4a16_plan), _w4a16_config())
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    with open_checkpoint(tmp_path) as checkpoint:
        seen = dict(checkpoint.iter_dequantized())
        assert set(seen) == set(weights)
        for module, weight in weights.items():
            expected = (
                _round_trip(weight, "pack-quantized", W4_GROUP)
                if _is_projection(module)
                else weight
            )
            assert torch.equal(seen[module], expected), module


def test_int8_channel_dequantizes_as_fp32_product_rounded_once(tmp_path: Path) -> None:
    """An oracle independent of qmath (§2.3): bf16(float32(q) * float32(scale))."""
    weights = _weights(layers=1)
    tensors = _encode_model(weights, _projections_in("naive-quantized", W8_CHANNEL))
    write_checkpoint(tmp_path, tensors, _linear_config("naive-quantized", W8_CHANNEL))
    module = "model.layers.0.mlp.up_proj"
    codes, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
    expected = (codes.to(torch.float32) * scale.to(torch.float32)).to(torch.bfloat16)
    with open_checkpoint(tmp_path) as checkpoint:
        assert torch.equal(checkpoint.dequantize(module), expected)


def test_read_module_tensors_and_tensor_names(w4a16_sharded) -> None:
    path, weights = w4a16_sharded
    module = "model.layers.1.self_attn.v_proj"
    with open_checkpoint(path) as checkpoint:
        names = checkpoint.tensor_names()
        assert f"{module}.weight_packed" in names and "lm_head.weight" in names
        assert names.index("model.layers.1.mlp.up_proj.weight_packed") < names.index(
            "model.layers.1.self_attn.k_proj.weight_packed"
        )
        local = checkpoint.module_tensors(module)
        assert set(local) == {"weight_packed", "weight_shape", "weight_scale"}
        assert local["weight_shape"].tolist() == [KV, HIDDEN]
        assert torch.equal(checkpoint.read("lm_head.weight"), weights["lm_head"])
        with pytest.raises(CTRefError, match="no tensor of this name"):
            checkpoint.read("lm_head.nothing")
        with pytest.raises(CTRefError, match="no weight-bearing module"):
            checkpoint.dequantize("model.layers.0.self_attn")


def test_regex_targets_and_ignore(tmp_path: Path) -> None:
    weights = _weights(layers=1)

    def plan(module: str) -> tuple[str, dict[str, Any] | None]:
        quantized = ".mlp." in module and not module.endswith("down_proj")
        return ("pack-quantized", W4_GROUP) if quantized else ("dense", None)

    group = {"targets": [r"re:.*mlp\..*_proj$"], "weights": W4_GROUP, "format": "pack-quantized"}
    config = quant_config({"group_0": group}, ignore=["re:.*down_proj$"])
    write_checkpoint(tmp_path, _encode_model(weights, plan), config, shards=2)
    with open_checkpoint(tmp_path) as checkpoint:
        formats = {info.name: info.format for info in checkpoint.modules()}
        assert formats["model.layers.0.mlp.gate_proj"] == "pack-quantized"
        assert formats["model.layers.0.mlp.down_proj"] == "dense"
        assert formats["model.layers.0.self_attn.q_proj"] == "dense"
        down = "model.layers.0.mlp.down_proj"
        assert torch.equal(checkpoint.dequantize(down), weights[down])


def test_mixed_precision_two_groups_two_formats(tmp_path: Path) -> None:
    weights = _weights(layers=1)

    def plan(module: str) -> tuple[str, dict[str, Any] | None]:
        if ".self_attn." in module:
            return "float-quantized", FP8_CHANNEL
        return ("pack-quantized", W4_GROUP) if ".mlp." in module else ("dense", None)

    groups = {
        "group_0": {
            "targets": ["re:.*self_attn.*"],
            "weights": FP8_CHANNEL,
            "input_activations": FP8_TOKEN,
            "format": "float-quantized",
        },
        "group_1": {"targets": ["re:.*mlp.*"], "weights": W4_GROUP, "format": "pack-quantized"},
    }
    write_checkpoint(tmp_path, _encode_model(weights, plan), quant_config(groups), shards=2)
    with open_checkpoint(tmp_path) as checkpoint:
        attention = checkpoint.module_info("model.layers.0.self_attn.o_proj")
        mlp = checkpoint.module_info("model.layers.0.mlp.gate_proj")
        assert (attention.group, attention.format) == ("group_0", "float-quantized")
        assert (mlp.group, mlp.format) == ("group_1", "pack-quantized")
        for module, fmt, args in (
            ("model.layers.0.self_attn.o_proj", "float-quantized", FP8_CHANNEL),
            ("model.layers.0.mlp.gate_proj", "pack-quantized", W4_GROUP),
        ):
            assert torch.equal(
                checkpoint.dequantize(module), _round_trip(weights[module], fmt, args)
            )


def test_class_targets_model_free_and_overridden_by_module_classes(tmp_path: Path) -> None:
    """``Linear`` claims projections and lm_head, not embeddings or norms; ``Embedding`` claims
    ``embed_tokens`` by name, unless the caller's real class names say otherwise."""
    weights = _weights(layers=1)

    def plan(module: str) -> tuple[str, dict[str, Any] | None]:
        if module == "model.embed_tokens":
            return "naive-quantized", W8_CHANNEL
        return (
            ("pack-quantized", W4_GROUP)
            if _is_projection(module) or module == "lm_head"
            else ("dense", None)
        )

    groups = {
        "group_0": {"targets": ["Linear"], "weights": W4_GROUP, "format": "pack-quantized"},
        "group_1": {"targets": ["Embedding"], "weights": W8_CHANNEL, "format": "naive-quantized"},
    }
    write_checkpoint(tmp_path, _encode_model(weights, plan), quant_config(groups))
    with open_checkpoint(tmp_path) as checkpoint:
        groups_by_module = {info.name: info.group for info in checkpoint.modules()}
        assert groups_by_module["lm_head"] == "group_0"
        assert groups_by_module["model.layers.0.self_attn.q_proj"] == "group_0"
        assert groups_by_module["model.embed_tokens"] == "group_1"
        assert groups_by_module["model.norm"] is None
        assert groups_by_module["model.layers.0.input_layernorm"] is None
    classes = {"model.embed_tokens": ("TiedEmbeddingTable", "Module")}
    with open_checkpoint(tmp_path, module_classes=classes) as checkpoint:
        with pytest.raises(CTRefError) as caught:
            checkpoint.module_info("model.embed_tokens")
    assert "model.embed_tokens.weight" in str(caught.value)
    assert "unquantized" in str(caught.value)


def test_a_guessed_class_yields_to_a_float_weight_but_a_real_one_does_not(tmp_path: Path) -> None:
    """A MoE router (not a Linear, not ignored) stored in bf16: the model-free ``Linear`` guess
    must not turn it into a format error; the caller's real class names must."""
    weights = _weights(layers=1)
    router = "model.layers.0.mlp.gate"
    weights[router] = torch.randn(4, HIDDEN).to(torch.bfloat16)
    plan = lambda m: _w4a16_plan(m) if m != router else ("dense", None)  # noqa: E731
    write_checkpoint(tmp_path, _encode_model(weights, plan), _w4a16_config())
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.module_info(router).group is None
        assert torch.equal(checkpoint.dequantize(router), weights[router])
    with open_checkpoint(tmp_path, module_classes={router: ("Linear", "Module")}) as checkpoint:
        with pytest.raises(
            CTRefError,
            match=rf"{router}\.weight: config group 'group_0' resolves to format 'pack-quantized'",
        ):
            checkpoint.module_info(router)


# ---------------------------------------------------------------------------------------------
# Format cross-check and packing layout


def test_config_format_disagreeing_with_stored_root_names_the_tensor(tmp_path: Path) -> None:
    weights = _weights(layers=1)
    plan = _projections_in("float-quantized", FP8_CHANNEL)
    write_checkpoint(tmp_path, _encode_model(weights, plan), _w4a16_config())
    message = _error(tmp_path, lambda c: c.modules())
    assert "model.safetensors" in message
    assert "model.layers.0.mlp.down_proj.weight:" in message
    assert "pack-quantized" in message and "weight_packed" in message and "float8_e4m3fn" in message


@pytest.mark.parametrize(
    "args", [W4_GROUP, PRESET_SCHEMES["NVFP4A16"]["weights"]], ids=["int4", "nvfp4"]
)
def test_ignored_module_storing_packed_weights_is_refused(
    tmp_path: Path, args: dict[str, Any]
) -> None:
    """Refused before the weight shape is derived (nvfp4 stores no weight_shape)."""
    weights = _weights(layers=1)
    fmt = "pack-quantized" if args["type"] == "int" else "nvfp4-pack-quantized"
    plan = _projections_in(fmt, args)
    config = quant_config(
        {"group_0": {"targets": ["Linear"], "weights": args}}, ignore=["lm_head", "re:.*q_proj$"]
    )
    write_checkpoint(tmp_path, _encode_model(weights, plan), config)
    message = _error(tmp_path, lambda c: c.module_info("model.layers.0.self_attn.q_proj"))
    assert message.startswith("model.safetensors: model.layers.0.self_attn.q_proj.weight_packed: ")
    assert "unquantized" in message and "stores 'weight' as bfloat16" in message


@pytest.mark.parametrize("version", [None, "unknown-build"])
def test_unknown_version_refuses_layout_sensitive_bit_widths(
    tmp_path: Path, version: str | None
) -> None:
    weights = _weights(layers=1)
    write_checkpoint(
        tmp_path,
        _encode_model(weights, _projections_in("pack-quantized", W3_GROUP)),
        _linear_config("pack-quantized", W3_GROUP, version=version),
    )
    message = _error(tmp_path, lambda c: c.dequantize("model.layers.0.mlp.up_proj"))
    assert "config.json" in message and "model.layers.0.mlp.up_proj.weight_packed" in message
    assert 'set "version"' in message


def test_unknown_version_still_reads_layout_independent_bit_widths(tmp_path: Path) -> None:
    weights = _weights(layers=1)
    config = _w4a16_config()
    del config["version"]
    write_checkpoint(tmp_path, _encode_model(weights, _w4a16_plan), config)
    module = "model.layers.0.mlp.up_proj"
    with open_checkpoint(tmp_path) as checkpoint:
        assert torch.equal(
            checkpoint.dequantize(module), _round_trip(weights[module], "pack-quantized", W4_GROUP)
        )


def test_version_selects_the_legacy_sub_byte_layout(tmp_path: Path) -> None:
    """3-bit words written by 0.17 (whole fields per word) decode only as the legacy layout."""
    weights = _weights(layers=1)
    tensors = _encode_model(weights, _projections_in("pack-quantized", W3_GROUP), layout="legacy")
    module = "model.layers.0.self_attn.q_proj"
    legacy = write_checkpoint(
        tmp_path / "legacy", tensors, _linear_config("pack-quantized", W3_GROUP, version="0.17.1")
    )
    with open_checkpoint(legacy) as checkpoint:
        expected = _round_trip(weights[module], "pack-quantized", W3_GROUP, layout="legacy")
        assert torch.equal(checkpoint.dequantize(module), expected)
    dense = write_checkpoint(
        tmp_path / "dense", tensors, _linear_config("pack-quantized", W3_GROUP, version="0.18.0")
    )
    message = _error(dense, lambda c: c.dequantize(module))
    assert f"{module}.weight_packed" in message and "dense layout" in message


# ---------------------------------------------------------------------------------------------
# Bad tensors: every error names the file, the full tensor name and the rule


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(name)


def _set(
    name: str, make: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = make(tensors[name])

    return mutate


def _nan_first(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.clone()
    scale[0, 0] = float("nan")
    return scale


def _g_idx_out_of_range(_: torch.Tensor) -> torch.Tensor:
    g_idx = (torch.arange(HIDDEN) // W4_GROUP["group_size"]).to(torch.int32)
    g_idx[5] = 99
    return g_idx


MODULE = "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize(
    ("mutate", "tensor", "rule"),
    [
        pytest.param(
            _drop(f"{MODULE}.weight_scale"),
            "weight_scale",
            "required tensor is missing",
            id="missing-scale",
        ),
        pytest.param(
            _set(f"{MODULE}.weight_scale", lambda s: s.to(torch.int32)),
            "weight_scale",
            "expected dtype",
            id="scale-dtype",
        ),
        pytest.param(
            _set(f"{MODULE}.weight_scale", lambda s: s[:, :1]),
            "weight_scale",
            "expected shape (64, 2) for strategy 'group'",
            id="scale-shape",
        ),
        pytest.param(
            _set(f"{MODULE}.weight_shape", lambda _: torch.tensor([FFN, 48])),
            "weight_packed",
            "take 6 int32 words",
            id="packed-width",
        ),
        pytest.param(
            _set(f"{MODULE}.weight_scale", _nan_first), "weight_scale", "NaN", id="nan-scale"
        ),
        pytest.param(
            _set(f"{MODULE}.weight_packed", lambda p: p.to(torch.int16)),
            "weight_packed",
            "stores 'weight_packed' as int32; this module stores 'weight_packed' as int16",
            id="packed-dtype",
        ),
    ],
)
def test_bad_tensors_raise_with_file_tensor_and_rule(
    tmp_path: Path, mutate, tensor: str, rule: str
) -> None:
    tensors = _encode_model(_weights(layers=1), _w4a16_plan)
    mutate(tensors)
    write_checkpoint(tmp_path, tensors, _w4a16_config(), shards=2)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    file = weight_map.get(f"{MODULE}.{tensor}", weight_map[f"{MODULE}.weight_packed"])
    message = _error(tmp_path, lambda c: c.dequantize(MODULE))
    assert message.startswith(f"{file}: {MODULE}.{tensor}: "), message
    assert rule in message


def test_g_idx_out_of_range_is_refused(tmp_path: Path) -> None:
    args = {**W4_GROUP, "actorder": "group"}
    tensors = _encode_model(_weights(layers=1), _w4a16_plan)
    tensors[f"{MODULE}.weight_g_idx"] = _g_idx_out_of_range(tensors[f"{MODULE}.weight_scale"])
    write_checkpoint(tmp_path, tensors, _linear_config("pack-quantized", args, version="0.14.0"))
    message = _error(tmp_path, lambda c: c.dequantize(MODULE))
    assert message.startswith(f"model.safetensors: {MODULE}.weight_g_idx: ")
    assert "group indices must lie in [0, 1], found [0, 99]" in message


# ---------------------------------------------------------------------------------------------
# Directory-level errors


def _edit_index(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    index = json.loads((path / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(index))


def test_index_listing_a_tensor_its_shard_lacks(w4a16_sharded) -> None:
    path, _ = w4a16_sharded
    shard = _file_of(path, "lm_head.weight")
    _edit_index(path, lambda weight_map: weight_map.update({"model.ghost.weight": shard}))
    message = _error(path)
    assert message.startswith(f"{shard}: model.ghost.weight: ")
    assert "not stored in this file" in message


def test_shard_tensor_missing_from_the_index(w4a16_sharded) -> None:
    path, _ = w4a16_sharded
    shard = _file_of(path, "model.norm.weight")
    _edit_index(path, lambda weight_map: weight_map.pop("model.norm.weight"))
    message = _error(path)
    assert message.startswith(f"{shard}: model.norm.weight: ") and "not listed in" in message


def test_index_mapping_a_tensor_to_the_wrong_shard(w4a16_sharded) -> None:
    path, _ = w4a16_sharded
    actual = _file_of(path, "lm_head.weight")
    other = next(f for f in sorted({p.name for p in path.glob("*.safetensors")}) if f != actual)
    _edit_index(path, lambda weight_map: weight_map.update({"lm_head.weight": other}))
    message = _error(path)
    assert message.startswith(f"{actual}: lm_head.weight: ") and f"maps it to {other}" in message


def test_index_naming_a_missing_shard(w4a16_sharded) -> None:
    path, _ = w4a16_sharded
    _edit_index(
        path, lambda weight_map: weight_map.update({"lm_head.weight": "model-gone.safetensors"})
    )
    message = _error(path)
    assert message.startswith(f"{INDEX_FILE}: lm_head.weight: ") and "does not exist" in message


def test_tensor_in_two_shards_without_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    write_checkpoint(tmp_path, {"a.weight": torch.ones(2, 2)}, _w4a16_config())
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "extra.safetensors"))
    message = _error(tmp_path)
    assert "a.weight" in message and "also stored in" in message


def test_bin_only_directory_is_refused_without_unpickling(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a.weight": torch.ones(2)}, _w4a16_config())
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: unpickling would fail differently")
    message = _error(tmp_path)
    assert message.startswith("pytorch_model.bin: ") and "never unpickles" in message


def test_config_without_quantization_config(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a.weight": torch.ones(2)}, None)
    message = _error(tmp_path)
    assert "config.json" in message and "quantization_config" in message


def test_directory_without_config_json(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a.weight": torch.ones(2)}, _w4a16_config())
    (tmp_path / "config.json").unlink()
    message = _error(tmp_path)
    assert "config.json" in message and "not found" in message


# ---------------------------------------------------------------------------------------------
# Laziness, devices, sparsity


class _CountingHandle:
    """Wraps a safetensors handle and records which tensors were read."""

    def __init__(self, handle: Any, file: str, reads: list[tuple[str, str]]) -> None:
        self._handle, self._file, self._reads = handle, file, reads

    def get_tensor(self, name: str) -> torch.Tensor:
        self._reads.append((self._file, name))
        return self._handle.get_tensor(name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._handle, attribute)


def test_dequantizing_one_module_reads_only_its_tensors(w4a16_sharded, monkeypatch) -> None:
    path, _ = w4a16_sharded
    reads: list[tuple[str, str]] = []
    real_safe_open = ctref.checkpoint.safe_open

    def counting_safe_open(filename: str, **kwargs: Any) -> _CountingHandle:
        return _CountingHandle(real_safe_open(filename, **kwargs), Path(filename).name, reads)

    monkeypatch.setattr(ctref.checkpoint, "safe_open", counting_safe_open)
    module = "model.layers.1.mlp.up_proj"
    with open_checkpoint(path) as checkpoint:
        assert reads == [], "opening must read headers only"
        checkpoint.dequantize(module)
    assert {name for _, name in reads} == {
        f"{module}.{local}" for local in ("weight_packed", "weight_shape", "weight_scale")
    }
    shards = {p.name for p in path.glob("*.safetensors")}
    own = {_file_of(path, name) for _, name in reads}
    assert len(shards - own) >= 1, "the test needs a shard the module does not live in"


@pytest.mark.gpu
def test_dequantize_on_cuda_matches_cpu(w4a16_sharded) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    path, _ = w4a16_sharded
    with open_checkpoint(path) as checkpoint:
        for module in ("model.layers.0.mlp.down_proj", "lm_head"):
            on_gpu = checkpoint.dequantize(module, device="cuda")
            assert on_gpu.device.type == "cuda"
            assert torch.equal(on_gpu.cpu(), checkpoint.dequantize(module))


def _sparse_fp8_checkpoint(
    path: Path, sparsity_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FP8 channel weights stored as sparse-bitmask codes; returns (dense codes, tensors)."""
    weights = _weights(layers=1)
    tensors, codes = {}, {}
    for module, weight in weights.items():
        if not _is_projection(module):
            tensors.update(encode(module, weight, "dense", None))
            continue
        weight = weight * (torch.arange(weight.shape[1]) % 3 != 0)  # unstructured zeros
        quantized = encode(module, weight, "float-quantized", FP8_CHANNEL)
        codes[module] = quantized.pop(f"{module}.weight")
        tensors.update(quantized)
        tensors.update(encode(module, codes[module], "sparse-bitmask", None))
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": FP8_CHANNEL,
            "input_activations": FP8_TOKEN,
            "format": "float-quantized",
        }
    }
    config = quant_config(
        groups, ignore=["lm_head"], version="0.14.0", sparsity_config=sparsity_config
    )
    write_checkpoint(path, tensors, config, shards=2)
    return codes, tensors


def test_sparse_bitmask_is_decoded_before_quantization(tmp_path: Path) -> None:
    sparsity = {
        "format": "sparse-bitmask",
        "targets": ["Linear"],
        "ignore": ["lm_head"],
        "global_sparsity": 0.3,
        "sparsity_structure": "unstructured",
    }
    codes, tensors = _sparse_fp8_checkpoint(tmp_path, sparsity)
    module = "model.layers.0.self_attn.q_proj"
    args = QuantArgs.from_dict(FP8_CHANNEL, key="weights")
    expected = get_format("float-quantized").decode(
        {"weight": codes[module], "weight_scale": tensors[f"{module}.weight_scale"]},
        args,
        layout="dense",
    )
    with open_checkpoint(tmp_path) as checkpoint:
        info = checkpoint.module_info(module)
        assert (info.sparsity_format, info.format, info.weight_shape) == (
            "sparse-bitmask",
            "float-quantized",
            (HIDDEN, HIDDEN),
        )
        assert torch.equal(checkpoint.dequantize(module), expected)


def test_sparse_tensors_without_sparsity_config_are_refused(tmp_path: Path) -> None:
    _sparse_fp8_checkpoint(tmp_path, {})
    message = _error(tmp_path, lambda c: c.module_info("model.layers.0.self_attn.q_proj"))
    assert "model.layers.0.self_attn.q_proj.compressed" in message and "sparsity_config" in message


def test_marlin24_module_is_resolved_from_meta_and_decoded(tmp_path: Path) -> None:
    """marlin-24 stores no weight_shape: N and K come from ``meta`` (K/32, 2N); its writer
    dropped every activation scale, so none is expected."""
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
    module, rows, cols = "model.layers.0.mlp.up_proj", 64, 64
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    weight = (weight * (torch.arange(cols) % 4 < 2)).to(torch.float16)  # 2:4 sparse
    group = {"targets": ["Linear"], "weights": args, "format": "marlin-24"}
    sparsity = {"format": "dense", "sparsity_structure": "2:4"}
    config = quant_config({"group_0": group}, version="0.12.2", sparsity_config=sparsity)
    write_checkpoint(tmp_path, encode(module, weight, "marlin-24", args), config)
    with open_checkpoint(tmp_path) as checkpoint:
        info = checkpoint.module_info(module)
        assert (info.format, info.weight_shape) == ("marlin-24", (rows, cols))
        assert torch.equal(checkpoint.dequantize(module), _round_trip(weight, "marlin-24", args))
        assert dict(checkpoint.activation_params(module).missing) == {}


def test_public_api() -> None:
    assert ctref.__version__ == "0.1.0"
    for name in (
        "open_checkpoint",
        "Checkpoint",
        "ModuleInfo",
        "CTRefError",
        "QuantizationConfig",
        "QuantArgs",
        "QuantScheme",
        "get_format",
        "format_names",
    ):
        assert name in ctref.__all__ and hasattr(ctref, name)
    assert "pack-quantized" in ctref.format_names()


def test_effective_weight_folds_the_stored_online_input_transform(tmp_path: Path) -> None:
    """An online ``input`` Hadamard stored beside the layer: W_eff = W @ Tᵀ, reported as applied."""
    from ctref.transforms import hadamard_matrix

    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    tensors = {
        "model.layers.0.mlp.down_proj.weight": weight,
        "model.layers.0.mlp.down_proj.v_input.weight": hadamard_matrix(16, torch.float32),
    }
    transform_config = {
        "config_groups": {
            "v": {"type": "hadamard", "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}]}
        }
    }
    config = quant_config({}, transform_config=transform_config)
    with ctref.open_checkpoint(write_checkpoint(tmp_path / "t", tensors, config)) as checkpoint:
        effective, applied = checkpoint.effective_weight("model.layers.0.mlp.down_proj")
    transform = hadamard_matrix(16, torch.float64) / 4.0
    assert [(record.scheme, record.location) for record in applied] == [("v", "input")]
    assert torch.allclose(effective, weight.double() @ transform.T, rtol=0, atol=1e-12)
    assert not torch.allclose(effective, weight.double())

    plain_config = quant_config({})
    with ctref.open_checkpoint(write_checkpoint(tmp_path / "p", tensors, plain_config)) as checkpoint:
        plain, none_applied = checkpoint.effective_weight("model.layers.0.mlp.down_proj")
    assert torch.equal(plain, weight) and none_applied == []


def test_regex_target_matching_a_norm_leaves_it_unquantized(tmp_path: Path) -> None:
    """``re:.*`` also matches norm modules; their 1-D weights are never quantized (§1.6)."""
    weight = torch.randn(16, 32, dtype=torch.bfloat16)
    norm = torch.ones(32, dtype=torch.bfloat16)
    args = {"num_bits": 8, "type": "int", "strategy": "channel"}
    tensors = {
        **encode("model.layers.0.mlp.down_proj", weight, "int-quantized", args),
        "model.layers.0.post_attention_layernorm.weight": norm,
    }
    config = quant_config(
        {"group_0": {"targets": ["re:.*"], "weights": args, "format": "int-quantized"}}
    )
    with ctref.open_checkpoint(write_checkpoint(tmp_path, tensors, config)) as checkpoint:
        infos = {info.name: info for info in checkpoint.modules()}
        norm_info = infos["model.layers.0.post_attention_layernorm"]
        assert norm_info.scheme is None and norm_info.format == "dense"
        assert infos["model.layers.0.mlp.down_proj"].format == "int-quantized"
        assert torch.equal(checkpoint.dequantize("model.layers.0.post_attention_layernorm"), norm)
