"""What every format module provides, and the registry that finds it by format name.

A format turns the tensors one module stores (local names: ``weight_packed``, ``weight_scale``…)
into its dense weight (``decode``) and back (``encode``). Shared quantization math lives in
:mod:`ctref.qmath`; a format adds only its storage layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ctref import qmath
from ctref.config import QuantArgs, dtype_name
from ctref.errors import CTRefError


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a format stores for a module: local name, allowed dtypes, exact shape."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    shape: tuple[int, ...] | None
    required: bool = True


class Format(Protocol):
    """A compression format: its name(s), what it stores, how to decode and encode it."""

    names: tuple[str, ...]

    def expected_tensors(
        self, args: QuantArgs | None, weight_shape: Sequence[int], *, layout: str
    ) -> list[TensorSpec]:
        """The tensors a module of ``weight_shape`` stores under ``args``."""
        ...

    def decode(
        self, tensors: Mapping[str, torch.Tensor], args: QuantArgs | None, *, layout: str
    ) -> torch.Tensor:
        """The dense weight the stored tensors define, in the dtype the format defines."""
        ...

    def encode(
        self,
        weight: torch.Tensor,
        args: QuantArgs | None,
        *,
        layout: str = "dense",
        qparams: qmath.QParams | None = None,
    ) -> dict[str, torch.Tensor]:
        """Quantize and compress a dense weight into the tensors this format stores."""
        ...


_REGISTRY: dict[str, Format] = {}


def register(cls: Callable[[], Format]) -> Callable[[], Format]:
    """Class decorator: register one instance under each of its format names."""
    instance = cls()
    for name in instance.names:
        if name in _REGISTRY:
            raise RuntimeError(f"format {name!r} registered twice")
        _REGISTRY[name] = instance
    return cls


def get_format(name: str) -> Format:
    """The format registered as ``name``; CTRefError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise CTRefError(f"unknown compression format {name!r}; known: {known}", key="format")


