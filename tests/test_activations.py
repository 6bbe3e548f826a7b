"""Activation, attention and KV-cache parameters read from checkpoints (§4, §1.7), and biases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import encode, quant_config, write_checkpoint

from ctref import CTRefError, open_checkpoint
from ctref.presets import PRESET_SCHEMES

HIDDEN, KV = 32, 16
HEADS, KV_HEADS = 4, 2
PROJECTIONS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
}
ATTN = "model.layers.0.self_attn"
Q_PROJ = f"{ATTN}.q_proj"
FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
FP8_TENSOR_WEIGHTS = {**FP8, "strategy": "tensor"}
FP8_STATIC_INPUT = {**FP8, "strategy": "tensor", "dynamic": False}
BF16_ONE = torch.ones(1, dtype=torch.bfloat16)


def _projections(
    fmt: str = "float-quantized", args: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in PROJECTIONS.items():
        weight = torch.randn(*shape, generator=generator).to(torch.bfloat16)
        tensors.update(encode(f"{ATTN}.{name}", weight, fmt, args or FP8_TENSOR_WEIGHTS))
    return tensors


def _fp8_group(**extra: Any) -> dict[str, Any]:
    return {
        "targets": ["Linear"],
        "weights": FP8_TENSOR_WEIGHTS,
        "format": "float-quantized",
        **extra,
    }


def _write(
    path: Path, tensors: dict[str, torch.Tensor], groups: dict[str, Any], **config: Any
) -> Path:
    model_config = {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    return write_checkpoint(
        path, tensors, quant_config(groups, **config), shards=2, model_config=model_config
    )


def _static_fp8_checkpoint(path: Path, **overrides: torch.Tensor | None) -> Path:
    """FP8 weights with static per-tensor inputs; ``overrides`` replace (or, None, drop) tensors."""
    tensors = _projections()
    for name in PROJECTIONS:
        tensors[f"{ATTN}.{name}.input_scale"] = torch.full((1,), 0.02, dtype=torch.bfloat16)
    for name, tensor in overrides.items():
        full = f"{ATTN}.{name}"
        if tensor is None:
            tensors.pop(full)
        else:
            tensors[full] = tensor
    return _write(path, tensors, {"group_0": _fp8_group(input_activations=FP8_STATIC_INPUT)})


# ---------------------------------------------------------------------------------------------
# Linear inputs and outputs


def test_static_input_scale_is_found_and_validated(tmp_path: Path) -> None:
    with open_checkpoint(_static_fp8_checkpoint(tmp_path)) as checkpoint:
        params = checkpoint.activation_params(Q_PROJ)
    assert params.complete and dict(params.missing) == {}
    assert set(params.found) == {"input_scale"}
    assert params.found["input_scale"].shape == (1,)


def test_missing_static_input_scale_is_reported(tmp_path: Path) -> None:
    with open_checkpoint(
        _static_fp8_checkpoint(tmp_path, **{"q_proj.input_scale": None})
    ) as checkpoint:
        params = checkpoint.activation_params(Q_PROJ)
        assert not params.complete
        assert "static" in params.missing["input_scale"]
        with pytest.raises(
            CTRefError,
            match=rf"{Q_PROJ}\.input_scale: missing: config_groups\.group_0\.input_activations",
        ):
            params.require_complete()
        assert checkpoint.activation_params(f"{ATTN}.k_proj").complete


@pytest.mark.parametrize(
    ("stored", "rule"),
    [
        pytest.param(torch.ones(2, dtype=torch.bfloat16), "expected shape (1,)", id="shape"),
        pytest.param(torch.ones((), dtype=torch.bfloat16), "expected shape (1,)", id="zero-dim"),
        pytest.param(
            torch.ones(1, dtype=torch.int8), "expected dtype bfloat16 or float16", id="dtype"
        ),
        pytest.param(torch.tensor([float("nan")], dtype=torch.bfloat16), "NaN", id="nan"),
        pytest.param(torch.zeros(1, dtype=torch.bfloat16), "positive", id="zero"),
        pytest.param(-BF16_ONE, "positive", id="negative"),
    ],
)
def test_bad_input_scale_names_file_tensor_and_rule(
    tmp_path: Path, stored: torch.Tensor, rule: str
) -> None:
    path = _static_fp8_checkpoint(tmp_path, **{"q_proj.input_scale": stored})
    with open_checkpoint(path) as checkpoint:
        file = checkpoint.header(f"{Q_PROJ}.input_scale").file
        with pytest.raises(CTRefError) as caught:
            checkpoint.activation_params(Q_PROJ)
    assert str(caught.value).startswith(f"{file}: {Q_PROJ}.input_scale: ")
    assert rule in str(caught.value)


def test_dynamic_inputs_store_nothing(tmp_path: Path) -> None:
    tensors = _projections()
    tensors[f"{Q_PROJ}.input_scale"] = BF16_ONE
    dynamic = {**FP8, "strategy": "token", "dynamic": True}
    path = _write(tmp_path, tensors, {"group_0": _fp8_group(input_activations=dynamic)})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.activation_params(f"{ATTN}.k_proj").found == {}
        stray = checkpoint.activation_params(Q_PROJ)
    assert stray.complete and stray.unexpected == ("input_scale",)


def test_nvfp4_local_dynamic_inputs_store_an_fp32_global_scale(tmp_path: Path) -> None:
    nvfp4 = PRESET_SCHEMES["NVFP4"]
    tensors = _projections("nvfp4-pack-quantized", nvfp4["weights"])
    for name in PROJECTIONS:
        tensors[f"{ATTN}.{name}.input_global_scale"] = torch.full((1,), 300.0)
    tensors[f"{ATTN}.k_proj.input_global_scale"] = torch.full((1,), 300.0, dtype=torch.bfloat16)
    tensors.pop(f"{ATTN}.v_proj.input_global_scale")
    group = {"targets": ["Linear"], **nvfp4, "format": "nvfp4-pack-quantized"}
    with open_checkpoint(_write(tmp_path, tensors, {"group_0": group})) as checkpoint:
        q_params = checkpoint.activation_params(Q_PROJ)
        assert q_params.complete and set(q_params.found) == {"input_global_scale"}
        assert (
            "tensor_group"
            in checkpoint.activation_params(f"{ATTN}.v_proj").missing["input_global_scale"]
        )
        with pytest.raises(CTRefError, match=r"k_proj\.input_global_scale: expected dtype float32"):
            checkpoint.activation_params(f"{ATTN}.k_proj")


def test_static_asymmetric_group_inputs_store_scale_and_zero_point_per_group(
    tmp_path: Path,
) -> None:
    inputs = {
        "num_bits": 8,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 8,
        "dynamic": False,
    }
    tensors = _projections()
    groups = HIDDEN // 8
    for name in PROJECTIONS:
        tensors[f"{ATTN}.{name}.input_scale"] = torch.full((groups,), 0.5, dtype=torch.bfloat16)
        tensors[f"{ATTN}.{name}.input_zero_point"] = torch.zeros(groups, dtype=torch.int8)
    tensors[f"{ATTN}.o_proj.input_zero_point"] = torch.zeros(groups + 1, dtype=torch.int8)
    with open_checkpoint(
        _write(tmp_path, tensors, {"group_0": _fp8_group(input_activations=inputs)})
    ) as checkpoint:
        params = checkpoint.activation_params(Q_PROJ)
        assert params.complete and set(params.found) == {"input_scale", "input_zero_point"}
        with pytest.raises(
            CTRefError, match=rf"o_proj\.input_zero_point: expected shape \({groups},\)"
        ):
            checkpoint.activation_params(f"{ATTN}.o_proj")


def test_static_outputs_store_an_output_scale(tmp_path: Path) -> None:
    tensors = _projections()
    tensors[f"{Q_PROJ}.output_scale"] = BF16_ONE
    outputs = {**FP8, "strategy": "tensor", "dynamic": False}
    with open_checkpoint(
        _write(tmp_path, tensors, {"group_0": _fp8_group(output_activations=outputs)})
    ) as checkpoint:
        assert set(checkpoint.activation_params(Q_PROJ).found) == {"output_scale"}
        assert "output_scale" in checkpoint.activation_params(f"{ATTN}.k_proj").missing


# ---------------------------------------------------------------------------------------------
# KV cache and attention


KV_TENSOR = {**FP8, "strategy": "tensor", "dynamic": False}


def _kv_checkpoint(
    path: Path,
    kv_scheme: dict[str, Any],
    extra: dict[str, torch.Tensor],
    groups: dict[str, Any] | None = None,
) -> Path:
    tensors = {**_projections(), **extra}
    return _write(path, tensors, groups or {"group_0": _fp8_group()}, kv_cache_scheme=kv_scheme)


def test_kv_cache_scheme_requires_k_and_v_scales_on_every_attention_module(tmp_path: Path) -> None:
    path = _kv_checkpoint(tmp_path, KV_TENSOR, {f"{ATTN}.k_scale": BF16_ONE})
    with open_checkpoint(path) as checkpoint:
        records = checkpoint.kv_cache_scales()
    assert list(records) == [ATTN]
    record = records[ATTN]
    assert set(record.found) == {"k_scale"} and set(record.missing) == {"v_scale"}
    assert "kv_cache_scheme" in record.missing["v_scale"]
    with pytest.raises(CTRefError, match=rf"{ATTN}\.v_scale: missing"):
        record.require_complete()


def test_legacy_kv_spelling_is_recognised_and_reported(tmp_path: Path) -> None:
    legacy = {
        f"{ATTN}.k_proj.output_scale": BF16_ONE,
        f"{ATTN}.v_proj.output_scale": torch.tensor([float("inf")], dtype=torch.bfloat16),
    }
    path = _kv_checkpoint(tmp_path, KV_TENSOR, {**legacy, f"{ATTN}.v_scale": BF16_ONE})
    with open_checkpoint(path) as checkpoint:
        record = checkpoint.kv_cache_scales()[ATTN]
    assert record.complete
    assert dict(record.legacy) == {
        "k_scale": "k_proj.output_scale"
    }, "v_scale is stored under its own name"
    path = _kv_checkpoint(tmp_path / "bad", KV_TENSOR, legacy)
    with open_checkpoint(path) as checkpoint:
        with pytest.raises(CTRefError, match=rf"{ATTN}\.v_proj\.output_scale: holds NaN or Inf"):
            checkpoint.kv_cache_scales()


@pytest.mark.parametrize(("heads", "ok"), [(KV_HEADS, True), (HEADS, False)])
def test_attn_head_kv_scales_have_one_entry_per_kv_head(
    tmp_path: Path, heads: int, ok: bool
) -> None:
    scales = {
        f"{ATTN}.{kind}_scale": torch.ones(heads, 1, 1, dtype=torch.bfloat16) for kind in ("k", "v")
    }
    path = _kv_checkpoint(tmp_path, {**KV_TENSOR, "strategy": "attn_head"}, scales)
    with open_checkpoint(path) as checkpoint:
        if ok:
            assert checkpoint.kv_cache_scales()[ATTN].complete
        else:
            with pytest.raises(
                CTRefError, match=rf"{ATTN}\.k_scale: expected shape \({KV_HEADS}, 1, 1\)"
            ):
                checkpoint.kv_cache_scales()


def test_attention_group_narrowly_targeting_attention_adds_q_scale(tmp_path: Path) -> None:
    groups = {
        "group_0": _fp8_group(),
        "attention": {"targets": ["re:.*self_attn$"], "input_activations": FP8_STATIC_INPUT},
    }
    path = _kv_checkpoint(
        tmp_path, KV_TENSOR, {f"{ATTN}.k_scale": BF16_ONE, f"{ATTN}.v_scale": BF16_ONE}, groups
    )
    with open_checkpoint(path) as checkpoint:
        record = checkpoint.activation_params(ATTN)
    assert set(record.missing) == {"q_scale"}
    assert "config_groups.attention.input_activations" in record.missing["q_scale"]


def test_broad_target_over_attention_quantizes_projections_not_attention(tmp_path: Path) -> None:
    """``re:.*self_attn.*`` matches ``self_attn`` and its children: not a narrow match (§1.7)."""
    group = {
        "targets": ["re:.*self_attn.*"],
        "weights": FP8_TENSOR_WEIGHTS,
        "input_activations": FP8_STATIC_INPUT,
    }
    path = _write(tmp_path, _projections(), {"group_0": group})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.kv_cache_scales()[
            ATTN
        ].complete, "nothing expected on the attention module"
        assert "input_scale" in checkpoint.activation_params(Q_PROJ).missing


def test_attention_modules_are_found_by_projection_children_and_name(tmp_path: Path) -> None:
    tensors = {
        **_projections(),
        "model.layers.0.cross_attention.out.weight": torch.ones(2, 2),
        "model.vision.blocks.0.attn.qkv_proj.weight": torch.ones(6, 2),
        "model.mlp.up_proj.weight": torch.ones(2, 2),
    }
    path = _write(tmp_path, tensors, {"group_0": _fp8_group(targets=[r"re:.*self_attn\..*"])})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.attention_modules() == [
            "model.layers.0.cross_attention",
            ATTN,
            "model.vision.blocks.0.attn",
        ]


# ---------------------------------------------------------------------------------------------
# Bias


def test_bias_is_read_unchanged(tmp_path: Path) -> None:
    bias = torch.linspace(-1, 1, HIDDEN).to(torch.float16)
    path = _write(tmp_path, {**_projections(), f"{Q_PROJ}.bias": bias}, {"group_0": _fp8_group()})
    with open_checkpoint(path) as checkpoint:
        stored = checkpoint.bias(Q_PROJ)
        assert stored is not None and stored.dtype == torch.float16 and torch.equal(stored, bias)
        assert checkpoint.bias(f"{ATTN}.k_proj") is None
        assert f"{Q_PROJ}.bias" in checkpoint.module_info(Q_PROJ).tensor_names
