"""transform_config against compressed-tensors 0.20.0: matrices, runtime transform, forward.

The library applies a transform config to a model (fusing offline transforms into weights and
hooking online ones); ctref then sees only what a checkpoint would hold (the state dict, or the
save_pretrained file) and must reproduce each layer's function.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("compressed_tensors", reason="peer library (extra 'peer') not installed")

from compressed_tensors.transform import (  # noqa: E402
    TransformConfig as PeerTransformConfig,
)
from compressed_tensors.transform import apply_transform_config  # noqa: E402
from compressed_tensors.transform.utils.hadamard import (  # noqa: E402
    deterministic_hadamard_matrix,
    random_hadamard_matrix,
)

from ctref.config import TransformConfig  # noqa: E402
from ctref.errors import CTRefError  # noqa: E402
from ctref.transforms import (  # noqa: E402
    FOLDED,
    FUSED_AT_WRITE,
    apply_online,
    attention_transforms,
    check_hadamard,
    effective_bias,
    effective_weight,
    hadamard_matrix,
)

pytestmark = pytest.mark.peer

F64 = torch.float64
CPU = torch.device("cpu")


def both_configs(groups: dict) -> tuple[PeerTransformConfig, TransformConfig]:
    """The same JSON section parsed by the library and by ctref."""
    ours = TransformConfig.from_dict({"config_groups": groups})
    assert ours is not None
    return PeerTransformConfig.model_validate({"config_groups": groups}), ours


@pytest.mark.parametrize("size", [2**k for k in range(9)])
def test_sylvester_matrix_equals_library(size: int) -> None:
    assert torch.equal(hadamard_matrix(size), deterministic_hadamard_matrix(size, F64, CPU))


@pytest.mark.parametrize("size", [3, 12, 20, 96])
def test_both_refuse_deterministic_hadamard_of_other_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        deterministic_hadamard_matrix(size, F64, CPU)
    with pytest.raises(CTRefError):
        hadamard_matrix(size)


@pytest.mark.parametrize(
    "size", [1, 2, 12, 20, 28, 36, 40, 44, 52, 60, 64, 108, 140, 156, 172, 256]
)
def test_library_random_hadamard_matrices_pass_ctref_checks(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    check_hadamard(random_hadamard_matrix(size, torch.float32, CPU, generator), tensor="x")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16, bias=False)
        self.fc3 = torch.nn.Linear(16, 16)


def precise(scheme: dict) -> dict:
    return {**scheme, "precision": "torch.float64"}


# Every type and Linear location: QuIP-like pairs, block-diagonal head_dim, randomized perms,
# a random matrix and its stored inverse on one layer, class-name targets with ignore.
GROUPS = {
    "h": {
        "type": "hadamard",
        "apply": [
            {"targets": ["fc1"], "location": "input"},
            {"targets": ["fc1"], "location": "weight_input", "inverse": True},
        ],
    },
    "rh": {
        "type": "random-hadamard",
        "randomize": True,
        "head_dim": 8,
        "apply": [
            {"targets": ["fc1"], "location": "output"},
            {"targets": ["re:fc2$"], "location": "input", "inverse": True},
        ],
    },
    "rm": {
        "type": "random-matrix",
        "apply": [
            {"targets": ["fc3"], "location": "input"},
            {"targets": ["fc3"], "location": "output", "inverse": True},
        ],
    },
    "u": {
        "type": "hadamard",
        "head_dim": 4,
        "apply": [
            {"targets": ["fc2"], "location": "weight_output"},
            {"targets": ["fc2"], "location": "output", "inverse": True},
        ],
    },
    "g": {
        "type": "hadamard",
        "apply": [{"targets": ["Linear"], "location": "input", "ignore": ["fc1", "re:fc2"]}],
    },
}


def transformed_tiny(groups: dict, dtype: torch.dtype) -> tuple[Tiny, TransformConfig]:
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    peer_config, config = both_configs(groups)
    apply_transform_config(model, peer_config)
    return model, config


def test_effective_weight_reproduces_library_forward() -> None:
    model, config = transformed_tiny({name: precise(g) for name, g in GROUPS.items()}, F64)
    state = model.state_dict()
    expected_locations = {
        "fc1": [("h", "input"), ("h", "weight_input"), ("rh", "output")],
        "fc2": [("rh", "input"), ("u", "weight_output"), ("u", "output")],
        "fc3": [("rm", "input"), ("rm", "output"), ("g", "input")],
    }
    for name, module in model.named_children():
        effective, applied = effective_weight(name, state[f"{name}.weight"], config, state.get)
        assert [(r.scheme, r.location) for r in applied] == expected_locations[name]
        x = torch.randn(7, module.in_features, dtype=F64)
        ours = x @ effective.T
        if module.bias is not None:
            ours = ours + effective_bias(state[f"{name}.bias"], applied)
        assert torch.allclose(ours, module(x), rtol=1e-12, atol=1e-12), name

        for record in applied:
            if record.disposition == FUSED_AT_WRITE:
                assert not hasattr(module, f"{record.scheme}_{record.location}")
                continue
            assert record.disposition == FOLDED
            peer_transform = getattr(module, f"{record.scheme}_{record.location}")
            dimension = module.in_features if record.location == "input" else module.out_features
            # The library's transform of the identity is its full (block-diagonal) matrix.
            peer_matrix = peer_transform(torch.eye(dimension, dtype=F64))
            blocks = torch.block_diag(*[record.matrix] * (dimension // record.size))
            assert torch.equal(blocks, peer_matrix), (name, record.scheme, record.location)
            if record.type == "hadamard":
                assert torch.equal(state[record.tensor], hadamard_matrix(record.size))


def test_apply_online_is_bit_exact_with_library_runtime() -> None:
    model, config = transformed_tiny(GROUPS, torch.float32)  # default precision float32
    state = model.state_dict()
    checked = 0
    for name, module in model.named_children():
        _, applied = effective_weight(name, state[f"{name}.weight"], config, state.get)
        for record in applied:
            if record.disposition != FOLDED:
                continue
            peer_transform = getattr(module, f"{record.scheme}_{record.location}")
            features = module.in_features if record.location == "input" else module.out_features
            value = torch.randn(3, 5, features, dtype=torch.float32)
            # One matrix per scheme and size, made by whichever location came first: "u" made
            # it for weight_output (always float64), so its online output runs in float64.
            first_made_offline = record.scheme == "u"
            assert record.runtime_weight.dtype == (F64 if first_made_offline else torch.float32)
            assert torch.equal(apply_online(value, record), peer_transform(value))
            checked += 1
    assert checked == 7


def test_save_pretrained_file_with_tied_matrices(tmp_path) -> None:
    """save_pretrained keeps one copy of a shared matrix (layer 0's, and R3's k_cache only as
    q_attn); ctref must find it for every layer and still reproduce the live model."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    llama_config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config).to(F64)
    groups = {
        "R3": precise(
            {
                "type": "hadamard",
                "head_dim": 8,
                "apply": [
                    {"targets": ["re:.*self_attn$"], "location": "q_attn"},
                    {"targets": ["re:.*self_attn$"], "location": "k_cache"},
                ],
            }
        ),
        "R4": precise(
            {
                "type": "random-hadamard",
                "randomize": True,
                "apply": [
                    {"targets": ["re:.*down_proj$"], "location": "input"},
                    {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True},
                ],
            }
        ),
    }
    peer_config, config = both_configs(groups)
    apply_transform_config(model, peer_config)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.R4_input.weight" not in stored
    assert "model.layers.0.self_attn.R3_k_cache.weight" not in stored

    for index, layer in enumerate(model.model.layers):
        name = f"model.layers.{index}.mlp.down_proj"
        effective, applied = effective_weight(
            name, stored[f"{name}.weight"], config, stored.get, stored_names=stored
        )
        assert applied[0].tensor == "model.layers.0.mlp.down_proj.R4_input.weight"
        assert applied[0].perm == "model.layers.0.mlp.down_proj.R4_input.perm"
        x = torch.randn(5, llama_config.intermediate_size, dtype=F64)
        assert torch.allclose(x @ effective.T, layer.mlp.down_proj(x), rtol=1e-12, atol=1e-12)

        attention = f"model.layers.{index}.self_attn"
        query, key = attention_transforms(attention, config, stored.get, stored_names=stored)
        assert query.tensor == key.tensor == "model.layers.0.self_attn.R3_q_attn.weight"
        states = torch.randn(1, 2, 3, 8, dtype=F64)
        assert torch.equal(apply_online(states, key), layer.self_attn.R3_k_cache(states))
        assert torch.equal(apply_online(states, query), layer.self_attn.R3_q_attn(states))
