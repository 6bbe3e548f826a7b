"""What the reference says a checkpoint means: layer outputs, their bounds, inputs on the grid.

Thin glue over ctref (the checkpoint reader, :mod:`ctref.forward`, :mod:`ctref.transforms`,
:mod:`ctref.tolerance`): the reference backend computes with it, and the levels judge every other
backend against it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ctref import Checkpoint, qmath, tolerance, transforms
from ctref.activations import LINEAR_PARAMS
from ctref.config import QuantArgs
from ctref.forward import quantize_activation

GRID_STRATEGIES = ("token", "tensor", "group")


def input_args(checkpoint: Checkpoint, module: str) -> QuantArgs | None:
    """The module's input-activation args (None for weight-only or unquantized modules)."""
    scheme = checkpoint.module_info(module).scheme
    return None if scheme is None else scheme.input_activations


def input_params(checkpoint: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    """The stored static activation tensors of a module by local name (``input_scale``,
    ``input_zero_point``, ``input_global_scale``)."""
    found = checkpoint.activation_params(module).found
    return {name: tensor for name, tensor in found.items() if name in LINEAR_PARAMS}


def online_input_transforms(
    checkpoint: Checkpoint, module: str, weight: torch.Tensor
) -> list[transforms.AppliedTransform]:
    """The online ``input`` transforms of ``transform_config`` acting on a module (x -> x @ T)."""
    config = checkpoint.config.transform_config
    if config is None or weight.dim() != 2:
        return []
    names = set(checkpoint.tensor_names())
    _, applied = transforms.effective_weight(
        module,
        weight,
        config,
        lambda name: checkpoint.read(name) if name in names else None,
        stored_names=names,
        class_names=checkpoint.class_names(module),
    )
    return [t for t in applied if t.disposition == transforms.FOLDED and t.location == "input"]


def layer_output(
    checkpoint: Checkpoint,
    module: str,
    inputs: torch.Tensor,
    dtype: torch.dtype,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference layer output, its matmul computed in ``dtype``.

    What :func:`ctref.forward.linear` defines (and the fixtures store): online input transforms
    and the scheme's activation quantization applied in the inputs' own dtype, as an engine holds
    them, then ``x @ Wᵀ + b``. Only the sum differs: the BLAS's instead of index order, which
    makes stored outputs byte-identical across machines but costs M·N·K memory on the probes.
    """
    if weight is None:
        weight = checkpoint.dequantize(module)
    x = inputs
    for transform in online_input_transforms(checkpoint, module, weight):
        x = transforms.apply_online(x, transform)
    args = input_args(checkpoint, module)
    if args is not None:
        stored: Mapping[str, torch.Tensor] = input_params(checkpoint, module)
        x = quantize_activation(
            x,
            args,
            scale=stored.get("input_scale"),
            zero_point=stored.get("input_zero_point"),
            global_scale=stored.get("input_global_scale"),
        )
    out = x.to(dtype) @ weight.to(dtype).T
    bias = checkpoint.bias(module)
    return out if bias is None else out + bias.to(dtype)


def layer_reference(
    checkpoint: Checkpoint, module: str, inputs: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The reference output in float64, and the reference's own fp32-vs-fp64 gap on these
    inputs (:func:`ctref.tolerance.reference_gap`'s two metrics), which calibrates the bound."""
    outputs: dict[torch.dtype, torch.Tensor] = {}

    def run(dtype: torch.dtype) -> torch.Tensor:
        outputs[dtype] = layer_output(checkpoint, module, inputs, dtype, weight)
        return outputs[dtype]

    gap = tolerance.reference_gap(run, inputs, weight)
    return outputs[torch.float64], gap


def layer_bound(
    checkpoint: Checkpoint,
    module: str,
    inputs: torch.Tensor,
    dtype: torch.dtype,
    weight: torch.Tensor,
    gap32: tuple[float, float],
    *,
    grid_aligned: bool = False,
) -> tolerance.Bound:
    """The tolerance bound for an engine computing ``module`` in ``dtype`` on ``inputs``,
    calibrated with the reference's own gap ``gap32`` (:func:`layer_reference`). The reference
    quantizes activations in the inputs' dtype; an engine may do it in its own."""
    return tolerance.layer_bound(
        input_args(checkpoint, module),
        dtype,
        inputs,
        weight,
        input_scale=input_params(checkpoint, module).get("input_scale"),
        grid_aligned=grid_aligned,
        reference_dtype=inputs.dtype,
        gap32=gap32,
    )


def grid_inputs(args: QuantArgs | None, inputs: torch.Tensor) -> torch.Tensor | None:
    """Inputs like ``inputs`` on which the scheme's activation quantization is exact, or None.

    For dynamic symmetric int/FP8 quantization per token, tensor or group: every quantization
    unit holds codes times a power of two 2^e, and its largest element is +divisor * 2^e
    (``(qmax - qmin) / 2``: 127.5 for int8, 448 for FP8), so the quantizer's scale is exactly
    2^e in any precision and no code sits near a rounding boundary (the amax element's tie
    clamps the same way everywhere). An engine whose quantizer differs (another granularity,
    another divisor) gets the whole quantization error here, far above the tight bound.
    """
    if (
        args is None
        or args.dynamic is not True
        or not args.symmetric
        or args.strategy not in GRID_STRATEGIES
        or (args.type == "float" and args.num_bits != 8)
    ):
        return None
    rows, cols = inputs.reshape(-1, inputs.shape[-1]).shape
    generator = torch.Generator().manual_seed(rows * 7919 + cols)
    low, high = qmath.q_range(args)
    if args.type == "int":
        values = torch.randint(int(low) + 1, int(high) + 1, (rows, cols), generator=generator)
    else:  # E4M3 grid values strictly below the maximum, so the peak alone is the amax
        values = torch.randn(rows, cols, generator=generator, dtype=torch.float64) * high / 4
        values = values.clamp(-high * 0.9, high * 0.9).to(torch.float8_e4m3fn)
    values = values.to(torch.float64)
    size = {"token": cols, "tensor": rows * cols, "group": args.group_size}[args.strategy]
    groups = -(-cols // size) if args.strategy == "group" else 1
    width = groups * size if args.strategy == "group" else cols
    units = torch.nn.functional.pad(values, (0, width - cols)).reshape(-1, size)
    real = torch.full((units.shape[0],), size)
    if args.strategy == "group":
        real = real.reshape(rows, groups)
        real[:, -1] = cols - (groups - 1) * size
        real = real.flatten()
    peaks = (torch.rand(units.shape[0], generator=generator) * real).long()
    units[torch.arange(units.shape[0]), peaks] = (high - low) / 2
    exponents = torch.randint(-4, 3, (units.shape[0], 1), generator=generator)
    units = units * torch.pow(2.0, exponents.to(torch.float64))
    return units.reshape(rows, width)[:, :cols].to(inputs.dtype)


# ---------------------------------------------------------------------------------------------
# The reference model


def reference_model(checkpoint: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """The fixture's architecture (transformers) holding ctref's dense weights in ``dtype``, each
    quantized Linear quantizing its input activations as ctref.forward does.

    ctref's dense weights are written as a plain checkpoint and loaded by ``from_pretrained``, so
    transformers' own name mapping (fused MoE experts included) applies. Not-supported: without
    transformers; KV-cache quantization; activation quantization on modules the architecture
    fuses away (MoE experts).
    """
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from safetensors.torch import save_file

    from conformance.backends.base import NotSupported

    try:
        import transformers
    except ImportError as error:
        raise NotSupported(f"the reference model needs transformers ({error})") from None
    if checkpoint.config.kv_cache_scheme is not None:
        raise NotSupported("the reference model does not quantize the KV cache (kv_cache_scheme)")
    state = {}
    for info in checkpoint.modules():
        state[f"{info.name}.weight"] = checkpoint.dequantize(info.name).to(dtype)
        bias = checkpoint.bias(info.name)
        if bias is not None:
            state[f"{info.name}.bias"] = bias.to(dtype)
    config = {k: v for k, v in checkpoint.model_config.items() if k != "quantization_config"}
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        save_file(state, str(Path(folder) / "model.safetensors"))
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            # Eager experts: the grouped-GEMM kernels of MoE layers take no float64.
            folder, dtype=dtype, output_loading_info=True, experts_implementation="eager"
        )
    left_out = sorted(set(info["missing_keys"]) | set(info["unexpected_keys"]))
    if left_out:
        raise RuntimeError(f"the reference model did not take ctref's weights: {left_out[:5]}")
    for info in checkpoint.modules():
        if input_args(checkpoint, info.name) is None and not checkpoint.config.transform_config:
            continue
        try:
            module = model.get_submodule(info.name)
        except AttributeError:
            if input_args(checkpoint, info.name) is not None:
                raise NotSupported(
                    f"{info.name} quantizes its activations, but the architecture fuses it away"
                ) from None
            continue
        module.register_forward_pre_hook(_activation_hook(checkpoint, info.name))
    return model.eval()


def _activation_hook(checkpoint: Checkpoint, module: str):
    """A forward pre-hook: online input transforms, then the scheme's activation quantization."""
    weight = checkpoint.dequantize(module)
    applied = online_input_transforms(checkpoint, module, weight)
    args = input_args(checkpoint, module)
    stored = input_params(checkpoint, module)

    def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        for transform in applied:
            x = transforms.apply_online(x, transform)
        if args is not None:
            x = quantize_activation(
                x,
                args,
                scale=stored.get("input_scale"),
                zero_point=stored.get("input_zero_point"),
                global_scale=stored.get("input_global_scale"),
            )
        return (x, *inputs[1:])

    return hook


def reference_logits(checkpoint: Checkpoint, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(checkpoint, dtype)(input_ids).logits
