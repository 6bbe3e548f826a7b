"""Immutable, typed model of a compressed-tensors ``quantization_config`` (spec §1).

Parsing follows the 0.20.0 pydantic models rule for rule (defaults, validation order, which keys
are rejected) so that a config ctref accepts is one the library accepts, with one deliberate
exception: legacy spellings that older writers produced (``actorder: "group"``, string
``block_structure``, ``compression_config``) are read, because ctref must decode old checkpoints.
Every broken rule raises :class:`~ctref.errors.CTRefError` naming the key path.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctref.errors import CTRefError
from ctref.presets import PRESET_SCHEMES

__all__ = [
    "COMPRESSION_FORMATS",
    "QUANTIZATION_STATUSES",
    "STRATEGIES",
    "QuantArgs",
    "QuantScheme",
    "QuantizationConfig",
    "SparsityConfig",
    "TransformArgs",
    "TransformConfig",
    "TransformScheme",
    "dtype_name",
    "parse_version",
]

STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
"""QuantizationStrategy values (§1.4)."""

COMPRESSION_FORMATS = (
    "dense",
    "sparse-bitmask",
    "sparse-24-bitmask",
    "int-quantized",
    "float-quantized",
    "naive-quantized",
    "pack-quantized",
    "marlin-24",
    "mixed-precision",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
    "mxfp6-pack-quantized",
    "mxfp8-quantized",
)
"""CompressionFormat values (§1.5); ``mixed-precision`` is a top-level summary only."""

QUANTIZATION_STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
QUANT_METHODS = ("compressed-tensors", "sparseml")
SPARSITY_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")
TRANSFORM_LOCATIONS = ("input", "weight_input", "weight_output", "output", "k_cache", "q_attn")
MOE_SPARSITY_METHODS = ("prune", "novice")

_INPUT_STRATEGIES = ("token", "tensor", "group", "tensor_group", "attn_head")
_DYNAMIC_STRATEGIES = ("token", "tensor", "tensor_group", "group")
_GROUPED_STRATEGIES = ("group", "tensor_group")
_FLOAT_BITS = (4, 6, 8)
_INT_BITS = range(1, 33)
_LEGACY_GROUP_ACTORDER = ("group", "dynamic")
_DENSE_PACKING_SINCE = (0, 18, 0)
_VERSION_PATTERN = re.compile(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?")

# ---------------------------------------------------------------------------------------------
# Field readers: JSON types are taken strictly (no "8" for 8, no true for 1).


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CTRefError(f"must be an object, got {type(value).__name__}", key=key)
    return value


def _reject_unknown_keys(d: Mapping[str, Any], allowed: tuple[str, ...], key: str) -> None:
    for name in d:
        if name not in allowed:
            raise CTRefError(f"unknown key (allowed: {', '.join(allowed)})", key=_join(key, name))


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CTRefError(f"must be an integer, got {value!r}", key=key)
    return value


def _optional_int(value: Any, key: str) -> int | None:
    return None if value is None else _int(value, key)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise CTRefError(f"must be true or false, got {value!r}", key=key)
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise CTRefError(f"must be a string, got {value!r}", key=key)
    return value


def _optional_str(value: Any, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _choice(value: Any, choices: tuple[str, ...], key: str, *, any_case: bool = False) -> str:
    text = _str(value, key)
    if any_case:
        text = text.lower()
    if text not in choices:
        raise CTRefError(f"must be one of {', '.join(choices)}; got {value!r}", key=key)
    return text


def _str_tuple(value: Any, key: str, *, allow_single: bool = False) -> tuple[str, ...]:
    if allow_single and isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise CTRefError(f"must be a list of strings, got {value!r}", key=key)
    return tuple(_str(item, f"{key}[{index}]") for index, item in enumerate(value))


def _optional_str_tuple(value: Any, key: str) -> tuple[str, ...]:
    """A list of strings where null means empty (``ignore``)."""
    return () if value is None else _str_tuple(value, key)


def _dtype(value: Any, key: str) -> torch.dtype | None:
    """``"torch.float8_e4m3fn"`` or ``"float8_e4m3fn"`` (or a dtype) -> dtype; 0.20.0's rule."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = _str(value, key).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CTRefError(f"unknown torch dtype {value!r}", key=key)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: the name messages and JSON records use."""
    return str(dtype).removeprefix("torch.")


