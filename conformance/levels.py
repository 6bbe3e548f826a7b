"""The five conformance levels as plain functions: an engine's answers against the reference's.

Each ``check_*`` takes the backend's loaded checkpoint and the case, records what it measured
(``record(measured=..., bound=...)``, kept on pass and fail) and raises
:class:`~conformance.results.ConformanceFailure` naming every module that is wrong and how.
The test modules ``conformance/test_<level>.py`` are one-line wrappers around these; the project's
own tests call them directly with deliberately broken backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import ctref
from conformance import arch, oracle
from conformance.backends.base import (
    Backend,
    LoadedCheckpoint,
    NotSupported,
    ResolvedModule,
)
from conformance.cases import Case
from conformance.results import ConformanceFailure
from ctref import tolerance
from ctref.config import QuantArgs, QuantScheme

Record = Callable[..., None]
PROBE_COLUMNS = 1024
"""One-hot probe rows per layer at most: every column up to this K, an even spread beyond."""


_REFERENCES: dict[Path, ctref.Checkpoint] = {}


def reference(case: Case) -> ctref.Checkpoint:
    """ctref's reading of a case checkpoint, with the fixture's module classes (opened once
    per process)."""
    if case.directory not in _REFERENCES:
        _REFERENCES[case.directory] = ctref.open_checkpoint(
            case.directory, module_classes=case.module_classes
        )
    return _REFERENCES[case.directory]


def _fail(problems: Sequence[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConformanceFailure(f"{what}:\n  {shown}{more}")


def _not_supported(refusals: Mapping[str, str]) -> None:
    if refusals:
        name, reason = next(iter(refusals.items()))
        others = f" (and {len(refusals) - 1} more modules)" if len(refusals) > 1 else ""
        raise NotSupported(f"{name}: {reason}{others}")


# ---------------------------------------------------------------------------------------------
# a. config


def args_key(args: QuantArgs | None, *, activation: bool = False) -> str:
    """One quantization-args block as the words the expected tables use (``int4 group128 asym``)."""
    if args is None:
        return "none"
    shape = args.strategy
    if args.strategy in ("group", "tensor_group"):
        shape += str(args.group_size)
    elif args.strategy == "block":
        shape += "{}x{}".format(*args.block_structure)
    words = [f"{args.type}{args.num_bits}", shape, "sym" if args.symmetric else "asym"]
    if args.scale_dtype == torch.uint8:
        words.append("e8m0")
    if args.actorder == "group":
        words.append("g_idx")
    if activation:
        words.append({True: "dynamic", False: "static", "local": "local"}[args.dynamic])
    return " ".join(words)


def scheme_key(scheme: QuantScheme | None) -> str:
    """``W <weights> | A <input activations>`` (``| O <outputs>`` when quantized): the key of
    the expected tables, e.g. ``W int8 channel sym | A int8 token sym dynamic``."""
    if scheme is None:
        return "unquantized"
    key = f"W {args_key(scheme.weights)} | A {args_key(scheme.input_activations, activation=True)}"
    if scheme.output_activations is not None:
        key += f" | O {args_key(scheme.output_activations, activation=True)}"
    return key


def expected_label(
    table: str, scheme: QuantScheme | None, fmt: str | None = None, sparsity: str | None = None
) -> str | None:
    """The label ``conformance/expected/<table>.toml`` expects for a module's scheme, format and
    sparsity format (rows and their restrictions: :func:`conformance.arch.expected_label`);
    None means refuse (also for schemes it lacks)."""
    return arch.expected_label(table, scheme_key(scheme), fmt=fmt, sparsity=sparsity)


def _engine_scheme(resolved: ResolvedModule, module: str) -> QuantScheme | None:
    if resolved.scheme is None:
        return None
    fields = {k: v for k, v in resolved.scheme.items() if k in QuantScheme.KEYS and k != "format"}
    return QuantScheme.from_dict({"targets": [module], **fields}, key=module)


def check_config(backend: Backend, loaded: LoadedCheckpoint, case: Case, record: Record) -> None:
    """Level a: the scheme (and format, or enum label) the engine resolved for every module.

    What changes the numbers is compared (the scheme key: types, bits, strategies, symmetry,
    dynamic), not calibration details such as observers. For an engine with a scheme enum, the
    label must be the table's; a module it refuses (no label) where the table has one is
    not-supported, a label where the table says refuse is a wrong mapping.
    """
    expected = {info.name: info for info in reference(case).modules()}
    resolved = loaded.modules()
    problems: list[str] = []
    refusals: dict[str, str] = {}
    for name, info in expected.items():
        got = resolved.get(name)
        if got is None:
            problems.append(f"{name}: the engine does not report this module ({scheme_key(info.scheme)})")
            continue
        if backend.scheme_table is not None:
            want = expected_label(backend.scheme_table, info.scheme, info.format, info.sparsity_format)
            if got.label is None and want is not None:
                refusals[name] = f"the engine refuses '{scheme_key(info.scheme)}' (the table has {want})"
            elif got.label != want:
                wanted = "a refusal" if want is None else repr(want)
                problems.append(
                    f"{name}: scheme '{scheme_key(info.scheme)}' maps to {wanted} in "
                    f"expected/{backend.scheme_table}.toml, the engine chose {got.label!r}"
                )
            continue
        engine_scheme = _engine_scheme(got, name)
        if scheme_key(engine_scheme) != scheme_key(info.scheme):
            problems.append(
                f"{name}: the engine resolved '{scheme_key(engine_scheme)}', the checkpoint "
                f"says '{scheme_key(info.scheme)}' (group {info.group})"
            )
        if info.scheme is not None and got.format is not None and got.format != info.format:
            problems.append(f"{name}: the engine decodes format {got.format!r}, the checkpoint's is {info.format!r}")
    for name in sorted(resolved.keys() - expected.keys()):
        problems.append(f"{name}: the engine reports a module the checkpoint does not hold")
    record(measured={"modules": len(expected), "wrong": len(problems), "refused": len(refusals)})
    _fail(problems, "the engine resolved modules differently from the checkpoint's config")
    _not_supported(refusals)


# ---------------------------------------------------------------------------------------------
# b. inventory


def check_inventory(loaded: LoadedCheckpoint, case: Case, record: Record) -> None:
    """Level b: every tensor consumed or deliberately ignored, none invented, no parameter left
    at its initial value."""
    names = set(reference(case).tensor_names())
    inventory = loaded.inventory()
    ignored = set(inventory.ignored)
    problems = [f"{n}: consumed, but the checkpoint holds no such tensor (invented)" for n in sorted(inventory.consumed - names)]
    problems += [f"{n}: listed as ignored, but the checkpoint holds no such tensor" for n in sorted(ignored - names)]
    problems += [f"{n}: neither consumed nor deliberately ignored (silently dropped)" for n in sorted(names - inventory.consumed - ignored)]
    problems += [f"{n}: both consumed and ignored" for n in sorted(inventory.consumed & ignored)]
    problems += [f"{n}: engine parameter left at its initial value (no checkpoint tensor set it)" for n in sorted(inventory.uninitialized)]
    record(
        measured={
            "tensors": len(names),
            "consumed": len(inventory.consumed & names),
            "ignored": {n: inventory.ignored[n] for n in sorted(ignored & names)},
            "problems": len(problems),
        }
    )
    _fail(problems, "the engine's use of the checkpoint's tensors is incomplete or invented")


# ---------------------------------------------------------------------------------------------
# c. weights


def check_weights(loaded: LoadedCheckpoint, case: Case, record: Record) -> None:
    """Level c: the engine's effective dense weight of every module equals ctref's, bit for bit
    (same dtype) or within the ULP budget of ``tolerances.toml`` (another dtype)."""
    checkpoint = reference(case)
    problems: list[str] = []
    refusals: dict[str, str] = {}
    worst: tuple[float, str] = (0.0, "")
    for info in checkpoint.modules():
        expected = case.stored_dense(info.name)
        if expected is None:
            expected = checkpoint.dequantize(info.name)
        try:
            actual = loaded.effective_weight(info.name)
        except NotSupported as refusal:
            refusals[info.name] = str(refusal)
            continue
        if not actual.dtype.is_floating_point or actual.dtype.itemsize == 1:
            problems.append(
                f"{info.name} ({info.format}): the engine's weight is {_short(actual.dtype)} "
                f"{tuple(actual.shape)}, stored codes rather than a dense weight"
            )
            continue
        if tuple(actual.shape) != tuple(expected.shape):
            problems.append(f"{info.name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
            continue
        error = tolerance.weight_error(actual, expected)
        worst = max(worst, (error.max_ulp if error.nonfinite == 0 else float("inf"), info.name))
        if not error.passed:
            dtypes = f"{_short(actual.dtype)} vs reference {_short(expected.dtype)}"
            hints = "".join(f"; {hint}" for hint in mismatch_pattern(actual, expected))
            problems.append(f"{info.name} ({info.format}, {dtypes}): {error.describe()}{hints}")
    budget = float(tolerance.policy()["weights"]["ulp_budget"])
    record(
        measured={"max_ulp": worst[0], "worst_module": worst[1], "wrong_modules": len(problems)},
        bound={"ulp": f"0 in the reference's dtype, {budget:g} ULP of the coarser dtype otherwise"},
    )
    _fail(problems, "effective weights differ from the reference's dense weights")
    _not_supported(refusals)


def mismatch_pattern(actual: torch.Tensor, expected: torch.Tensor) -> list[str]:
    """What the differing elements of a 2-D weight have in common: where they are, whether the
    rows hold the right values in another order, whether they are off by one factor."""
    if actual.dim() != 2:
        return []
    a, e = actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    differs = (a != e) & ~(torch.isnan(a) & torch.isnan(e))
    rows = differs.any(dim=1).nonzero().flatten()
    cols = differs.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return []
    hints = [
        (
            f"differences in rows {int(rows.min())}..{int(rows.max())} ({rows.numel()} of "
            f"{a.shape[0]}), columns {int(cols.min())}..{int(cols.max())} ({cols.numel()} of "
            f"{a.shape[1]})"
        )
    ]
    if torch.equal(a.sort(dim=1).values, e.sort(dim=1).values):
        hints.append("every row holds the reference's values in another order (element layout or nibble order)")
    ratio = a[differs & (e != 0)] / e[differs & (e != 0)]
    if ratio.numel() and torch.isfinite(ratio).all() and float(ratio.max() - ratio.min()) <= 1e-2 * float(ratio.abs().max()):
        hints.append(f"every differing element is the reference times {float(ratio.mean()):.6g} (a scale applied wrongly)")
    return hints


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# d. layer


def probe_inputs(
    in_features: int, dtype: torch.dtype, magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """One-hot rows: through the kernel they read back the effective weight column by column
    (every column up to :data:`PROBE_COLUMNS`, then an even spread that keeps both edges).

    ``magnitudes`` (K,) sets each column's hot value; a static scheme's own input scale makes
    the value quantize to the code 1 exactly, in any precision.
    """
    columns = torch.arange(in_features)
    if in_features > PROBE_COLUMNS:
        columns = torch.linspace(0, in_features - 1, PROBE_COLUMNS).round().long().unique()
    probe = torch.zeros(len(columns), in_features, dtype=dtype)
    hot = 1.0 if magnitudes is None else magnitudes.to(dtype)[columns]
    probe[torch.arange(len(columns)), columns] = hot
    return probe


def _probe_magnitudes(checkpoint: ctref.Checkpoint, module: str, in_features: int) -> torch.Tensor | None:
    """Per-column stored input scales of a static scheme (tensor or group), else None."""
    args = oracle.input_args(checkpoint, module)
    scale = oracle.input_params(checkpoint, module).get("input_scale")
    if args is None or args.dynamic or scale is None:
        return None
    flat = scale.flatten()
    if flat.numel() == 1:
        return flat.expand(in_features)
    return flat.repeat_interleave(args.group_size)[:in_features]


def linear_modules(checkpoint: ctref.Checkpoint) -> list[ctref.ModuleInfo]:
    """Modules a layer test drives: 2-D weights of modules taken as ``Linear``."""
    return [
        info
        for info in checkpoint.modules()
        if len(info.weight_shape) == 2 and "Linear" in checkpoint.class_names(info.name)
    ]


def check_layer(loaded: LoadedCheckpoint, case: Case, record: Record) -> None:
    """Level d: the engine's kernel output against the reference layer output, within the
    tolerance policy's bound for the engine's output dtype, on three inputs per module: the
    case's inputs (against its stored outputs), inputs on the activation grid (where the scheme
    quantizes activations dynamically: exact for any correct quantizer, so the bound is tight),
    and one-hot probes (the effective weight read back through the kernel, column by column)."""
    checkpoint = reference(case)
    problems: list[str] = []
    refusals: dict[str, str] = {}
    worst: dict[str, Any] = {"ratio": 0.0}
    for info in linear_modules(checkpoint):
        weight = checkpoint.dequantize(info.name)
        input_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        args = oracle.input_args(checkpoint, info.name)
        inputs = case.layer_inputs(info.name, info.weight_shape[-1], input_dtype)
        runs = [("inputs", inputs, args is None)]
        grid = oracle.grid_inputs(args, inputs)
        if grid is not None:
            runs.append(("grid", grid, True))
        magnitudes = _probe_magnitudes(checkpoint, info.name, info.weight_shape[-1])
        probe = probe_inputs(info.weight_shape[-1], input_dtype, magnitudes)
        runs.append(("probe", probe, True))
        for label, x, aligned in runs:
            try:
                actual = loaded.linear(info.name, x)
            except NotSupported as refusal:
                refusals[info.name] = str(refusal)
                break
            exact, gap32 = oracle.layer_reference(checkpoint, info.name, x, weight)
            stored = case.stored_output(info.name) if label == "inputs" else None
            expected = stored if stored is not None else exact
            if tuple(actual.shape) != tuple(expected.shape):
                problems.append(f"{info.name} [{label}]: output shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
                continue
            bound = oracle.layer_bound(
                checkpoint, info.name, x, _compute_dtype(actual), weight, gap32, grid_aligned=aligned
            )
            error = tolerance.output_error(actual, expected, x, weight)
            ratio = max(error.rel_frobenius / bound.rel_frobenius, error.max_normalized / bound.max_normalized)
            if ratio >= worst["ratio"]:
                worst = {
                    "ratio": ratio,
                    "module": info.name,
                    "inputs": label,
                    "rel_frobenius": error.rel_frobenius,
                    "max_normalized": error.max_normalized,
                    "bound": bound.to_dict(),
                }
            for violation in bound.violations(error):
                problems.append(f"{info.name} [{label}, {bound.compute_dtype}]: {violation}")
    bound_of_worst = worst.pop("bound", {})
    record(measured=worst, bound=bound_of_worst)
    _fail(problems, "layer outputs differ from the reference beyond the tolerance policy")
    _not_supported(refusals)


def _compute_dtype(output: torch.Tensor) -> torch.dtype:
    """The bound row is the engine's output dtype (the dtype it computed in)."""
    if output.dtype not in tolerance.COMPUTE_DTYPES:
        raise ConformanceFailure(f"the engine returned {output.dtype}; a layer output is a float tensor")
    return output.dtype


