"""transform_config (spec §1.9): Hadamard construction, stored-matrix rules, effective weights.

Expected matrices are written out here from the definitions (Sylvester recursion, ``P H Pᵀ/√s``,
block diagonals) rather than taken from ctref, so that a wrong ctref matrix shows up as a
mismatch with the online computation, not as two copies of the same mistake.
"""

from __future__ import annotations

import math

import pytest
import torch

from ctref.config import TransformConfig
from ctref.errors import CTRefError
from ctref.transforms import (
    ATTENTION,
    FOLDED,
    FUSED_AT_WRITE,
    apply_online,
    attention_transforms,
    check_hadamard,
    check_permutation,
    effective_bias,
    effective_weight,
    hadamard_matrix,
)

F64 = torch.float64
POWERS_OF_TWO = [2**k for k in range(9)]  # 1 … 256


def config(**groups: dict) -> TransformConfig:
    parsed = TransformConfig.from_dict({"config_groups": groups})
    assert parsed is not None
    return parsed


def sylvester(size: int) -> torch.Tensor:
    """The recursion ``H_2n = [[H, H], [H, -H]]``, independent of ctref's closed form."""
    matrix = torch.ones(1, 1, dtype=F64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix


def paley_hadamard_12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (Paley I, q = 11): what a non-power-of-two random-Hadamard
    checkpoint stores (up to signs), and not a Sylvester matrix."""
    q = 11
    residues = {x * x % q for x in range(1, q)}
    def character(a: int) -> int:
        return 0 if a % q == 0 else (1 if a % q in residues else -1)

    jacobsthal = torch.tensor([[character(j - i) for j in range(q)] for i in range(q)], dtype=F64)
    skew = torch.zeros(q + 1, q + 1, dtype=F64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1, -1, jacobsthal
    return torch.eye(q + 1, dtype=F64) + skew


def block_diag(matrix: torch.Tensor, dimension: int) -> torch.Tensor:
    return torch.block_diag(*[matrix] * (dimension // matrix.shape[0]))


def random_signs(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (size,), generator=generator).to(F64) * 2 - 1


def lookup(stored: dict[str, torch.Tensor]):
    return stored.get


# ---------------------------------------------------------------------------------------------
# Hadamard construction


@pytest.mark.parametrize("size", POWERS_OF_TWO)
def test_sylvester_matrix_is_the_recursion_and_orthogonal_once_normalized(size: int) -> None:
    matrix = hadamard_matrix(size)
    assert matrix.dtype == F64
    assert torch.equal(matrix, sylvester(size))
    assert torch.equal(matrix @ matrix.T, size * torch.eye(size, dtype=F64))
    normalized = matrix / math.sqrt(size)
    assert torch.allclose(normalized @ normalized.T, torch.eye(size, dtype=F64), atol=1e-13)


def test_hadamard_matrix_honours_dtype() -> None:
    assert torch.equal(hadamard_matrix(16, torch.bfloat16).to(F64), sylvester(16))


@pytest.mark.parametrize("size", [0, -4, 3, 6, 12, 20, 24, 100])
def test_non_power_of_two_hadamard_is_refused(size: int) -> None:
    with pytest.raises(CTRefError, match="power-of-two"):
        hadamard_matrix(size)


def test_check_hadamard_accepts_non_sylvester_hadamard_matrices() -> None:
    check_hadamard(paley_hadamard_12(), tensor="x")
    check_hadamard(torch.diag(random_signs(32, 0)) @ sylvester(32), tensor="x")
    check_hadamard(sylvester(8).to(torch.bfloat16), tensor="x")


@pytest.mark.parametrize(
    ("matrix", "rule"),
    [
        (sylvester(4) * 2, r"\+1 and -1 only"),
        (sylvester(4) / 2, r"\+1 and -1 only"),
        (torch.ones(4, 4, dtype=F64), "rows orthogonal"),
        (paley_hadamard_12()[:, [*range(11), 10]], "orthogonal"),
        (sylvester(4)[:2], "square"),
        (sylvester(4).to(torch.int8), "floating point"),
    ],
)
def test_check_hadamard_rejects(matrix: torch.Tensor, rule: str) -> None:
    with pytest.raises(CTRefError, match=rule) as error:
        check_hadamard(matrix, tensor="m.v_input.weight")
    assert error.value.tensor == "m.v_input.weight"


def test_check_permutation() -> None:
    check_permutation(torch.randperm(16), 16, tensor="p")
    check_permutation(torch.arange(8, dtype=torch.int32), 8, tensor="p")
    with pytest.raises(CTRefError, match="not a permutation"):
        check_permutation(torch.tensor([0, 1, 1, 3]), 4, tensor="p")
    with pytest.raises(CTRefError, match="not a permutation"):
        check_permutation(torch.tensor([0, 1, 2, 4]), 4, tensor="p")
    with pytest.raises(CTRefError, match=r"shape \(4,\)"):
        check_permutation(torch.arange(8), 4, tensor="p")
    with pytest.raises(CTRefError, match="integer"):
        check_permutation(torch.arange(4.0), 4, tensor="p")


# ---------------------------------------------------------------------------------------------
# Effective weight: every case checked against the online computation, in float64.

N, K = 8, 16
LAYER = "model.layers.0.mlp.down_proj"


def layer_weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed), dtype=F64)


def inputs() -> torch.Tensor:
    return torch.randn(5, K, generator=torch.Generator().manual_seed(1), dtype=F64)


def test_hadamard_input_folds_to_w_times_t_transposed() -> None:
    cfg = config(v={"type": "hadamard", "apply": [{"targets": [LAYER], "location": "input"}]})
    weight, x = layer_weight(), inputs()
    stored = {f"{LAYER}.v_input.weight": sylvester(K).float()}
    effective, applied = effective_weight(LAYER, weight, cfg, lookup(stored))

    transform = sylvester(K) / math.sqrt(K)
    assert torch.allclose(x @ effective.T, (x @ transform) @ weight.T, rtol=0, atol=1e-12)
    assert torch.allclose(effective, weight @ transform.T, rtol=0, atol=1e-13)
    [record] = applied
    assert (record.scheme, record.type, record.location, record.inverse) == (
        "v",
        "hadamard",
        "input",
        False,
    )
    assert (record.size, record.head_dim, record.disposition) == (K, None, FOLDED)
    assert (record.tensor, record.perm) == (f"{LAYER}.v_input.weight", None)


def test_randomized_inverse_hadamard_uses_permuted_transposed_matrix() -> None:
    cfg = config(
        v={
            "type": "random-hadamard",
            "randomize": True,
            "apply": [{"targets": [LAYER], "location": "input", "inverse": True}],
        }
    )
    hadamard = torch.diag(random_signs(K, 2)) @ sylvester(K)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    stored = {f"{LAYER}.v_input.weight": hadamard.float(), f"{LAYER}.v_input.perm": perm}
    weight, x = layer_weight(), inputs()
    effective, [record] = effective_weight(LAYER, weight, cfg, lookup(stored))

    permutation = torch.eye(K, dtype=F64)[perm]  # P @ H @ P.T == H[perm][:, perm]
    transform = (permutation @ hadamard @ permutation.T).T / math.sqrt(K)
    assert torch.allclose(x @ effective.T, (x @ transform) @ weight.T, rtol=0, atol=1e-12)
    # The runtime computes in the stored dtype (float32 here) and returns x's dtype.
    online = apply_online(x, record)
    assert online.dtype == F64
    assert torch.allclose(online, x @ transform, rtol=0, atol=1e-5)
    assert torch.equal(online, ((x.float() @ record.runtime_weight) / math.sqrt(K)).double())
    assert record.perm == f"{LAYER}.v_input.perm"


def test_random_matrix_inverse_is_used_as_stored() -> None:
    apply = [{"targets": [LAYER], "location": "input", "inverse": True}]
    cfg = config(r={"type": "random-matrix", "apply": apply})
    inverse = torch.rand(K, K, generator=torch.Generator().manual_seed(4), dtype=F64)
    weight, x = layer_weight(), inputs()
    stored = {f"{LAYER}.r_input.weight": inverse}
    effective, [record] = effective_weight(LAYER, weight, cfg, lookup(stored))
    assert torch.allclose(x @ effective.T, (x @ inverse) @ weight.T, rtol=1e-12, atol=1e-12)
    assert record.normalizer is None


def test_block_diagonal_output_transform_rotates_weight_and_bias() -> None:
    head_dim = 4
    cfg = config(
        u={
            "type": "hadamard",
            "head_dim": head_dim,
            "apply": [{"targets": [LAYER], "location": "output"}],
        }
    )
    weight, x = layer_weight(), inputs()
    bias = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=F64)
    stored = {f"{LAYER}.u_output.weight": sylvester(head_dim).float()}
    effective, applied = effective_weight(LAYER, weight, cfg, lookup(stored))

    transform = block_diag(sylvester(head_dim) / 2, N)
    online = (x @ weight.T + bias) @ transform
    assert torch.allclose(x @ effective.T + effective_bias(bias, applied), online, atol=1e-12)
    assert applied[0].size == head_dim


def test_several_transforms_fold_in_hook_order() -> None:
    """Input hooks are prepended (the last registered runs first); output hooks run in order."""
    cfg = config(
        a={
            "type": "random-matrix",
            "apply": [
                {"targets": [LAYER], "location": "input"},
                {"targets": [LAYER], "location": "output"},
            ],
        },
        b={
            "type": "hadamard",
            "head_dim": 4,
            "apply": [
                {"targets": [LAYER], "location": "input"},
                {"targets": [LAYER], "location": "output"},
            ],
        },
    )
    generator = torch.Generator().manual_seed(6)
    a_in = torch.rand(K, K, generator=generator, dtype=F64)
    a_out = torch.rand(N, N, generator=generator, dtype=F64)
    stored = {
        f"{LAYER}.a_input.weight": a_in,
        f"{LAYER}.a_output.weight": a_out,
        f"{LAYER}.b_input.weight": sylvester(4),
        f"{LAYER}.b_output.weight": sylvester(4),
    }
    weight, x = layer_weight(), inputs()
    effective, applied = effective_weight(LAYER, weight, cfg, lookup(stored))

    b_in, b_out = block_diag(sylvester(4) / 2, K), block_diag(sylvester(4) / 2, N)
    online = (x @ b_in @ a_in) @ weight.T @ a_out @ b_out
    assert torch.allclose(x @ effective.T, online, rtol=1e-12, atol=1e-12)
    assert [(r.scheme, r.location) for r in applied] == [
        ("a", "input"),
        ("a", "output"),
        ("b", "input"),
        ("b", "output"),
    ]


def test_offline_transforms_are_reported_not_applied() -> None:
    cfg = config(
        v={
            "type": "random-hadamard",
            "head_dim": 4,
            "apply": [
                {"targets": [LAYER], "location": "weight_input", "inverse": True},
                {"targets": [LAYER], "location": "weight_output"},
            ],
        }
    )
    weight = layer_weight()
    effective, applied = effective_weight(LAYER, weight, cfg, lookup({}))
    assert torch.equal(effective, weight)
    assert [(r.location, r.disposition, r.tensor, r.size) for r in applied] == [
        ("weight_input", FUSED_AT_WRITE, None, 4),
        ("weight_output", FUSED_AT_WRITE, None, 4),
    ]


def test_attention_locations_are_reported_not_folded() -> None:
    attention = "model.layers.0.self_attn"
    cfg = config(
        r3={
            "type": "hadamard",
            "head_dim": 4,
            "apply": [
                {"targets": ["re:.*self_attn$"], "location": "q_attn"},
                {"targets": ["re:.*self_attn$"], "location": "k_cache"},
            ],
        }
    )
    stored = {
        f"{attention}.r3_q_attn.weight": sylvester(4).float(),
        f"{attention}.r3_k_cache.weight": sylvester(4).float(),
    }
    [query, key] = attention_transforms(attention, cfg, lookup(stored))
    assert (query.location, query.disposition, query.size) == ("q_attn", ATTENTION, 4)
    assert key.tensor == f"{attention}.r3_k_cache.weight"
    states = torch.randn(2, 3, 4, 4, dtype=torch.float32)  # (batch, heads, tokens, head_dim)
    expected = states @ (sylvester(4).float() / 2)
    assert torch.allclose(apply_online(states, query), expected, atol=1e-6)

    # A Linear selected by an attention-level entry keeps its weight.
    apply = [{"targets": [LAYER], "location": "q_attn"}]
    linear_cfg = config(r3={"type": "hadamard", "head_dim": 4, "apply": apply})
    weight = layer_weight()
    effective, [record] = effective_weight(
        LAYER, weight, linear_cfg, lookup({f"{LAYER}.r3_q_attn.weight": sylvester(4)})
    )
    assert torch.equal(effective, weight) and record.disposition == ATTENTION


def test_attention_transform_needs_head_dim() -> None:
    cfg = config(r3={"type": "hadamard", "apply": [{"targets": ["attn"], "location": "q_attn"}]})
    with pytest.raises(CTRefError) as error:
        attention_transforms("attn", cfg, lookup({}))
    assert error.value.key == "transform_config.config_groups.r3.head_dim"


def test_targets_ignore_and_class_names() -> None:
    cfg = config(
        v={
            "type": "hadamard",
            "apply": [{"targets": ["Linear"], "location": "input", "ignore": ["re:.*down_proj$"]}],
        }
    )
    stored = {"m.up_proj.v_input.weight": sylvester(K), f"{LAYER}.v_input.weight": sylvester(K)}
    weight = layer_weight()
    assert effective_weight(LAYER, weight, cfg, lookup(stored))[1] == []
    assert len(effective_weight("m.up_proj", weight, cfg, lookup(stored))[1]) == 1
    assert effective_weight("m.up_proj", weight, cfg, lookup(stored), class_names=())[1] == []


# ---------------------------------------------------------------------------------------------
# Tied matrices: save_pretrained keeps one copy per scheme and size.


def tied_config() -> TransformConfig:
    return config(
        v={
            "type": "random-hadamard",
            "randomize": True,
            "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}],
        }
    )


def test_tied_copy_under_another_module_is_used() -> None:
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    hadamard = torch.diag(random_signs(K, 7)) @ sylvester(K)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(8))
    stored = {f"{first}.v_input.weight": hadamard, f"{first}.v_input.perm": perm}
    weight = layer_weight()

    with pytest.raises(CTRefError, match="no tied copy") as error:
        effective_weight(second, weight, tied_config(), lookup(stored))
    assert error.value.tensor == f"{second}.v_input.weight"

    effective, [record] = effective_weight(
        second, weight, tied_config(), lookup(stored), stored_names=stored
    )
    assert (record.tensor, record.perm) == (f"{first}.v_input.weight", f"{first}.v_input.perm")
    expected, _ = effective_weight(first, weight, tied_config(), lookup(stored))
    assert torch.equal(effective, expected)


def test_differing_tied_copies_are_refused() -> None:
    stored = {
        "a.0.down_proj.v_input.weight": sylvester(K),
        "a.0.down_proj.v_input.perm": torch.arange(K),
        "a.2.down_proj.v_input.weight": -sylvester(K),
        "a.2.down_proj.v_input.perm": torch.arange(K),
    }
    with pytest.raises(CTRefError, match="differ"):
        effective_weight(
            "a.1.down_proj", layer_weight(), tied_config(), lookup(stored), stored_names=stored
        )


# ---------------------------------------------------------------------------------------------
# Bad input


def hadamard_input(**scheme: object) -> TransformConfig:
    apply = [{"targets": [LAYER], "location": "input"}]
    return config(v={"type": "hadamard", "apply": apply, **scheme})


@pytest.mark.parametrize(
    ("cfg", "stored", "bad_tensor", "rule"),
    [
        (hadamard_input(), {"v_input.weight": sylvester(8)}, "v_input.weight", r"shape \(16, 16\)"),
        (hadamard_input(), {"v_input.weight": sylvester(K)[:, :8]}, "v_input.weight", "shape"),
        (hadamard_input(), {"v_input.weight": 2 * sylvester(K)}, "v_input.weight", "-1 only"),
        (
            hadamard_input(),
            {"v_input.weight": sylvester(K)[torch.zeros(K, dtype=torch.long)]},
            "v_input.weight",
            "orthogonal",
        ),
        (
            hadamard_input(),
            {"v_input.weight": torch.diag(random_signs(K, 9)) @ sylvester(K)},
            "v_input.weight",
            "Sylvester",
        ),
        (
            hadamard_input(randomize=True),
            {"v_input.weight": sylvester(K)},
            "v_input.perm",
            "missing",
        ),
        (
            hadamard_input(randomize=True),
            {"v_input.weight": sylvester(K), "v_input.perm": torch.zeros(K, dtype=torch.long)},
            "v_input.perm",
            "not a permutation",
        ),
        (
            hadamard_input(),
            {"v_input.weight": sylvester(K), "v_input.perm": torch.arange(K)},
            "v_input.perm",
            "only a randomized",
        ),
        (
            config(
                r={"type": "random-matrix", "apply": [{"targets": [LAYER], "location": "output"}]}
            ),
            {"r_output.weight": torch.full((N, N), math.nan, dtype=F64)},
            "r_output.weight",
            "finite",
        ),
    ],
)
def test_bad_stored_transform_names_tensor_and_rule(
    cfg: TransformConfig, stored: dict[str, torch.Tensor], bad_tensor: str, rule: str
) -> None:
    full = {f"{LAYER}.{name}": tensor for name, tensor in stored.items()}
    with pytest.raises(CTRefError, match=rule) as error:
        effective_weight(LAYER, layer_weight(), cfg, lookup(full))
    assert error.value.tensor == f"{LAYER}.{bad_tensor}"


def test_head_dim_must_tile_the_dimension() -> None:
    with pytest.raises(CTRefError, match="must divide") as error:
        effective_weight(LAYER, layer_weight(), hadamard_input(head_dim=3), lookup({}))
    assert error.value.key == "transform_config.config_groups.v.head_dim"


def test_weight_must_be_two_dimensional() -> None:
    with pytest.raises(CTRefError, match="2-D"):
        effective_weight(LAYER, torch.zeros(K), hadamard_input(), lookup({}))
