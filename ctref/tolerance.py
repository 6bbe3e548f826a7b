"""The tolerance policy: how far an engine's numbers may lie from the reference's, and why.

Everything numeric lives in one table, ``ctref/tolerances.toml``, with the derivation beside each
row; this module evaluates it. Three comparisons exist:

* weights (:func:`weight_error`): bit for bit in the same dtype, else within a ULP budget;
* layer outputs (:func:`layer_bound`, :func:`output_error`): a bound per activation scheme and
  compute dtype from an error model (output rounding, accumulation over K, operand rounding,
  activation-code flips), calibrated against the reference's own fp32-vs-fp64 gap
  (:func:`reference_gap`);
* model logits (:func:`model_bound`, :func:`logits_error`).

NaN or Inf in an engine's output always fails, whatever the bound.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from ctref.config import QuantArgs

__all__ = [
    "COMPUTE_DTYPES",
    "Bound",
    "ErrorModel",
    "LogitsBound",
    "LogitsError",
    "OutputError",
    "WeightError",
    "accumulation_dtype",
    "activation_family",
    "activation_step",
    "error_model",
    "layer_bound",
    "logits_error",
    "model_bound",
    "output_error",
    "policy",
    "reference_gap",
    "unit_roundoff",
    "weight_crest",
    "weight_error",
]

COMPUTE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@cache
def policy() -> Mapping[str, Any]:
    """The parsed ``tolerances.toml`` (package data)."""
    text = resources.files("ctref").joinpath("tolerances.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _dtype_row(dtype: torch.dtype) -> Mapping[str, Any]:
    name = str(dtype).removeprefix("torch.")
    rows = policy()["dtype"]
    if name not in rows:
        raise ValueError(f"no tolerance row for compute dtype {name}; known: {', '.join(rows)}")
    return rows[name]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a compute dtype (half an ULP at 1): 2^-24 for float32."""
    return float(_dtype_row(dtype)["unit_roundoff"])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype GEMMs accumulate in when computing in ``dtype`` (fp32 for bf16/fp16)."""
    return getattr(torch, _dtype_row(dtype)["accumulate"])


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class WeightError:
    """How an engine's effective weight differs from the reference's dense weight."""

    mismatches: int
    """Elements that are not bit-identical (after conversion to the engine's dtype)."""
    max_ulp: float
    """Largest difference in ULPs of the engine's dtype (0 when bit-identical)."""
    budget_ulp: float
    """0 when the dtypes agree (exact; -0.0 and +0.0 alike), else ``weights.ulp_budget``."""
    worst_index: tuple[int, ...] | None
    nonfinite: int
    worst_values: tuple[float, float] | None = None
    """(engine, reference) at ``worst_index``."""

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.max_ulp <= self.budget_ulp

    def describe(self) -> str:
        if self.nonfinite:
            return f"{self.nonfinite} NaN/Inf element(s) where the reference is finite"
        if self.mismatches == 0:
            return "bit-identical"
        engine, reference = self.worst_values or (math.nan, math.nan)
        return (
            f"{self.mismatches} element(s) differ beyond {self.budget_ulp:g} ULP; worst at "
            f"{list(self.worst_index or ())}: {engine:.6g} vs reference {reference:.6g} "
            f"({self.max_ulp:.3g} ULP)"
        )


def weight_error(actual: torch.Tensor, reference: torch.Tensor) -> WeightError:
    """Compare an engine's effective weight with ctref's dense weight.

    Same dtype: exact, bit for bit up to the sign of zero (a ULP budget of 0). Another dtype:
    each element within
    ``weights.ulp_budget`` ULPs of the coarser of the two dtypes at the reference value (an
    engine keeping a finer dtype than the format defines is held to the format's precision).
    """
    if tuple(actual.shape) != tuple(reference.shape):
        raise ValueError(f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    same_dtype = actual.dtype == reference.dtype
    budget = 0.0 if same_dtype else float(policy()["weights"]["ulp_budget"])
    actual64 = actual.detach().to("cpu", torch.float64)
    reference64 = reference.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(actual64) & torch.isfinite(reference64)).sum())
    if same_dtype:
        differs = _bits(actual.detach().cpu()) != _bits(reference.detach().cpu())
    else:
        differs = actual64 != reference64
    mismatches = int(differs.sum())
    if mismatches == 0:
        return WeightError(0, 0.0, budget, None, nonfinite)
    coarser = actual.dtype if same_dtype else max(actual.dtype, reference.dtype, key=_spacing)
    ulp = _ulp(reference64, coarser)
    ulps = torch.where(differs, (actual64 - reference64).abs() / ulp, torch.zeros_like(ulp))
    ulps = torch.nan_to_num(ulps, nan=math.inf)
    worst = int(ulps.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ulps.shape))
    values = (float(actual64.flatten()[worst]), float(reference64.flatten()[worst]))
    return WeightError(
        int((ulps > budget).sum()), float(ulps.flatten()[worst]), budget, index, nonfinite, values
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that -0.0 != 0.0 and NaN payloads count."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(width)


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value (float64 result); the smallest subnormal at 0."""
    if dtype not in _MANTISSA_BITS:
        raise ValueError(f"an engine stores effective weights as a float16/bfloat16/float32/float64, not {dtype}")
    magnitude = values.abs().clamp_min(torch.finfo(dtype).tiny)
    exponent = torch.floor(torch.log2(magnitude))
    return torch.pow(2.0, exponent - _MANTISSA_BITS[dtype])


_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _spacing(dtype: torch.dtype) -> float:
    """Relative spacing 2^-mantissa of a float dtype (larger = coarser)."""
    return 2.0 ** -_MANTISSA_BITS[dtype]


# ---------------------------------------------------------------------------------------------
# Layer outputs


@dataclass(frozen=True)
class ErrorModel:
    """The terms of the expected error, as fractions of the output scale (see the table)."""

    output_rounding: float
    accumulation: float
    operand_rounding: float
    activation_flips: float
    """The rel_frobenius activation term: rms of the flipped codes (one per row for dynamic
    symmetric ints, whose row minimum sits on a tie)."""
    activation_flips_elementwise: float
    """The max_normalized activation term (at least one flip per row allowed)."""
    scale_flips: float = 0.0
    """Activation scales rounded to a low-precision float (NVFP4's fp8 local scales) flipping a
    whole group's scale by one step: the rms of those steps."""

    @property
    def rounding(self) -> float:
        return self.output_rounding + self.accumulation + self.operand_rounding

    @property
    def frobenius(self) -> float:
        return self.rounding + self.activation_flips + self.scale_flips

    @property
    def elementwise(self) -> float:
        return self.rounding + self.activation_flips_elementwise + self.scale_flips


@dataclass(frozen=True)
class Bound:
    """What an engine computing in ``compute_dtype`` must meet on one case, and why."""

    family: str
    compute_dtype: str
    accumulation_length: int
    rel_frobenius: float
    max_normalized: float
    model: ErrorModel
    calibration: float
    """max(1, reference fp32 gap / fp32 model): > 1 means the model was widened to the data."""
    derivation: str

    def violations(self, error: OutputError) -> list[str]:
        """Human-readable reasons ``error`` fails this bound; empty when it passes."""
        if error.nonfinite:
            return [f"{error.nonfinite} NaN/Inf output element(s) (always a failure)"]
        found = []
        if not error.rel_frobenius <= self.rel_frobenius:
            found.append(
                f"relative Frobenius error {error.rel_frobenius:.3g} > bound {self.rel_frobenius:.3g}"
            )
        if not error.max_normalized <= self.max_normalized:
            found.append(
                f"max normalized error {error.max_normalized:.3g} at output "
                f"{list(error.worst_index)} > bound {self.max_normalized:.3g}"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_family(args: QuantArgs | None) -> str:
    """The table row of an input-activation scheme: none, int, fp8, fp6 or fp4."""
    if args is None:
        return "none"
    if args.type == "int":
        return "int"
    return f"fp{args.num_bits}"


def _levels(args: QuantArgs | None) -> int:
    """Largest int code, or float codes per binade (2^mantissa bits); 0 without quantization."""
    family = activation_family(args)
    if family == "none":
        return 0
    if family == "int":
        return 2 ** (args.num_bits - 1) - 1
    return 2 ** int(policy()["activation"][family]["mantissa_bits"])


def activation_step(
    inputs: torch.Tensor, args: QuantArgs | None, input_scale: torch.Tensor | None = None
) -> float:
    """The activation quantization step relative to the rms of each input row (worst row).

    Ints: ``amax / levels`` per row for dynamic schemes (a group's amax is at most its row's),
    the stored ``input_scale`` for static ones. Floats: ``2^-mantissa_bits``, the largest
    relative spacing of the element grid. 0 without input quantization.
    """
    family = activation_family(args)
    if family == "none":
        return 0.0
    if family != "int":
        return 2.0 ** -int(policy()["activation"][family]["mantissa_bits"])
    rows = inputs.detach().to(torch.float64).reshape(-1, inputs.shape[-1])
    rms = rows.pow(2).mean(dim=-1).sqrt()
    if args.dynamic or input_scale is None:
        step = rows.abs().amax(dim=-1) / _levels(args)
    else:
        step = input_scale.detach().to(torch.float64).abs().max().expand_as(rms)
    live = rms > 0
    return float((step[live] / rms[live]).max()) if bool(live.any()) else 0.0


def _flip_probability(args: QuantArgs | None, roundoff: float, grid_aligned: bool) -> float:
    levels = _levels(args)
    if levels == 0:
        return 0.0
    error_in_codes = float(policy()["policy"]["flip_factor"]) * roundoff * levels
    if grid_aligned and error_in_codes < 0.5:
        return 0.0
    return min(1.0, error_in_codes)


def error_model(
    args: QuantArgs | None,
    dtype: torch.dtype,
    accumulation_length: int,
    *,
    step: float,
    weight_crest: float,
    grid_aligned: bool = False,
    reference_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
) -> ErrorModel:
    """The error model of one row of the table for a GEMM of length K (see the table's header).

    ``reference_dtype`` is the dtype the reference quantized activations in (the inputs' own
    dtype: ctref.forward quantizes as an engine holds them); where it is coarser than the
    engine's compute dtype, flips and operand rounding use it, since either side may round
    there. ``scale_dtype`` is a static activation scale's dtype: the reference dequantizes
    activations in it, so the operand term uses it too where it is coarser.
    """
    row = policy()["activation"][activation_family(args)]
    u = unit_roundoff(dtype)
    u_quantizer = max(u, unit_roundoff(reference_dtype)) if reference_dtype is not None else u
    u_operands = u
    if args is not None:
        u_operands = max(u_quantizer, unit_roundoff(scale_dtype)) if scale_dtype is not None else u_quantizer
    u_acc = unit_roundoff(accumulation_dtype(dtype))
    k = max(1, accumulation_length)
    flips = _flip_probability(args, u_quantizer, grid_aligned)
    one_per_row = max(flips, 1.0 / k) if flips > 0 else 0.0
    # Dynamic symmetric ints put a row's negative maximum exactly on a tie (-qmax - 1/2): one
    # flip per row is expected there, in both metrics. Elsewhere flips are rare where P is
    # small, but one changes an output by a whole step: the elementwise metric allows one.
    tie_per_row = args is not None and args.type == "int" and args.dynamic is True and args.symmetric
    return ErrorModel(
        output_rounding=float(row["output_rounding"]) * u,
        accumulation=float(row["accumulation"]) * math.sqrt(k) * u_acc,
        operand_rounding=float(row["operand_rounding"]) * u_operands,
        activation_flips=step * math.sqrt(one_per_row if tie_per_row else flips),
        activation_flips_elementwise=step * weight_crest * math.sqrt(one_per_row),
        scale_flips=_scale_flips(args, u_quantizer),
    )


def _scale_flips(args: QuantArgs | None, roundoff: float) -> float:
    """Activation scales rounded to a float ``scale_dtype`` (table ``[scale_rounding]``): one
    step of that dtype (2^-mantissa) on a whole group, with probability ``flip_factor * u *
    2^mantissa``: the rms of those steps."""
    if args is None or args.scale_dtype is None:
        return 0.0
    rounding = policy()["scale_rounding"].get(str(args.scale_dtype).removeprefix("torch."))
    if rounding is None:
        return 0.0
    bits = int(rounding["mantissa_bits"])
    probability = min(1.0, float(policy()["policy"]["flip_factor"]) * roundoff * 2**bits)
    return 2.0**-bits * math.sqrt(probability)


def weight_crest(weight: torch.Tensor) -> float:
    """max_jk |w_jk| / ||w_j||: the largest share a single weight has of its row's norm."""
    rows = weight.detach().to(torch.float64).reshape(-1, weight.shape[-1])
    norms = rows.norm(dim=-1)
    live = norms > 0
    if not bool(live.any()):
        return 0.0
    return float((rows.abs().amax(dim=-1)[live] / norms[live]).max())


def layer_bound(
    args: QuantArgs | None,
    dtype: torch.dtype,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    *,
    input_scale: torch.Tensor | None = None,
    grid_aligned: bool = False,
    reference_dtype: torch.dtype | None = None,
    gap32: tuple[float, float] | None = None,
) -> Bound:
    """The bound an engine computing in ``dtype`` must meet on one layer case.

    ``args`` are the module's input-activation args (None: weight-only); ``inputs`` (..., K) and
    ``weight`` (N, K) the case's inputs and the reference's effective weight;
    ``reference_dtype`` the dtype the reference output quantized activations in (see
    :func:`error_model`; a static ``input_scale``'s dtype counts too). ``gap32`` is
    :func:`reference_gap`'s ``(rel_frobenius, max_normalized)`` on these inputs: where it exceeds
    the fp32 model, every bound widens by that factor (the calibration).
    """
    k = int(inputs.shape[-1])
    step = activation_step(inputs, args, input_scale)
    crest = weight_crest(weight)

    static_scale = input_scale is not None and args is not None and not args.dynamic

    def model(of: torch.dtype) -> ErrorModel:
        return error_model(
            args,
            of,
            k,
            step=step,
            weight_crest=crest,
            grid_aligned=grid_aligned,
            reference_dtype=reference_dtype,
            scale_dtype=input_scale.dtype if static_scale else None,
        )

    own, fp32 = model(dtype), model(torch.float32)
    calibration = 1.0
    if gap32 is not None:
        calibration = max(1.0, gap32[0] / fp32.frobenius, gap32[1] / fp32.elementwise)
    safety = float(policy()["policy"]["safety"])
    name = str(dtype).removeprefix("torch.")
    family = activation_family(args)
    derivation = (
        f"{safety:g} x calibration {calibration:.3g} x eps; eps = {own.output_rounding:.3g} "
        f"(output rounding) + {own.accumulation:.3g} (accumulation, K={k}) + "
        f"{own.operand_rounding:.3g} (operands) + {own.activation_flips:.3g} / "
        f"{own.activation_flips_elementwise:.3g} (activation flips, {family}, step {step:.3g}); "
        f"row activation.{family} x dtype.{name} of ctref/tolerances.toml"
    )
    return Bound(
        family=family,
        compute_dtype=name,
        accumulation_length=k,
        rel_frobenius=safety * calibration * own.frobenius,
        max_normalized=safety * calibration * own.elementwise,
        model=own,
        calibration=calibration,
        derivation=derivation,
    )


@dataclass(frozen=True)
class OutputError:
    """How far an engine's layer output is from the reference's (the table's two metrics)."""

    rel_frobenius: float
    max_normalized: float
    worst_index: tuple[int, ...]
    nonfinite: int


def output_error(
    actual: torch.Tensor, reference: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor
) -> OutputError:
    """rel_frobenius and max_normalized of ``actual`` (..., N) against ``reference``.

    ``inputs`` (..., K) and ``weight`` (N, K) give the normalization ``||x_i|| * ||w_j||``.
    Computed in float64 on the CPU.
    """
    if tuple(actual.shape) != tuple(reference.shape):
        raise ValueError(f"output shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    y = actual.detach().to("cpu", torch.float64).reshape(-1, actual.shape[-1])
    ref = reference.detach().to("cpu", torch.float64).reshape(-1, reference.shape[-1])
    nonfinite = int((~torch.isfinite(y)).sum())
    if nonfinite:
        return OutputError(math.inf, math.inf, (), nonfinite)
    diff = y - ref
    reference_norm = float(ref.norm())
    rel = float(diff.norm()) / reference_norm if reference_norm > 0 else float(diff.norm())
    x_norms = inputs.detach().to("cpu", torch.float64).reshape(-1, inputs.shape[-1]).norm(dim=-1)
    w_norms = weight.detach().to("cpu", torch.float64).norm(dim=-1)
    scale = x_norms[:, None] * w_norms[None, :]
    normalized = torch.where(scale > 0, diff.abs() / scale.clamp_min(1e-300), diff.abs())
    worst = int(normalized.flatten().argmax())
    index = (worst // normalized.shape[1], worst % normalized.shape[1])
    return OutputError(rel, float(normalized.flatten()[worst]), index, 0)


def reference_gap(
    run: Callable[[torch.dtype], torch.Tensor], inputs: torch.Tensor, weight: torch.Tensor
) -> tuple[float, float]:
    """The reference's own gap: ``run(float32)`` against ``run(float64)`` in both metrics.

    ``run(dtype)`` computes the reference layer output in ``dtype`` (activation quantization
    included) on the case's ``inputs``; the result calibrates :func:`layer_bound`.
    """
    gap = output_error(run(torch.float32), run(torch.float64), inputs, weight)
    return gap.rel_frobenius, gap.max_normalized


# ---------------------------------------------------------------------------------------------
# Model logits


@dataclass(frozen=True)
class LogitsBound:
    compute_dtype: str
    rel_frobenius: float
    max_abs_rms: float
    derivation: str

    def violations(self, error: LogitsError) -> list[str]:
        if error.nonfinite:
            return [f"{error.nonfinite} NaN/Inf logit(s) (always a failure)"]
        found = []
        if not error.rel_frobenius <= self.rel_frobenius:
            found.append(
                f"relative Frobenius error of the logits {error.rel_frobenius:.3g} > "
                f"bound {self.rel_frobenius:.3g}"
            )
        if not error.max_abs_rms <= self.max_abs_rms:
            found.append(
                f"max |logit error| / rms(logits) {error.max_abs_rms:.3g} at "
                f"{list(error.worst_index)} > bound {self.max_abs_rms:.3g}"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LogitsError:
    rel_frobenius: float
    max_abs_rms: float
    worst_index: tuple[int, ...]
    nonfinite: int


def logits_error(actual: torch.Tensor, reference: torch.Tensor) -> LogitsError:
    """rel_frobenius and max |error| / rms(reference) of logits, in float64."""
    if tuple(actual.shape) != tuple(reference.shape):
        raise ValueError(f"logits shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    y = actual.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(y)).sum())
    if nonfinite:
        return LogitsError(math.inf, math.inf, (), nonfinite)
    diff = (y - ref).abs()
    rms = float(ref.pow(2).mean().sqrt())
    rel = float(diff.norm() / ref.norm()) if rms > 0 else float(diff.norm())
    worst = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    return LogitsError(rel, float(diff.flatten()[worst]) / rms if rms > 0 else 0.0, index, 0)


def model_bound(
    dtype: torch.dtype,
    gap32: float,
    *,
    quantized_layers: int,
    widest_activation_term: float,
) -> LogitsBound:
    """The bound on a model's logits for an engine computing in ``dtype`` (table ``[model]``).

    ``gap32`` is the reference model's own fp32-vs-fp64 rel_frobenius gap on the case's tokens;
    ``widest_activation_term`` the largest layer activation term (:class:`ErrorModel`'s
    ``activation_flips`` for ``dtype``) among ``quantized_layers`` quantized layers.
    """
    u = unit_roundoff(dtype)
    eps = (
        u
        + gap32 * u / unit_roundoff(torch.float32)
        + math.sqrt(max(1, quantized_layers)) * widest_activation_term
    )
    safety = float(policy()["policy"]["safety"])
    factor = float(policy()["model"]["max_abs_factor"])
    name = str(dtype).removeprefix("torch.")
    return LogitsBound(
        compute_dtype=name,
        rel_frobenius=safety * eps,
        max_abs_rms=safety * factor * eps,
        derivation=(
            f"{safety:g} x eps (max_abs_rms: x {factor:g} more); eps = u({name}) + fp32 gap "
            f"{gap32:.3g} scaled to {name} + sqrt({quantized_layers}) x activation term "
            f"{widest_activation_term:.3g}; section [model] of ctref/tolerances.toml"
        ),
    )