# ---------------------------------------------------------------------------------------------
# e. model


def check_model(loaded: LoadedCheckpoint, case: Case, record: Record) -> None:
    """Level e: logits of the model-level fixture against the reference model built from
    ctref's weights (:func:`conformance.oracle.reference_model`), within ``[model]`` of the
    tolerance table."""
    checkpoint = reference(case)
    input_ids = case.input_ids()
    actual = loaded.logits(input_ids)
    expected = _reference_logits(case, torch.float64)
    if tuple(actual.shape) != tuple(expected.shape):
        raise ConformanceFailure(f"logits shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    dtype = _compute_dtype(actual)
    gap32 = tolerance.logits_error(_reference_logits(case, torch.float32), expected).rel_frobenius
    layers, widest = _activation_terms(checkpoint, case, dtype)
    bound = tolerance.model_bound(dtype, gap32, quantized_layers=layers, widest_activation_term=widest)
    error = tolerance.logits_error(actual, expected)
    record(
        measured={"rel_frobenius": error.rel_frobenius, "max_abs_rms": error.max_abs_rms},
        bound=bound.to_dict(),
    )
    _fail(bound.violations(error), "logits differ from the reference model's beyond the tolerance policy")


_LOGITS: dict[tuple[Path, torch.dtype], torch.Tensor] = {}


def _reference_logits(case: Case, dtype: torch.dtype) -> torch.Tensor:
    key = (case.directory, dtype)
    if key not in _LOGITS:
        _LOGITS[key] = oracle.reference_logits(reference(case), case.input_ids(), dtype)
    return _LOGITS[key]


def _activation_terms(checkpoint: ctref.Checkpoint, case: Case, dtype: torch.dtype) -> tuple[int, float]:
    """How many modules quantize activations, and the largest term one adds beyond plain
    rounding (operands, flips; measured on the fixture's inputs of each module, against a
    reference that quantizes in float64)."""
    terms = []
    for info in linear_modules(checkpoint):
        args = oracle.input_args(checkpoint, info.name)
        if args is None:
            continue
        weight = checkpoint.dequantize(info.name)
        inputs = case.layer_inputs(info.name, info.weight_shape[-1], weight.dtype)
        model = tolerance.layer_bound(
            args, dtype, inputs, weight,
            input_scale=oracle.input_params(checkpoint, info.name).get("input_scale"),
        ).model
        terms.append(model.operand_rounding + model.activation_flips + model.scale_flips)
    return len(terms), max(terms, default=0.0)
