"""The reference forward of a quantized Linear: activation fake-quantization, then the matmul.

A layer's output is defined by the scheme, not only by its weight: the input activations are
quantized and dequantized as the scheme says (ct-format.md §2.2, §4) before they meet the dense
weight. Dynamic arguments derive their scale (and zero point) from ``x`` itself, per strategy;
static ones use the parameters the checkpoint stores (``input_scale``, ``input_zero_point``,
``input_global_scale``). Every rule comes from :mod:`ctref.qmath`; this module only says which
observation feeds it.

Activations are taken as ``(..., K)``: a *token* is one row of the flattened ``(T, K)`` view, a
*group* runs along K, a *tensor* is everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ctref import qmath
from ctref.config import QuantArgs
from ctref.errors import CTRefError

__all__ = ["linear", "quantize_activation"]


def quantize_activation(
    x: torch.Tensor,
    args: QuantArgs,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` fake-quantized (quantized, then dequantized) as ``args`` define; dtype of ``x``.

    ``dynamic: true`` computes the scale from ``x`` (a ``tensor_group`` one under ``global_scale``
    if given, else alone: fully dynamic args store no global scale); ``dynamic: "local"``
    computes the per-group scales from ``x`` under the stored ``global_scale``; static args use
    the stored ``scale`` / ``zero_point``.
    """
    if x.dim() == 0:
        raise CTRefError(
            "an activation needs a feature dimension, got a 0-d tensor", tensor="input"
        )
    flat = x.reshape(-1, x.shape[-1])
    if args.dynamic:
        scale, zero_point, global_scale = _dynamic_qparams(flat, args, global_scale)
    else:
        scale, zero_point = _static_qparams(args, scale, zero_point)
    codes = qmath.quantize(flat, scale, zero_point, args=args, global_scale=global_scale)
    values = qmath.dequantize(codes, scale, zero_point, args=args, global_scale=global_scale)
    return values.to(x.dtype).reshape(x.shape)


def _dynamic_qparams(
    flat: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scale, zero point and global scale observed on ``flat`` ``(T, K)`` (min-max)."""
    if args.strategy not in ("token", "tensor", "group", "tensor_group"):
        raise CTRefError(
            f"dynamic activations take strategy token, tensor, group or tensor_group, "
            f"not '{args.strategy}'",
            key="input_activations.strategy",
        )
    if args.strategy == "tensor_group":
        # "local" divides by the stored global scale; fully dynamic args store none, and the
        # library then quantizes with the local (fp8-rounded) scales alone.
        if global_scale is None and args.dynamic == "local":
            raise CTRefError(
                "dynamic 'local' quantization divides by the stored global scale",
                tensor="input_global_scale",
            )
    elif global_scale is not None:
        raise CTRefError(
            f"strategy '{args.strategy}' has no global scale", tensor="input_global_scale"
        )
    # A token is a row of the (T, K) view: qmath's per-row (channel) observation.
    observed_as = (
        dataclasses.replace(args, strategy="channel") if args.strategy == "token" else args
    )
    low, high = qmath.observe_min_max(flat, observed_as)
    scale, zero_point = qmath.calculate_qparams(low, high, args, global_scale)
    return scale, zero_point, global_scale


def _static_qparams(
    args: QuantArgs, scale: torch.Tensor | None, zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if args.strategy not in ("tensor", "group"):
        raise CTRefError(
            f"static activations take strategy tensor or group, not '{args.strategy}'",
            key="input_activations.strategy",
        )
    if scale is None:
        raise CTRefError(
            "static (dynamic: false) quantization needs the stored scale", tensor="input_scale"
        )
    if not args.symmetric and zero_point is None:
        raise CTRefError(
            "static asymmetric quantization needs the stored zero point", tensor="input_zero_point"
        )
    return scale, zero_point if not args.symmetric else None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    input_args: QuantArgs | None = None,
    input_params: Mapping[str, torch.Tensor] | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The reference output ``fakequant(x) @ weightᵀ + bias`` in ``compute_dtype``.

    The activation is fake-quantized in its own dtype (as an engine holds it), then everything is
    widened to ``compute_dtype``, where the products of bf16/fp16 operands are exact, and summed
    over K in index order. ``input_params`` are the module's stored activation tensors by local
    name (``input_scale``, ``input_zero_point``, ``input_global_scale``); absent ones are None.
    """
    if weight.dim() != 2 or weight.shape[-1] != x.shape[-1]:
        raise CTRefError(
            f"a Linear weight (N, K) must match the input's K={x.shape[-1]}, found "
            f"{tuple(weight.shape)}",
            tensor="weight",
        )
    if input_args is not None:
        stored = input_params or {}
        x = quantize_activation(
            x,
            input_args,
            scale=stored.get("input_scale"),
            zero_point=stored.get("input_zero_point"),
            global_scale=stored.get("input_global_scale"),
        )
    products = x.to(compute_dtype).unsqueeze(-2) * weight.to(compute_dtype)
    # Summed strictly in index order (k = 0 … K-1): a BLAS matmul reorders the sum by CPU and
    # thread count, and the stored reference outputs must be the same bytes on every machine.
    out = products.cumsum(dim=-1)[..., -1]
    return out if bias is None else out + bias.to(compute_dtype)
