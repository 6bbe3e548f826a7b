"""The checkpoint linter behind ``ctref verify``, and the tensor accounting ``inspect`` shares.

Every tensor of a checkpoint is accounted for (:func:`account`): it stores a module's weight in
that module's format (the format's ``expected_tensors``), is a bias, an activation or KV-cache
parameter (:mod:`ctref.activations`), an online-transform permutation, a quantization parameter
the module's format does not use (*unused*), or none of these (*unknown*).

:func:`verify_checkpoint` then collects findings, never stopping at the first:

* structure, from headers: each module's storage tensors present with the format's dtype and
  shape, activation parameters the scheme needs present and no others, nothing unused;
* numbers, streaming module by module: the format's own decode (which raises on codes or zero
  points out of range, NaN/Inf scales, a ``g_idx`` that is no valid group assignment, shapes it
  refuses), then scales positive and no NaN/Inf in the dense weight or bias.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctref.activations import ATTENTION_PARAMS, LINEAR_PARAMS, linear_expectations
from ctref.checkpoint import INDEX_SUFFIX, Checkpoint, ModuleInfo, root_tensor
from ctref.errors import CTRefError
from ctref.formats import get_format
from ctref.formats.base import TensorSpec
from ctref.headers import ShardHeader, index_disagreements

__all__ = [
    "ACTIVATION_NAMES",
    "QPARAM_NAMES",
    "Accounting",
    "Finding",
    "account",
    "index_findings",
    "module_tensors",
    "resolve_modules",
    "storage_specs",
    "verify_checkpoint",
]

ACTIVATION_NAMES = frozenset(LINEAR_PARAMS) | frozenset(ATTENTION_PARAMS)
"""Local names of activation and attention (KV-cache) parameters (§4, §1.7)."""

QPARAM_NAMES = frozenset(
    {
        "weight_packed",
        "weight_shape",
        "weight_scale",
        "weight_zero_point",
        "weight_global_scale",
        "weight_g_idx",
        "compressed",
        "bitmask",
        "row_offsets",
        "meta",
        "scale_packed",
    }
)
"""Local names that only ever hold a compressed weight's storage (§3); found where a module's
format does not store them, they are unused leftovers."""


@dataclass(frozen=True)
class Finding:
    """One problem: where (file, tensor), what rule it breaks, and which check found it.

    ``error`` findings make ``ctref verify`` exit 1; ``warning`` findings (tensors the reader
    passes through without knowing them, leftovers on unquantized modules) are reported only.
    """

    check: str
    rule: str
    file: str | None = None
    tensor: str | None = None
    severity: str = "error"

    @classmethod
    def from_error(cls, check: str, error: CTRefError, severity: str = "error") -> Finding:
        rule = f"{error.key}: {error.rule}" if error.key else error.rule
        return cls(check, rule, error.file, error.tensor, severity)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.tensor) if part)
        return f"{self.severity}: {where}: {self.rule} [{self.check}]"


def resolve_modules(
    checkpoint: Checkpoint, names: Sequence[str]
) -> tuple[list[ModuleInfo], list[CTRefError]]:
    """Every weight-bearing module the reader resolves, and the error of each it cannot.

    ``names`` are the checkpoint's tensor names (``checkpoint.tensor_names()``, which sorts, so
    callers list them once).
    """
    infos, errors = [], []
    for module, local in _by_module(names).items():
        if root_tensor(local) is None:
            continue
        try:
            infos.append(checkpoint.module_info(module))
        except CTRefError as error:
            errors.append(error)
    return infos, errors


def module_tensors(info: ModuleInfo) -> dict[str, str]:
    """A module's tensors: local name → full name."""
    return {name[len(info.name) + 1 :]: name for name in info.tensor_names}


def storage_specs(checkpoint: Checkpoint, info: ModuleInfo) -> list[TensorSpec]:
    """The tensors that store the module's weight, as its format(s) define them.

    A sparse module stores its (possibly quantized) codes in ``compressed``, so the quantization
    format's ``weight`` is replaced by the sparse format's tensors.
    """
    layout = checkpoint.config.packing_layout
    args = info.scheme.weights if info.scheme is not None else None
    specs = get_format(info.format).expected_tensors(args, info.weight_shape, layout=layout)
    if info.sparsity_format is None:
        return specs
    sparse = get_format(info.sparsity_format).expected_tensors(
        None, info.weight_shape, layout=layout
    )
    return [spec for spec in specs if spec.name != "weight"] + sparse