def _freeze(value: Any) -> Any:
    """Nested JSON value with objects as read-only mappings and arrays as tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`, for serialization."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _optional_section(value: Any, key: str) -> Mapping[str, Any] | None:
    """``null``, absent and ``{}`` all mean "no such section" (writers emit ``{}``)."""
    if value is None:
        return None
    section = _mapping(value, key)
    return section or None


# ---------------------------------------------------------------------------------------------
# QuantizationArgs (§1.4)


def _block_structure(value: Any, key: str) -> tuple[int, int] | None:
    """``[rows, cols]`` positive ints; the 0.8-0.10 string ``"RxC"`` is converted."""
    if value is None:
        return None
    rule = f"must be two positive integers [rows, cols] or 'RxC', got {value!r}"
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split("x")]
        except ValueError:
            raise CTRefError(rule, key=key) from None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)
    ):
        raise CTRefError(rule, key=key)
    return (value[0], value[1])


def _dynamic(value: Any, key: str) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() == "local":
        return "local"
    raise CTRefError(f"must be true, false or 'local', got {value!r}", key=key)


def _actorder(value: Any, key: str) -> str | None:
    """``weight``/``static`` as written; legacy ``true``/``group``/``dynamic`` -> ``group``."""
    if value is None or value is False:
        return None
    if value is True:
        return "group"
    if isinstance(value, str) and value.lower() in _LEGACY_GROUP_ACTORDER:
        return "group"
    if value in ("weight", "static"):
        return value
    raise CTRefError(f"must be 'weight', 'static' or null, got {value!r}", key=key)


def _inferred_strategy(group_size: int | None, key: str) -> str:
    if group_size is None:
        return "tensor"
    if group_size > 0:
        return "group"
    if group_size == -1:
        return "channel"
    raise CTRefError(
        "0 is not a group size: use > 0 for strategy 'group', -1 for 'channel'", key=key
    )


def _inferred_zp_dtype(num_bits: int, qtype: str) -> torch.dtype:
    """§1.4: FP4/FP6 -> fp8 e4m3 (their scale dtype); otherwise the args' storage dtype."""
    if qtype == "float":
        return torch.float8_e4m3fn
    if num_bits <= 8:
        return torch.int8
    if num_bits <= 16:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class QuantArgs:
    """One ``QuantizationArgs`` block with every default filled and the strategy resolved."""

    num_bits: int
    type: str
    symmetric: bool
    group_size: int | None
    strategy: str
    block_structure: tuple[int, int] | None
    dynamic: bool | str
    actorder: str | None
    scale_dtype: torch.dtype | None
    zp_dtype: torch.dtype
    observer: str | None
    observer_kwargs: Mapping[str, Any] = field(hash=False)
    zp_dtype_explicit: bool = field(default=False, compare=False, repr=False)
    """Whether the source wrote ``zp_dtype``; 0.20.0 serializes it only then."""

    KEYS = (
        "num_bits",
        "type",
        "symmetric",
        "group_size",
        "strategy",
        "block_structure",
        "dynamic",
        "actorder",
        "scale_dtype",
        "zp_dtype",
        "observer",
        "observer_kwargs",
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> QuantArgs:
        """Validate in 0.20.0's order: field by field, then the cross-field rules of §1.4."""
        d = _mapping(d, key)
        _reject_unknown_keys(d, cls.KEYS, key)

        def at(name: str) -> str:
            return _join(key, name)

        num_bits = _int(d.get("num_bits", 8), at("num_bits"))
        qtype = _choice(d.get("type", "int"), ("int", "float"), at("type"), any_case=True)
        symmetric = _bool(d.get("symmetric", True), at("symmetric"))
        group_size = _optional_int(d.get("group_size"), at("group_size"))
        if group_size is not None and group_size < -1:
            raise CTRefError(
                f"must be > 0, -1 (channel) or null, got {group_size}", key=at("group_size")
            )
        strategy = d.get("strategy")
        if strategy is not None:
            strategy = _choice(strategy, STRATEGIES, at("strategy"), any_case=True)
        block_structure = _block_structure(d.get("block_structure"), at("block_structure"))
        dynamic = _dynamic(d.get("dynamic", False), at("dynamic"))
        actorder = _actorder(d.get("actorder"), at("actorder"))
        scale_dtype = _dtype(d.get("scale_dtype"), at("scale_dtype"))
        zp_dtype = _dtype(d.get("zp_dtype"), at("zp_dtype"))
        observer = _optional_str(d.get("observer"), at("observer"))
        observer_kwargs = _mapping(d.get("observer_kwargs", {}), at("observer_kwargs"))

        strategy = strategy or _inferred_strategy(group_size, at("group_size"))
        if strategy == "token" and not dynamic:
            raise CTRefError("strategy 'token' requires dynamic quantization", key=at("strategy"))
        has_positive_group = group_size is not None and group_size > 0
        if strategy in _GROUPED_STRATEGIES and not has_positive_group:
            raise CTRefError(
                f"required for strategy '{strategy}' and must be > 0, got {group_size}",
                key=at("group_size"),
            )
        if has_positive_group and strategy not in _GROUPED_STRATEGIES:
            raise CTRefError(
                f"a positive group_size needs strategy 'group' or 'tensor_group', not '{strategy}'",
                key=at("group_size"),
            )
        if strategy == "block" and block_structure is None:
            raise CTRefError("required for strategy 'block'", key=at("block_structure"))
        if block_structure is not None and strategy != "block":
            raise CTRefError(f"needs strategy 'block', not '{strategy}'", key=at("block_structure"))
        if dynamic and strategy not in _DYNAMIC_STRATEGIES:
            raise CTRefError(
                f"dynamic quantization needs strategy {', '.join(_DYNAMIC_STRATEGIES)}; "
                f"got '{strategy}'",
                key=at("dynamic"),
            )
        if dynamic == "local" and strategy != "tensor_group":
            raise CTRefError("'local' needs strategy 'tensor_group'", key=at("dynamic"))
        valid_bits = _FLOAT_BITS if qtype == "float" else _INT_BITS
        if num_bits not in valid_bits:
            allowed = "4, 6 or 8" if qtype == "float" else "1..32"
            raise CTRefError(
                f"{qtype} quantization takes {allowed} bits, got {num_bits}", key=at("num_bits")
            )

        return cls(
            num_bits=num_bits,
            type=qtype,
            symmetric=symmetric,
            group_size=group_size,
            strategy=strategy,
            block_structure=block_structure,
            dynamic=dynamic,
            actorder=actorder,
            scale_dtype=scale_dtype,
            zp_dtype=zp_dtype if zp_dtype is not None else _inferred_zp_dtype(num_bits, qtype),
            observer=observer,
            observer_kwargs=_freeze(observer_kwargs),
            zp_dtype_explicit=zp_dtype is not None,
        )

    @property
    def legacy_group_actorder(self) -> bool:
        """Legacy act-order (``group``/``dynamic``/``true``): the weight has a ``weight_g_idx``."""
        return self.actorder == "group"

    def to_dict(self) -> dict[str, Any]:
        """The dict 0.20.0 writes (§1.4 "Serialization").

        Null ``actorder``, ``block_structure``, ``scale_dtype`` and ``observer`` and an empty
        ``observer_kwargs`` are omitted; ``zp_dtype`` appears only when written and asymmetric.
        """
        out: dict[str, Any] = {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
        }
        if self.block_structure is not None:
            out["block_structure"] = list(self.block_structure)
        out["dynamic"] = self.dynamic
        if self.actorder is not None:
            out["actorder"] = self.actorder
        if self.scale_dtype is not None:
            out["scale_dtype"] = str(self.scale_dtype)
        if self.zp_dtype_explicit and not self.symmetric:
            out["zp_dtype"] = str(self.zp_dtype)
        if self.observer is not None:
            out["observer"] = self.observer
        if self.observer_kwargs:
            out["observer_kwargs"] = _thaw(self.observer_kwargs)
        return out


def _optional_args(value: Any, key: str) -> QuantArgs | None:
    return None if value is None else QuantArgs.from_dict(value, key)


def _optional_args_dict(args: QuantArgs | None) -> dict[str, Any] | None:
    return None if args is None else args.to_dict()


# ---------------------------------------------------------------------------------------------
# QuantizationScheme (§1.3)


@dataclass(frozen=True)
class QuantScheme:
    """One config group: the modules it targets and how their tensors are quantized."""

    targets: tuple[str, ...]
    weights: QuantArgs | None
    input_activations: QuantArgs | None
    output_activations: QuantArgs | None
    format: str | None

    KEYS = ("targets", "weights", "input_activations", "output_activations", "format")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> QuantScheme:
        d = _mapping(d, key)
        _reject_unknown_keys(d, cls.KEYS, key)
        if "targets" not in d:
            raise CTRefError("required", key=_join(key, "targets"))
        targets = _str_tuple(d["targets"], _join(key, "targets"))
        if not targets:
            raise CTRefError("must name at least one target", key=_join(key, "targets"))
        weights = _optional_args(d.get("weights"), _join(key, "weights"))
        inputs = _optional_args(d.get("input_activations"), _join(key, "input_activations"))
        outputs = _optional_args(d.get("output_activations"), _join(key, "output_activations"))
        fmt = d.get("format")
        if fmt is not None:
            fmt = _choice(fmt, COMPRESSION_FORMATS, _join(key, "format"))
            if fmt == "mixed-precision":
                raise CTRefError(
                    "'mixed-precision' is a top-level summary, not a group format",
                    key=_join(key, "format"),
                )

        if inputs is not None and inputs.strategy not in _INPUT_STRATEGIES:
            raise CTRefError(
                f"input activations take strategy {', '.join(_INPUT_STRATEGIES)}; "
                f"got '{inputs.strategy}'",
                key=_join(key, "input_activations.strategy"),
            )
        for name, args in (("input_activations", inputs), ("output_activations", outputs)):
            if args is not None and args.actorder is not None:
                raise CTRefError(
                    "act-order applies to weights only", key=_join(key, f"{name}.actorder")
                )

        return cls(
            targets=targets,
            weights=weights,
            input_activations=inputs,
            output_activations=outputs,
            format=fmt,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "weights": _optional_args_dict(self.weights),
            "input_activations": _optional_args_dict(self.input_activations),
            "output_activations": _optional_args_dict(self.output_activations),
            "format": self.format,
        }


def _config_group(name: str, value: Any, key: str) -> QuantScheme:
    """A scheme dict, or a list of targets that names a preset by the group's key (§1.2)."""
    if not isinstance(value, (list, tuple)):
        return QuantScheme.from_dict(value, key)
    preset = PRESET_SCHEMES.get(name.upper())
    if preset is None:
        raise CTRefError(
            f"a list of targets needs a preset name as group key; unknown preset {name!r} "
            f"(known: {', '.join(PRESET_SCHEMES)})",
            key=key,
        )
    return QuantScheme.from_dict({"targets": value, **preset}, key)


# ---------------------------------------------------------------------------------------------
# sparsity_config (§1.8)


@dataclass(frozen=True)
class SparsityConfig:
    """Legacy (≤0.14) sparsity section; ``targets`` None means every module."""

    format: str
    targets: tuple[str, ...] | None
    ignore: tuple[str, ...]
    global_sparsity: float
    sparsity_structure: str

    KEYS = ("format", "targets", "ignore", "global_sparsity", "sparsity_structure")
    _REGISTRY_ARTEFACT = "registry_requires_subclass"

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, key: str = "sparsity_config"
    ) -> SparsityConfig | None:
        section = _optional_section(d, key)
        if section is None:
            return None
        _reject_unknown_keys(section, (*cls.KEYS, cls._REGISTRY_ARTEFACT), key)
        if "format" not in section:
            raise CTRefError("required", key=_join(key, "format"))
        targets = section.get("targets")
        ratio = section.get("global_sparsity", 0.0)
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise CTRefError(f"must be a number, got {ratio!r}", key=_join(key, "global_sparsity"))
        structure = section.get("sparsity_structure")
        return cls(
            format=_choice(section["format"], SPARSITY_FORMATS, _join(key, "format")),
            targets=None if targets is None else _str_tuple(targets, _join(key, "targets")),
            ignore=_optional_str_tuple(section.get("ignore"), _join(key, "ignore")),
            global_sparsity=float(ratio or 0.0),
            # The library's SparsityStructure maps null to "unstructured" and ignores case.
            sparsity_structure=(
                "unstructured"
                if structure is None
                else _str(structure, _join(key, "sparsity_structure")).lower()
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "targets": None if self.targets is None else list(self.targets),
            "ignore": list(self.ignore),
            "global_sparsity": self.global_sparsity,
            "sparsity_structure": self.sparsity_structure,
        }


# ---------------------------------------------------------------------------------------------
# transform_config (§1.9)


@dataclass(frozen=True)
class TransformArgs:
    """Where one transform applies: target modules, location, and whether it is inverted."""

    targets: tuple[str, ...]
    location: str
    inverse: bool
    ignore: tuple[str, ...]

    KEYS = ("targets", "location", "inverse", "ignore")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> TransformArgs:
        d = _mapping(d, key)
        _reject_unknown_keys(d, cls.KEYS, key)
        for required in ("targets", "location"):
            if required not in d:
                raise CTRefError("required", key=_join(key, required))
        return cls(
            targets=_str_tuple(d["targets"], _join(key, "targets"), allow_single=True),
            location=_choice(d["location"], TRANSFORM_LOCATIONS, _join(key, "location")),
            inverse=_bool(d.get("inverse", False), _join(key, "inverse")),
            ignore=_str_tuple(d.get("ignore", []), _join(key, "ignore"), allow_single=True),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "location": self.location,
            "inverse": self.inverse,
            "ignore": list(self.ignore),
        }


@dataclass(frozen=True)
class TransformScheme:
    """One transform (hadamard, random-hadamard or random-matrix) and where it applies."""

    type: str
    apply: tuple[TransformArgs, ...]
    randomize: bool
    requires_grad: bool
    head_dim: int | None
    precision: torch.dtype

    KEYS = ("type", "apply", "randomize", "requires_grad", "head_dim", "precision")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> TransformScheme:
        d = _mapping(d, key)
        _reject_unknown_keys(d, cls.KEYS, key)
        if "type" not in d:
            raise CTRefError("required", key=_join(key, "type"))
        apply = d.get("apply", [])
        if not isinstance(apply, (list, tuple)):
            raise CTRefError(f"must be a list, got {apply!r}", key=_join(key, "apply"))
        head_dim = _optional_int(d.get("head_dim"), _join(key, "head_dim"))
        if head_dim is not None and head_dim <= 0:
            raise CTRefError(f"must be positive, got {head_dim}", key=_join(key, "head_dim"))
        precision = _dtype(d.get("precision", "torch.float32"), _join(key, "precision"))
        if precision is None:
            raise CTRefError("must be a torch dtype, got null", key=_join(key, "precision"))
        return cls(
            type=_choice(d["type"], TRANSFORM_TYPES, _join(key, "type")),
            apply=tuple(
                TransformArgs.from_dict(args, f"{_join(key, 'apply')}[{index}]")
                for index, args in enumerate(apply)
            ),
            randomize=_bool(d.get("randomize", False), _join(key, "randomize")),
            requires_grad=_bool(d.get("requires_grad", False), _join(key, "requires_grad")),
            head_dim=head_dim,
            precision=precision,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "apply": [args.to_dict() for args in self.apply],
            "randomize": self.randomize,
            "requires_grad": self.requires_grad,
            "head_dim": self.head_dim,
            "precision": str(self.precision),
        }


@dataclass(frozen=True)
class TransformConfig:
    """``transform_config``: named transform schemes, in file order."""

    config_groups: Mapping[str, TransformScheme]

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, key: str = "transform_config"
    ) -> TransformConfig | None:
        section = _optional_section(d, key)
        if section is None:
            return None
        _reject_unknown_keys(section, ("config_groups",), key)
        if "config_groups" not in section:
            raise CTRefError("required", key=_join(key, "config_groups"))
        groups_key = _join(key, "config_groups")
        groups = _mapping(section["config_groups"], groups_key)
        return cls(
            config_groups=types.MappingProxyType(
                {
                    name: TransformScheme.from_dict(scheme, _join(groups_key, name))
                    for name, scheme in groups.items()
                }
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_groups": {name: scheme.to_dict() for name, scheme in self.config_groups.items()}
        }


# ---------------------------------------------------------------------------------------------
# QuantizationConfig (§1.1, §1.2)


def _moe_sparsity(value: Any, key: str) -> Mapping[str, Any] | None:
    """0.20.0's ``moe_sparsity_config``: a method and one expert count (or null) per layer."""
    if value is None:
        return None
    d = _mapping(value, key)
    _reject_unknown_keys(d, ("method", "num_experts"), key)
    for required in ("method", "num_experts"):
        if required not in d:
            raise CTRefError("required", key=_join(key, required))
    counts = d["num_experts"]
    if not isinstance(counts, (list, tuple)):
        raise CTRefError(f"must be a list, got {counts!r}", key=_join(key, "num_experts"))
    return _freeze(
        {
            "method": _choice(d["method"], MOE_SPARSITY_METHODS, _join(key, "method")),
            "num_experts": [
                _optional_int(count, f"{_join(key, 'num_experts')}[{index}]")
                for index, count in enumerate(counts)
            ],
        }
    )


def _section_dict(section: SparsityConfig | TransformConfig | None) -> dict[str, Any]:
    """Writers emit ``{}`` for an absent section."""
    return {} if section is None else section.to_dict()


def parse_version(version: str | None) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a writer version, ignoring dev/local suffixes; None when
    absent or unparseable."""
    if version is None:
        return None
    match = _VERSION_PATTERN.match(version)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return (int(major), int(minor), int(patch or 0))


@dataclass(frozen=True)
class QuantizationConfig:
    """The whole ``quantization_config`` dict; config groups keep their file order."""

    config_groups: Mapping[str, QuantScheme]
    ignore: tuple[str, ...]
    kv_cache_scheme: QuantArgs | None
    format: str | None
    quantization_status: str
    version: str | None
    quant_method: str
    global_compression_ratio: float | None
    sparsity_config: SparsityConfig | None
    transform_config: TransformConfig | None
    moe_sparsity_config: Mapping[str, Any] | None

    @classmethod
    def from_dict(cls, qc: Mapping[str, Any]) -> QuantizationConfig:
        """Parse a ``quantization_config`` dict; unknown top-level keys are ignored (§1.2)."""
        qc = _mapping(qc, "quantization_config")
        if "config_groups" not in qc:
            raise CTRefError("required", key="config_groups")
        groups = _mapping(qc["config_groups"], "config_groups")
        ratio = qc.get("global_compression_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise CTRefError(
                f"must be a number or null, got {ratio!r}", key="global_compression_ratio"
            )
        return cls(
            config_groups=types.MappingProxyType(
                {
                    name: _config_group(_str(name, "config_groups"), value, f"config_groups.{name}")
                    for name, value in groups.items()
                }
            ),
            ignore=_optional_str_tuple(qc.get("ignore"), "ignore"),
            kv_cache_scheme=_optional_args(qc.get("kv_cache_scheme"), "kv_cache_scheme"),
            format=_optional_str(qc.get("format", "fakequant"), "format"),
            quantization_status=_choice(
                qc.get("quantization_status", "initialized"),
                QUANTIZATION_STATUSES,
                "quantization_status",
            ),
            version=_optional_str(qc.get("version"), "version"),
            quant_method=_choice(
                qc.get("quant_method", "compressed-tensors"), QUANT_METHODS, "quant_method"
            ),
            global_compression_ratio=None if ratio is None else float(ratio),
            sparsity_config=SparsityConfig.from_dict(qc.get("sparsity_config")),
            transform_config=TransformConfig.from_dict(qc.get("transform_config")),
            moe_sparsity_config=_moe_sparsity(qc.get("moe_sparsity_config"), "moe_sparsity_config"),
        )

    @classmethod
    def from_model_config(
        cls, config_json: Mapping[str, Any], source: str = "config.json"
    ) -> QuantizationConfig:
        """Find the section where 0.20.0's ``get_quantization_config`` looks, in order (§1.1)."""
        text_config = config_json.get("text_config")
        candidates = (
            config_json.get("quantization_config"),
            text_config.get("quantization_config") if isinstance(text_config, Mapping) else None,
            config_json.get("compression_config"),
        )
        qc = next((candidate for candidate in candidates if candidate is not None), None)
        if qc is None:
            raise CTRefError(
                "no quantization_config, text_config.quantization_config or compression_config",
                file=source,
            )
        try:
            return cls.from_dict(qc)
        except CTRefError as error:
            raise error.located(file=source) from error

    @classmethod
    def load(cls, path: str | Path) -> QuantizationConfig:
        """Read a checkpoint directory's ``config.json`` (or the file itself)."""
        path = Path(path)
        config_path = path / "config.json" if path.is_dir() else path
        try:
            config_json = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CTRefError("file not found", file=str(config_path)) from None
        except json.JSONDecodeError as error:
            raise CTRefError(f"not valid JSON ({error})", file=str(config_path)) from None
        if not isinstance(config_json, Mapping):
            raise CTRefError("must hold a JSON object", file=str(config_path))
        return cls.from_model_config(config_json, source=str(config_path))

    @property
    def version_tuple(self) -> tuple[int, int, int] | None:
        """``(major, minor, patch)`` of the writer, ignoring dev/local suffixes; None if unknown."""
        return parse_version(self.version)

    @property
    def packing_layout_known(self) -> bool:
        """False when ``version`` cannot say which sub-byte packing the writer used.

        That is: no parseable version, or a development build between 0.17.1 and 0.18.0
        (``0.17.2.devN+g…``), whose commit may predate or follow the switch to dense packing.
        """
        version = self.version_tuple
        if version is None:
            return False
        in_switch_window = (0, 17, 1) < version < _DENSE_PACKING_SINCE
        return not (in_switch_window and ".dev" in (self.version or ""))

    @property
    def packing_layout(self) -> str:
        """``dense`` bit stream (≥0.18.0 writers) or ``legacy`` whole fields per word (§0 #3).

        Without a version this says ``dense`` (today's writers), but ``packing_layout_known`` is
        False: 3/5/6/7-bit data must then be refused, as the two layouts differ only there.
        """
        version = self.version_tuple
        if version is not None and version < _DENSE_PACKING_SINCE:
            return "legacy"
        return "dense"

    def to_dict(self) -> dict[str, Any]:
        """The section as ``update_config`` writes it (0.20.0 envelope plus every field)."""
        version = {} if self.version is None else {"version": self.version}
        return {
            **version,
            "quant_method": self.quant_method,
            "sparsity_config": _section_dict(self.sparsity_config),
            "transform_config": _section_dict(self.transform_config),
            "config_groups": {name: group.to_dict() for name, group in self.config_groups.items()},
            "kv_cache_scheme": _optional_args_dict(self.kv_cache_scheme),
            "format": self.format,
            "quantization_status": self.quantization_status,
            "global_compression_ratio": self.global_compression_ratio,
            "ignore": list(self.ignore),
            "moe_sparsity_config": _thaw(self.moe_sparsity_config),
        }