def format_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def require(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """``tensors[name]``, checked for presence, dtype and (if given) exact shape."""
    tensor = tensors.get(name)
    if tensor is None:
        raise CTRefError("required tensor is missing", tensor=name)
    if tensor.dtype not in dtypes:
        allowed = " or ".join(dtype_name(d) for d in dtypes)
        raise CTRefError(f"expected dtype {allowed}, found {dtype_name(tensor.dtype)}", tensor=name)
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise CTRefError(f"expected shape {tuple(shape)}, found {tuple(tensor.shape)}", tensor=name)
    return tensor


def require_finite(scale: torch.Tensor, name: str) -> None:
    """A NaN or Inf scale silently poisons a layer; refuse to decode through one."""
    if not bool(torch.isfinite(scale.to(torch.float32)).all()):
        raise CTRefError("holds NaN or Inf values; a scale must be finite", tensor=name)


def require_args(
    args: QuantArgs | None, format_name: str, *, types: Sequence[tuple[str, int | None]] = ()
) -> QuantArgs:
    """The weight args a quantized format needs; ``types`` limits the (type, bits) it stores.

    ``("int", None)`` admits every int width; ``("float", 8)`` only FP8.
    """
    if args is None:
        raise CTRefError(f"format '{format_name}' needs weight quantization arguments", key="weights")
    if types and not any(
        args.type == kind and bits in (None, args.num_bits) for kind, bits in types
    ):
        stores = " or ".join(kind if bits is None else f"{bits}-bit {kind}" for kind, bits in types)
        raise CTRefError(
            f"format '{format_name}' stores {stores} codes, not {args.num_bits}-bit {args.type}",
            key="weights.type",
        )
    return args


def require_matrix(shape: Sequence[int], name: str) -> None:
    """A quantized weight is a matrix ``(N, K)`` or a stack of expert matrices ``(E, N, K)``."""
    if len(shape) not in (2, 3):
        raise CTRefError(
            f"a quantized weight has 2 or 3 dimensions, found shape {tuple(shape)}", tensor=name
        )


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
"""Model dtypes: those of an unquantized weight, and of a scale (§0 fact 5) unless the format
or ``scale_dtype`` names another."""


def scale_dtypes(args: QuantArgs) -> tuple[torch.dtype, ...]:
    extra = (args.scale_dtype,) if args.scale_dtype is not None else ()
    return FLOAT_DTYPES + tuple(d for d in extra if d not in FLOAT_DTYPES)


def read_scale(
    tensors: Mapping[str, torch.Tensor], args: QuantArgs, weight_shape: Sequence[int]
) -> torch.Tensor:
    """``weight_scale``, checked for dtype, strategy shape and finiteness."""
    scale = require(tensors, "weight_scale", scale_dtypes(args))
    qmath.check_param(scale, args, weight_shape, name="weight_scale")
    require_finite(scale, "weight_scale")
    return scale


def read_g_idx(
    tensors: Mapping[str, torch.Tensor], args: QuantArgs, weight_shape: Sequence[int]
) -> torch.Tensor | None:
    """Legacy act-order ``weight_g_idx`` (§2.4); None when absent or an all -1 placeholder."""
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None or qmath.g_idx_is_placeholder(g_idx):
        return None
    if args.strategy not in ("group", "tensor_group"):
        raise CTRefError(
            f"weight_g_idx needs a group strategy, not '{args.strategy}'", tensor="weight_g_idx"
        )
    qmath.check_g_idx(g_idx, args, weight_shape[-1], name="weight_g_idx")
    return g_idx


def check_codes_in_range(codes: torch.Tensor, args: QuantArgs, name: str) -> None:
    """Integer codes must lie in the signed range of ``num_bits`` (e.g. int4 in [-8, 7])."""
    if codes.numel() == 0:
        return
    low, high = qmath.q_range(args)
    found_low, found_high = (int(v) for v in torch.aminmax(codes))
    if found_low < low or found_high > high:
        raise CTRefError(
            f"{args.num_bits}-bit values must lie in [{int(low)}, {int(high)}], "
            f"found [{found_low}, {found_high}]",
            tensor=name,
        )


def check_zero_point(
    zero_point: torch.Tensor, args: QuantArgs, weight_shape: Sequence[int]
) -> None:
    """An unpacked ``weight_zero_point``: the strategy's shape and, for ints, codes in range."""
    qmath.check_param(zero_point, args, weight_shape, name="weight_zero_point")
    if args.type == "int":
        check_codes_in_range(zero_point, args, "weight_zero_point")


def check_fp8_finite(codes: torch.Tensor, name: str) -> None:
    """E4M3 has no infinities; its two NaN codes (0x7F, 0xFF) never come from a quantizer."""
    if bool(((codes.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise CTRefError("holds FP8 NaN codes (0x7F or 0xFF)", tensor=name)


def quantize_codes(
    weight: torch.Tensor, args: QuantArgs, qparams: qmath.QParams | None
) -> tuple[torch.Tensor, qmath.QParams]:
    """The codes of a format that stores them beside :func:`qparam_tensors`, and the qparams
    they were quantized with (``qmath.qparams_for``'s when none are given). These formats have
    no global scale: one in ``qparams`` is not applied."""
    qparams = qparams or qmath.qparams_for(weight, args)
    codes = qmath.quantize(
        weight, qparams.scale, qparams.zero_point, args=args, g_idx=qparams.g_idx
    )
    return codes, qparams


def qparam_tensors(qparams: qmath.QParams) -> dict[str, torch.Tensor]:
    """The stored names of the parameters every quantized format writes beside its codes."""
    out = {"weight_scale": qparams.scale}
    if qparams.global_scale is not None:
        out["weight_global_scale"] = qparams.global_scale
    if qparams.g_idx is not None:
        out["weight_g_idx"] = qparams.g_idx.to(torch.int32)
    return out