def _quantized(info: ModuleInfo) -> bool:
    return info.format != "dense" or info.sparsity_format is not None


@dataclass(frozen=True)
class Accounting:
    """What each tensor of the checkpoint is for (see the module docstring)."""

    storage: Mapping[str, str]
    """Storage tensor → its module."""
    specs: Mapping[str, Sequence[TensorSpec]]
    """Module → its storage specs."""
    bias: frozenset[str]
    activation: frozenset[str]
    transform: frozenset[str]
    unused: Mapping[str, str]
    """Unused quantization tensor → why it is unused."""
    unknown: frozenset[str]
    errors: Sequence[CTRefError]
    """Specs a format cannot give for a module."""

    def role(self, name: str) -> str:
        """``storage``, ``bias``, ``activation``, ``transform``, ``unused`` or ``unknown``."""
        if name in self.storage:
            return "storage"
        for role, names in (
            ("bias", self.bias),
            ("activation", self.activation),
            ("transform", self.transform),
            ("unused", self.unused),
        ):
            if name in names:
                return role
        return "unknown"


def account(
    checkpoint: Checkpoint, infos: Iterable[ModuleInfo], names: Sequence[str]
) -> Accounting:
    """Sort every tensor (``names``) into storage, bias, activation, transform, unused or
    unknown. Tensors of weight-bearing modules the reader cannot resolve are left out: the
    resolution error already covers them."""
    storage: dict[str, str] = {}
    specs: dict[str, list[TensorSpec]] = {}
    bias, activation, transform, unknown = set(), set(), set(), set()
    unused: dict[str, str] = {}
    errors: list[CTRefError] = []
    resolved = {info.name: info for info in infos}
    transform_modules = _transform_module_names(checkpoint)
    for module, local_names in _by_module(names).items():
        info = resolved.get(module)
        if info is None and root_tensor(local_names) is not None:
            continue
        stored: frozenset[str] = frozenset()
        if info is not None:
            try:
                specs[module] = storage_specs(checkpoint, info)
            except CTRefError as error:
                errors.append(error.located(file=info.file, module=module))
                specs[module] = []
            stored = frozenset(spec.name for spec in specs[module])
        for local, name in local_names.items():
            if local in stored:
                storage[name] = module
            elif info is not None and local == "bias":
                bias.add(name)
            elif local in ACTIVATION_NAMES:
                activation.add(name)
            elif module.rpartition(".")[2] in transform_modules:
                transform.add(name)
            elif local in QPARAM_NAMES:
                unused[name] = _why_unused(info, local)
            else:
                unknown.add(name)
    return Accounting(
        storage=storage,
        specs=specs,
        bias=frozenset(bias),
        activation=frozenset(activation),
        transform=frozenset(transform),
        unused=unused,
        unknown=frozenset(unknown),
        errors=errors,
    )


