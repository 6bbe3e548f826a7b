"""Which config group applies to a module, and in which format its weight is stored (§1.5, §1.6).

Module names are dotted checkpoint names (a tensor name minus its last component). Class names
are supplied by the caller, because a checkpoint alone does not say which class a module has
(§8 trap 25): pass the module's class and ancestors' ``__name__`` values, or nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ctref.config import COMPRESSION_FORMATS, QuantArgs, QuantizationConfig, QuantScheme

__all__ = ["infer_format", "is_ignored", "matches", "resolve_format", "resolve_scheme"]

_REGEX_PREFIX = "re:"
_CONCRETE_FORMATS = frozenset(COMPRESSION_FORMATS) - {"mixed-precision"}
_V0_13 = (0, 13, 0)
_V0_15 = (0, 15, 0)
_V0_17 = (0, 17, 0)
_V0_18 = (0, 18, 0)


def _matches_name(target: str, name: str) -> bool:
    if target.startswith(_REGEX_PREFIX):
        return re.match(target.removeprefix(_REGEX_PREFIX), name) is not None
    return target == name


def _matches_class(target: str, class_names: Sequence[str]) -> bool:
    """Regexes never match classes (≥0.12); vLLM's ``LinearBase`` also answers to ``Linear``."""
    if target.startswith(_REGEX_PREFIX):
        return False
    return target in class_names or (target == "Linear" and "LinearBase" in class_names)


def matches(target: str, name: str, class_names: Sequence[str] = ()) -> bool:
    """Whether one ``targets``/``ignore`` entry selects a module (§1.6).

    ``re:`` entries are ``re.match``-ed against the name: anchored at the start only, so
    ``re:.*q_proj`` also selects ``x.q_proj_extra``. Any other entry must equal the full name or
    one of ``class_names``.
    """
    return _matches_name(target, name) or _matches_class(target, class_names)


def is_ignored(config: QuantizationConfig, name: str, class_names: Sequence[str] = ()) -> bool:
    """Whether an ``ignore`` entry selects the module; ignore follows the target rules."""
    return any(matches(entry, name, class_names) for entry in config.ignore)


def resolve_scheme(
    config: QuantizationConfig, name: str, class_names: Sequence[str] = ()
) -> tuple[str, QuantScheme] | None:
    """The ``(group name, scheme)`` quantizing a module, or None if ignored or untargeted.

    Priority as 0.20.0's ``match_targets`` orders it (§1.6): exact-name targets, then regex
    targets in alphabetical order of their pattern strings, then class-name targets (also
    alphabetical). A target string listed by several groups belongs to the last of them.
    """
    if is_ignored(config, name, class_names):
        return None
    group_of_target: dict[str, str] = {}
    for group_name, scheme in config.config_groups.items():
        for target in scheme.targets:
            group_of_target[target] = group_name
    ordered = sorted(group_of_target, key=lambda target: (target.startswith(_REGEX_PREFIX), target))
    matched = [target for target in ordered if _matches_name(target, name)] + [
        target for target in ordered if _matches_class(target, class_names)
    ]
    if not matched:
        return None
    group_name = group_of_target[matched[0]]
    return group_name, config.config_groups[group_name]


def resolve_format(config: QuantizationConfig, scheme: QuantScheme) -> str:
    """The compression format of a group's weights (§1.5 recommended resolution).

    The group's own ``format`` (written by every writer since 0.11), else the top-level
    ``format`` when it names a compressor (pre-0.11 writers; not ``mixed-precision``, nor the
    ``fakequant`` default), else inference by the writer's version (:func:`infer_format`).
    """
    if scheme.format is not None:
        return scheme.format
    if config.format in _CONCRETE_FORMATS:
        return config.format
    sparsity = config.sparsity_config
    return infer_format(
        scheme,
        config.version_tuple,
        sparsity_structure=None if sparsity is None else sparsity.sparsity_structure,
    )


