"""The conformance levels catch real bugs and pass legitimate engines.

Every broken backend of tests/broken_backends.py plants one bug from the bug catalog into the
reference backend; on the case that exposes it, some level must fail with a message naming the
module and what is wrong, and the numeric levels must miss by orders of magnitude. The reference
and the legitimate variants (another accumulation order, bf16 math, fp16 split-K) must pass every
level of every case.
"""

from __future__ import annotations

import pytest
from broken_backends import (
    BUG_CASES,
    broken_backends,
    legitimate_variants,
    write_bug_cases,
)

from conformance import levels
from conformance.backends.base import Backend, NotSupported
from conformance.backends.reference import ReferenceBackend
from conformance.cases import Case, load_case
from conformance.results import ConformanceFailure

LEVELS = ("config", "inventory", "weights", "layer")

# What each bug's failure message must say, beyond the module's name.
NAMED = {
    "wrong-nibble-order": ("weights", "in another order (element layout or nibble order)"),
    "zero-point-off-by-one": ("weights", "model.layers.0.mlp.down_proj (pack-quantized"),
    "g-idx-ignored": ("weights", "model.layers.0.mlp.gate_proj (pack-quantized"),
    "scale-transposed": ("weights", "model.layers.0.mlp.down_proj (pack-quantized"),
    "nvfp4-global-scale-multiplied": ("weights", "the reference times"),
    "block-scales-misaligned-on-ragged-edge": ("weights", "model.layers.0.self_attn.o_proj (float-quantized"),
    "int8-routed-as-fp8": ("config", "maps to a refusal in expected/trtllm.toml, the engine chose 'FP8_PER_CHANNEL_PER_TOKEN'"),
    "regex-ignore-ignored": ("config", "the checkpoint says 'unquantized'"),
    "one-scale-for-fused-shards": ("weights", "model.layers.0.self_attn.k_proj (float-quantized"),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = write_bug_cases(tmp_path_factory.mktemp("bug-cases"))
    return {name: load_case(root / name) for name in BUG_CASES}


def run_level(backend: Backend, case: Case, level: str) -> tuple[str, str, dict]:
    """(``pass`` | ``fail`` | ``not-supported``, message, recorded measurements)."""
    recorded: dict = {}
    loaded = backend.load(case.directory, device="cpu", module_classes=case.module_classes)
    check = {
        "config": lambda: levels.check_config(backend, loaded, case, lambda **kw: recorded.update(kw)),
        "inventory": lambda: levels.check_inventory(loaded, case, lambda **kw: recorded.update(kw)),
        "weights": lambda: levels.check_weights(loaded, case, lambda **kw: recorded.update(kw)),
        "layer": lambda: levels.check_layer(loaded, case, lambda **kw: recorded.update(kw)),
    }[level]
    try:
        check()
    except ConformanceFailure as failure:
        return "fail", str(failure), recorded
    except NotSupported as refusal:
        return "not-supported", str(refusal), recorded
    return "pass", "", recorded


@pytest.mark.parametrize("backend", broken_backends(), ids=lambda b: b.name)
def test_broken_backend_fails_naming_what_is_wrong(backend, cases):
    case = cases[backend.exposed_by]
    outcomes = {level: run_level(backend, case, level) for level in LEVELS}
    failed = {level: message for level, (verdict, message, _) in outcomes.items() if verdict == "fail"}
    assert failed, f"{backend.name} passed every level of {case.name}"
    level, expected_words = NAMED[backend.bug]
    assert level in failed, f"{backend.name} should fail the {level} level; failed {sorted(failed)}"
    assert expected_words in failed[level], failed[level]
    # Any numeric level that fails misses by orders of magnitude, not by a hair.
    if "layer" in failed:
        worst = outcomes["layer"][2]["measured"]
        assert worst["ratio"] > 100, worst


@pytest.mark.parametrize("backend", [ReferenceBackend(), *legitimate_variants()], ids=lambda b: b.name)
@pytest.mark.parametrize("name", list(BUG_CASES))
def test_reference_and_legitimate_variants_pass_every_level(backend, name, cases):
    for level in LEVELS:
        verdict, message, recorded = run_level(backend, cases[name], level)
        assert verdict == "pass", f"{backend.name} {level}/{name}: {message}"
        if level == "layer":
            # Well inside the bound: at most a tenth of it.
            assert recorded["measured"]["ratio"] < 0.1, recorded


def test_every_catalogued_bug_has_a_broken_backend_and_a_case():
    bugs = {backend.bug for backend in broken_backends()}
    assert bugs == set(NAMED)
    assert {backend.exposed_by for backend in broken_backends()} <= set(BUG_CASES)