def _by_module(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Module prefix → {local name: full name}, in the order of ``names``."""
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, local = name.rpartition(".")
        modules.setdefault(module, {})[local] = name
    return modules


def _why_unused(info: ModuleInfo | None, local: str) -> str:
    if info is None:
        return "a quantization tensor of a module that stores no weight"
    if not _quantized(info):
        return (
            f"the module is unquantized (format 'dense'), so its weight is stored as is and "
            f"{local} is a leftover the reader ignores"
        )
    return (
        f"format '{info.format}' with these quantization args stores no {local}; "
        "the reader ignores it"
    )


def _transform_module_names(checkpoint: Checkpoint) -> frozenset[str]:
    """Last name components of online transform submodules, ``<scheme>_<location>`` (§1.9)."""
    transforms = checkpoint.config.transform_config
    if transforms is None:
        return frozenset()
    return frozenset(
        f"{name}_{args.location}"
        for name, scheme in transforms.config_groups.items()
        for args in scheme.apply
    )


# ---------------------------------------------------------------------------------------------
# The linter


def verify_checkpoint(
    checkpoint: Checkpoint,
    *,
    numeric: bool = True,
    device: str | None = None,
    on_module: Callable[[ModuleInfo], None] | None = None,
) -> list[Finding]:
    """All findings for an open checkpoint, in a stable order (file, then tensor).

    ``numeric=False`` stops after the structural checks (headers, plus the small activation
    scales). A module with a structural finding is not decoded: its decode would only repeat
    it. ``on_module`` is called after each module's numeric pass (progress reporting).
    """
    names = checkpoint.tensor_names()
    infos, errors = resolve_modules(checkpoint, names)
    findings = [Finding.from_error("module", error) for error in errors]
    accounting = account(checkpoint, infos, names)
    findings += [Finding.from_error("format", error) for error in accounting.errors]
    broken = {module for module, specs in accounting.specs.items() if not specs}
    for info in infos:
        structural = _check_storage(checkpoint, info, accounting.specs[info.name])
        if structural:
            broken.add(info.name)
        findings += structural
    findings += _check_leftovers(checkpoint, infos, accounting)
    findings += _check_activations(checkpoint, infos, accounting, names)
    if numeric:
        for info in infos:
            if info.name not in broken:
                findings += _check_numbers(checkpoint, info, accounting.specs[info.name], device)
            if on_module is not None:
                on_module(info)
    return sorted(findings, key=lambda f: (f.file or "", _natural(f.tensor or ""), f.check))


def index_findings(directory: Path, shards: Mapping[str, ShardHeader]) -> list[Finding]:
    """Every disagreement between the checkpoint's index and its shards' headers.

    The reader refuses a checkpoint at the first disagreement; the linter lists them all.
    ``shards`` holds the headers of the directory's ``*.safetensors`` files. An index that is
    absent, ambiguous or not a weight map yields nothing here (opening reports it).
    """
    indexes = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) != 1:
        return []
    try:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        return []
    indexed = set(weight_map.values())
    named = {file: header for file, header in shards.items() if file in indexed}
    problems = index_disagreements(indexes[0].name, weight_map, named)
    return [Finding.from_error("index", problem) for problem in problems]


def _check_storage(
    checkpoint: Checkpoint, info: ModuleInfo, specs: Sequence[TensorSpec]
) -> list[Finding]:
    """Each storage tensor the format needs is there, with one of its dtypes and its shape."""
    stored = module_tensors(info)
    what = f"format '{info.format}'" + (f" (config group '{info.group}')" if info.group else "")
    findings = []
    for spec in specs:
        name = f"{info.name}.{spec.name}"
        if spec.name not in stored:
            if spec.required:
                findings.append(
                    Finding(
                        "missing", f"{what} stores this tensor, but it is absent", info.file, name
                    )
                )
            continue
        header = checkpoint.header(name)
        if header.dtype not in spec.dtypes:
            allowed = " or ".join(_dtype_str(d) for d in spec.dtypes)
            findings.append(
                Finding(
                    "dtype",
                    f"{what} stores it as {allowed}, found {header.describe_dtype()}",
                    header.file,
                    name,
                )
            )
        if spec.shape is not None and header.shape != tuple(spec.shape):
            findings.append(
                Finding(
                    "shape",
                    f"{what} stores it with shape {tuple(spec.shape)} for a weight "
                    f"{tuple(info.weight_shape)}, found {header.shape}",
                    header.file,
                    name,
                )
            )
    return findings


def _check_leftovers(
    checkpoint: Checkpoint, infos: Sequence[ModuleInfo], accounting: Accounting
) -> list[Finding]:
    """Unused quantization tensors (errors on quantized modules) and unknown tensors."""
    quantized = {info.name for info in infos if _quantized(info)}
    findings = []
    for name, why in accounting.unused.items():
        severity = "error" if name.rpartition(".")[0] in quantized else "warning"
        findings.append(Finding("unused", why, checkpoint.header(name).file, name, severity))
    for name in accounting.unknown:
        findings.append(
            Finding(
                "unknown",
                "not part of any module's weight, bias or quantization; passed through unchanged",
                checkpoint.header(name).file,
                name,
                "warning",
            )
        )
    return findings


def _check_activations(
    checkpoint: Checkpoint,
    infos: Sequence[ModuleInfo],
    accounting: Accounting,
    names: Sequence[str],
) -> list[Finding]:
    """Activation and KV-cache parameters: the scheme's are present and valid, no others.

    Asked of attention modules, of modules storing such parameters, and of modules whose scheme
    stores some; the others have nothing to check.
    """
    modules = {info.name: info for info in infos}
    candidates = set(checkpoint.attention_modules())
    candidates |= {name.rpartition(".")[0] for name in accounting.activation}
    candidates |= {
        info.name
        for info in infos
        if info.scheme is not None
        and linear_expectations(info.scheme, info.weight_shape, f"config_groups.{info.group}")
    }
    files = _first_files(checkpoint, names)
    consumed_elsewhere: set[str] = set()
    findings = []
    for module in sorted(candidates, key=_natural):
        try:
            params = checkpoint.activation_params(module)
        except CTRefError as error:
            findings.append(Finding.from_error("activation", error))
            continue
        consumed_elsewhere |= {f"{module}.{legacy}" for legacy in params.legacy.values()}
        file = modules[module].file if module in modules else files.get(module)
        for local, reason in params.missing.items():
            findings.append(Finding("missing", f"absent, but {reason}", file, f"{module}.{local}"))
        for local in params.unexpected:
            name = f"{module}.{params.legacy.get(local, local)}"
            findings.append(
                Finding(
                    "unused",
                    "stored, but the config quantizes no such activation for this module; "
                    "the reader ignores it",
                    checkpoint.header(name).file,
                    name,
                )
            )
    return [f for f in findings if not (f.check == "unused" and f.tensor in consumed_elsewhere)]


def _first_files(checkpoint: Checkpoint, names: Sequence[str]) -> dict[str, str]:
    """Each module prefix → the shard of its first tensor or first descendant's (an attention
    module often stores nothing itself)."""
    files: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts)):
            files.setdefault(".".join(parts[:end]), checkpoint.header(name).file)
    return files


def _check_numbers(
    checkpoint: Checkpoint, info: ModuleInfo, specs: Sequence[TensorSpec], device: str | None
) -> list[Finding]:
    """Decode the module, which applies the format's own checks (codes and zero points in
    range, finite scales, a valid ``g_idx``, shapes), then the checks decoding does not make:
    NaN/Inf in the dense weight and bias, scales that are zero or negative."""
    try:
        weight = checkpoint.dequantize(info.name, device)
    except CTRefError as error:
        return [Finding.from_error("decode", error)]
    stored = module_tensors(info)
    root = stored[root_tensor(stored)]
    findings = _non_finite(weight, "the dense weight", info.file, root)
    del weight
    if "bias" in stored:
        bias = checkpoint.read(stored["bias"], device)
        findings += _non_finite(
            bias, "the bias", checkpoint.header(stored["bias"]).file, stored["bias"]
        )
    if _quantized(info):
        for spec in specs:
            if spec.name in stored and (spec.name.endswith("scale") or spec.name == "scale_packed"):
                findings += _non_positive(checkpoint, stored[spec.name])
    return findings


def _non_finite(tensor: torch.Tensor, what: str, file: str | None, name: str) -> list[Finding]:
    if not tensor.is_floating_point():
        return []
    bad = int((~torch.isfinite(tensor)).sum())
    if not bad:
        return []
    return [Finding("finite", f"{what} holds {bad} NaN/Inf values", file, name)]


def _non_positive(checkpoint: Checkpoint, name: str) -> list[Finding]:
    """Float scales must be > 0 (E8M0 uint8 scales are powers of two, positive by encoding)."""
    scale = checkpoint.read(name)
    if not scale.is_floating_point():
        return []
    bad = int((scale.to(torch.float32) <= 0).sum())
    if not bad:
        return []
    return [
        Finding(
            "scale",
            f"holds {bad} values <= 0; a scale must be positive (an all-zero group still gets "
            f"a positive one)",
            checkpoint.header(name).file,
            name,
        )
    ]


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _natural(name: str) -> list[tuple[int, int | str]]:
    """``layers.2`` before ``layers.10``."""
    parts = []
    for part in name.replace("-", ".").split("."):
        parts.append((0, int(part)) if part.isdigit() else (1, part))
    return parts