def infer_format(
    scheme: QuantScheme,
    version: tuple[int, int, int] | None = None,
    *,
    sparsity_structure: str | None = None,
) -> str:
    """The format the writer of ``version`` inferred for a Linear with this scheme (§1.5).

    An unknown version is taken as today's (0.20.0) writer. ``sparsity_structure`` (from the
    legacy ``sparsity_config``) matters only to ≤0.14 writers, which chose marlin-24 for 2:4.
    """
    weights = scheme.weights
    if weights is None:
        return "dense"
    has_inputs = scheme.input_activations is not None
    if version is None or version >= _V0_18:
        return _infer_0_18(weights, has_inputs)
    if version >= _V0_15:
        return _infer_0_15(weights, has_inputs, version)
    return _infer_0_14(weights, has_inputs, version, sparsity_structure)


def _float_group_rules(weights: QuantArgs, *, mxfp6: bool) -> tuple[tuple[str, bool], ...]:
    """The MX and NVFP4 rules that head the 0.15+ priority lists (MXFP6 only since 0.18)."""
    is_float, bits, group = weights.type == "float", weights.num_bits, weights.group_size
    is_e8m0 = weights.scale_dtype == torch.uint8
    return (
        ("mxfp4-pack-quantized", is_float and bits == 4 and group == 32),
        ("mxfp6-pack-quantized", mxfp6 and is_float and bits == 6 and group == 32),
        ("mxfp8-quantized", is_float and bits == 8 and group == 32 and is_e8m0),
        ("nvfp4-pack-quantized", is_float and bits == 4 and group == 16),
    )


def _infer_0_18(weights: QuantArgs, has_inputs: bool) -> str:
    """0.18.0+ priority list (§1.5 "Inference (0.20.0)"): the first rule that holds wins."""
    is_float, is_int, bits = weights.type == "float", weights.type == "int", weights.num_bits
    rules = (
        *_float_group_rules(weights, mxfp6=True),
        # Any input activations, float ones included: W4AFP8 is int-quantized (§8 trap 10).
        ("int-quantized", is_int and has_inputs),
        # 0.20.0's pack rule also admits int inputs, but the rule above has taken those.
        ("pack-quantized", is_int and 1 <= bits <= 8 and not has_inputs),
        ("float-quantized", is_float and has_inputs),
    )
    return next((fmt for fmt, holds in rules if holds), "naive-quantized")


def _infer_0_15(weights: QuantArgs, has_inputs: bool, version: tuple[int, int, int]) -> str:
    """0.15-0.17 priority list (§1.5): pack-quantized came before int-quantized and was
    weight-only, for 4/8 bits in 0.15/0.16 and 1-8 bits in 0.17 (§7)."""
    is_float, is_int, bits = weights.type == "float", weights.type == "int", weights.num_bits
    packable_bits = range(1, 9) if version >= _V0_17 else (4, 8)
    rules = (
        *_float_group_rules(weights, mxfp6=False),
        ("pack-quantized", is_int and not has_inputs and bits in packable_bits),
        ("int-quantized", is_int and has_inputs),
        ("float-quantized", is_float and has_inputs),
    )
    return next((fmt for fmt, holds in rules if holds), "naive-quantized")


def _infer_0_14(
    weights: QuantArgs,
    has_inputs: bool,
    version: tuple[int, int, int],
    sparsity_structure: str | None,
) -> str:
    """≤0.14 rules (§1.5 "Earlier inference", ``config/format.py`` of those releases).

    FP4 weights are nvfp4 whatever their group size, except group 32 from 0.13 on (mxfp4).
    Weight-only: int 4/8 bits pack (marlin-24 instead for a 2:4-sparse model with group or
    channel strategy), anything else naive. With input activations: 8-bit float weights
    float-quantized, int weights int-quantized, anything else naive.
    """
    is_float, is_int, bits = weights.type == "float", weights.type == "int", weights.num_bits
    if is_float and bits == 4:
        is_mx = version >= _V0_13 and weights.group_size == 32
        return "mxfp4-pack-quantized" if is_mx else "nvfp4-pack-quantized"
    if not has_inputs:
        if not (is_int and bits in (4, 8)):
            return "naive-quantized"
        is_marlin = sparsity_structure == "2:4" and weights.strategy in ("group", "channel")
        return "marlin-24" if is_marlin else "pack-quantized"
    if is_float and bits == 8:
        return "float-quantized"
    return "int-quantized" if is_int else "naive-quantized"
