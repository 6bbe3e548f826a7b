"""Activation and attention parameters: which a scheme makes a module store, and their checks.

Weights are the formats' business; this module covers the other quantization tensors of §4 and
§1.7: ``input_*`` / ``output_*`` of a quantized Linear, and ``q_*`` / ``k_*`` / ``v_*`` of an
attention module. What must be stored follows 0.20.0's ``initialize_qparams``: fully dynamic
args store nothing; ``tensor_group`` stores an fp32 ``(1,)`` global scale, even for
``dynamic: "local"`` (which stores nothing else); static args store a scale in a model float
dtype, plus a zero point of the same shape when asymmetric. Shapes come from the *observed*
shape: ``(K,)`` for inputs, the weight's leading dims for outputs, ``(heads, ·, head_dim)`` for
q/k/v.

Functions here take tensors by local name and raise :class:`CTRefError` with local names; the
checkpoint reader adds the module and file.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ctref import qmath
from ctref.config import QuantArgs, QuantScheme, dtype_name
from ctref.errors import CTRefError
from ctref.formats.base import scale_dtypes

__all__ = [
    "ATTENTION_PARAMS",
    "LINEAR_PARAMS",
    "ActivationParams",
    "ExpectedParam",
    "attention_expectations",
    "check_activation_params",
    "expected_params",
    "linear_expectations",
]

LINEAR_PARAMS = (
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
    "output_global_scale",
)
ATTENTION_PARAMS = tuple(
    f"{kind}_{param}" for kind in ("q", "k", "v") for param in ("scale", "zero_point")
) + ("q_global_scale", "k_global_scale", "v_global_scale")

Shape = tuple[int | None, ...]
"""An expected shape; a None dimension is one the checkpoint alone cannot tell."""


@dataclass(frozen=True)
class ExpectedParam:
    """One tensor a scheme makes a module store."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    shape: Shape | None
    """None when the strategy gives no shape the library could initialize."""
    reason: str
    is_scale: bool
    """Scales must be finite and positive; zero points need not."""


@dataclass(frozen=True)
class ActivationParams:
    """What one module stores of its activation parameters, and what it lacks.

    ``found`` maps local names to the validated tensors; ``missing`` maps each expected but
    absent name to the reason it is expected; ``unexpected`` lists stored names no scheme asks
    for; ``legacy`` maps names found under an old spelling to that spelling (``k_scale`` →
    ``k_proj.output_scale``).
    """

    module: str
    found: Mapping[str, torch.Tensor]
    missing: Mapping[str, str]
    unexpected: tuple[str, ...]
    legacy: Mapping[str, str]

    @property
    def complete(self) -> bool:
        return not self.missing

    def require_complete(self) -> None:
        """Raise for the first expected tensor the module does not store."""
        for name, reason in self.missing.items():
            raise CTRefError(f"missing: {reason}", tensor=f"{self.module}.{name}")


def expected_params(
    base: str, args: QuantArgs | None, observed: Shape, where: str
) -> list[ExpectedParam]:
    """The tensors ``<base>_*`` (``input``, ``output``, ``q``, ``k``, ``v``) that ``args`` store."""
    if args is None or args.dynamic is True:
        return []
    expected = []
    if args.strategy == "tensor_group":
        expected.append(
            ExpectedParam(
                f"{base}_global_scale",
                (torch.float32,),
                (1,),
                f"{where} (strategy tensor_group) stores a global scale",
                is_scale=True,
            )
        )
    if args.dynamic == "local":
        return expected
    shape = qmath.param_shape(args, observed)
    expected.append(
        ExpectedParam(
            f"{base}_scale",
            scale_dtypes(args),
            shape,
            f"{where} is static (dynamic: false) and stores its scale",
            is_scale=True,
        )
    )
    if not args.symmetric:
        expected.append(
            ExpectedParam(
                f"{base}_zero_point",
                (args.zp_dtype,),
                shape,
                f"{where} is static and asymmetric and stores its zero point",
                is_scale=False,
            )
        )
    return expected


def linear_expectations(
    scheme: QuantScheme, weight_shape: Sequence[int], where: str
) -> list[ExpectedParam]:
    """``input_*`` over the input features ``(K,)``, ``output_*`` over the weight's other dims."""
    shape = tuple(weight_shape)
    return expected_params(
        "input", scheme.input_activations, shape[-1:], f"{where}.input_activations"
    ) + expected_params(
        "output", scheme.output_activations, shape[:-1], f"{where}.output_activations"
    )


def attention_expectations(
    q_args: QuantArgs | None,
    kv_args: QuantArgs | None,
    num_heads: int | None,
    num_kv_heads: int | None,
    *,
    q_where: str,
    kv_where: str,
) -> list[ExpectedParam]:
    """``q_*`` over ``(heads, seq, head_dim)``; ``k_*``, ``v_*`` over ``(kv_heads, ·, ·)``."""
    return (
        expected_params("q", q_args, (num_heads, None, None), q_where)
        + expected_params("k", kv_args, (num_kv_heads, None, None), kv_where)
        + expected_params("v", kv_args, (num_kv_heads, None, None), kv_where)
    )


def check_activation_params(
    module: str,
    stored: Mapping[str, torch.Tensor],
    expected: Sequence[ExpectedParam],
    legacy: Mapping[str, str],
) -> ActivationParams:
    """Validate the stored tensors that are expected; report the expected ones that are absent.

    ``stored`` is keyed by canonical local name; a tensor read under a legacy spelling is named
    by that spelling (``legacy``) in errors.
    """
    for spec in expected:
        if spec.name in stored:
            _check(spec, stored[spec.name], legacy.get(spec.name, spec.name))
    names = {spec.name for spec in expected}
    return ActivationParams(
        module=module,
        found=types.MappingProxyType(dict(stored)),
        missing=types.MappingProxyType(
            {spec.name: spec.reason for spec in expected if spec.name not in stored}
        ),
        unexpected=tuple(name for name in stored if name not in names),
        legacy=types.MappingProxyType(dict(legacy)),
    )


def _check(spec: ExpectedParam, tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in spec.dtypes:
        allowed = " or ".join(dtype_name(d) for d in spec.dtypes)
        raise CTRefError(
            f"expected dtype {allowed} ({spec.reason}), found {dtype_name(tensor.dtype)}",
            tensor=name,
        )
    if spec.shape is not None and not _shape_fits(tuple(tensor.shape), spec.shape):
        raise CTRefError(
            f"expected shape {_shape_str(spec.shape)} ({spec.reason}), "
            f"found {tuple(tensor.shape)}",
            tensor=name,
        )
    if spec.is_scale:
        values = tensor.to(torch.float32)
        if not bool(torch.isfinite(values).all()):
            raise CTRefError("holds NaN or Inf values; a scale must be finite", tensor=name)
        if not bool((values > 0).all()):
            raise CTRefError("holds values <= 0; a scale must be positive", tensor=name)


def _shape_str(shape: Shape) -> str:
    """``(8, ?, 1)``: unknown dimensions as ``?``; one-element shapes as ``(1,)``."""
    dims = ["?" if dim is None else str(dim) for dim in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _shape_fits(shape: tuple[int, ...], expected: Shape) -> bool:
    return len(shape) == len(expected) and all(
        want is None or have == want for have, want in zip(shape, expected)
    )
