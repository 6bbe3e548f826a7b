"""NVFP4 and MX formats against compressed-tensors 0.20.0, bit for bit (ct-format.md §3.4–3.7).

The library's class-method compressors (§6.1) take one 2-D module state dict; stacked 3-D expert
weights are compared slice by slice (each expert is packed on its own, §8 trap 22). The library
holds scales in the model dtype before compression (NVFP4 casts them to fp8 on save, MX to E8M0),
so it is handed ctref's scales in that form.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "compressed_tensors", reason="peer extra (compressed-tensors 0.20.x) not installed"
)

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (  # noqa: E402
    calculate_qparams,
    generate_gparam,
)

from ctref import fpcodes, qmath  # noqa: E402
from ctref.config import QuantArgs  # noqa: E402
from ctref.formats import get_format  # noqa: E402
from ctref.presets import PRESET_SCHEMES  # noqa: E402

pytestmark = pytest.mark.peer

ARGS = {
    "nvfp4-pack-quantized": PRESET_SCHEMES["NVFP4A16"]["weights"],
    "nvfp4-group": {
        "num_bits": 4,
        "type": "float",
        "strategy": "group",
        "group_size": 16,
        "scale_dtype": "torch.float8_e4m3fn",
    },
    "mxfp4-pack-quantized": PRESET_SCHEMES["MXFP4A16"]["weights"],
    "mxfp6-pack-quantized": PRESET_SCHEMES["MXFP6A16"]["weights"],
    "mxfp8-quantized": PRESET_SCHEMES["MXFP8A16"]["weights"],
}
CASES = tuple(ARGS)
MX_CASES = ("mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
SHARED_ACROSS_EXPERTS = ("weight_global_scale",)


def format_name(name: str) -> str:
    return "nvfp4-pack-quantized" if name == "nvfp4-group" else name


def both_args(name: str) -> tuple[QuantArgs, QuantizationArgs]:
    return QuantArgs.from_dict(ARGS[name], key="weights"), QuantizationArgs(**ARGS[name])


def peer(name: str):
    return BaseCompressor.get_value_from_registry(format_name(name))


def scheme(name: str) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=both_args(name)[1])


def per_expert(
    call, state: dict[str, torch.Tensor], experts: int | None
) -> dict[str, torch.Tensor]:
    """Run a 2-D library call on each expert slice and stack the results (3-D weights)."""
    if experts is None:
        return call(dict(state))
    slices = [
        call({k: v if k in SHARED_ACROSS_EXPERTS else v[e] for k, v in state.items()})
        for e in range(experts)
    ]
    return {
        k: slices[0][k] if k in SHARED_ACROSS_EXPERTS else torch.stack([s[k] for s in slices])
        for k in slices[0]
    }


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 viewed as uint8, 16-bit floats as int16: compare bit patterns, signed zeros included."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(as_bits(ours), as_bits(theirs))


def weight(shape, dtype, seed) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator)
    w = w * torch.exp2(torch.randint(-10, 10, (*shape[:-1], 1), generator=generator).float())
    w[..., 0, :32] = 0.0
    w[..., -1, 1] = -0.0
    w[..., -1, 2] = -1e-9
    return w.to(dtype)


def assert_matches_library(name: str, w: torch.Tensor) -> None:
    """ctref's encode bytes == the library's compress bytes (same qparams); decodes equal."""
    args, _ = both_args(name)
    fmt = get_format(format_name(name))
    qparams = qmath.qparams_for(w, args)
    ours = fmt.encode(w, args, qparams=qparams)
    state = {"weight": w, "weight_scale": qparams.scale.to(w.dtype)}
    if qparams.global_scale is not None:
        state["weight_global_scale"] = qparams.global_scale
    experts = w.shape[0] if w.dim() == 3 else None
    theirs = per_expert(lambda s: peer(name).compress(s, scheme(name)), state, experts)
    assert set(ours) == set(theirs)
    for key in ours:
        assert_same_bits(ours[key], theirs[key])
    decoded = per_expert(lambda s: peer(name).decompress(s, scheme(name)), theirs, experts)
    assert_same_bits(fmt.decode(ours, args, layout="dense"), decoded["weight"])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64), (5, 96), (2, 3, 64)])
def test_encode_and_decode_match_the_library(name, dtype, shape):
    assert_matches_library(name, weight(shape, dtype, seed=sum(shape)))


@pytest.mark.parametrize("name", MX_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_and_signed_zeros_match_the_library(name, dtype):
    """Every midpoint of the element grid (both signs), -0.0 and tiny negatives, at scale 2^k."""
    args, _ = both_args(name)
    grid = qmath.FLOAT_MAX[args.num_bits]
    if args.num_bits == 8:
        positives = (
            torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        )
    else:
        positives = fpcodes.magnitudes(args.num_bits)
    midpoints = (positives[1:] + positives[:-1]) / 2
    special = torch.tensor([-0.0, -1e-3, 1e-3, -grid])
    values = torch.cat([midpoints, -midpoints, special])
    values = torch.cat([values, values.new_zeros(-values.numel() % 32)])
    row = torch.cat([torch.tensor([grid]), values])[: values.numel()]
    scale = fpcodes.mx_scale(torch.tensor([grid], dtype=torch.float32), args.num_bits)
    w = (row * scale).reshape(1, -1).to(dtype)
    assert_matches_library(name, w)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_of_arbitrary_bytes_matches_the_library(name, seed):
    """Random codes and scales (every non-NaN fp8 code, E8M0 from 0 up to no overflow)."""
    args, _ = both_args(name)
    generator = torch.Generator().manual_seed(seed)
    rows, cols = 6, 128
    groups = cols // args.group_size

    def randint(high, shape):
        return torch.randint(0, high, shape, dtype=torch.uint8, generator=generator)

    def fp8(shape):
        codes = randint(256, shape)
        return torch.where((codes & 0x7F) == 0x7F, 0x38, codes).view(torch.float8_e4m3fn)

    if args.num_bits == 4:
        stored = {"weight_packed": randint(256, (rows, cols // 2))}
    elif args.num_bits == 6:
        stored = {"weight_packed": randint(256, (rows, 3 * cols // 4))}
    else:
        stored = {"weight": fp8((rows, cols))}
    if name.startswith("nvfp4"):
        stored["weight_scale"] = fp8((rows, groups))
        if args.strategy == "tensor_group":
            stored["weight_global_scale"] = torch.rand(1, generator=generator) * 1000 + 0.01
    else:
        stored["weight_scale"] = randint(241 if args.num_bits == 8 else 251, (rows, groups))
        stored["weight_scale"][0, 0] = 0
    ours = get_format(format_name(name)).decode(stored, args, layout="dense")
    theirs = peer(name).decompress(dict(stored), scheme(name))["weight"]
    assert_same_bits(ours, theirs)


def edge_ranges(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) pairs: random magnitudes over a wide exponent range plus edges."""
    generator = torch.Generator().manual_seed(3)
    exponents = torch.randint(-40, 30, (512,), generator=generator).float()
    magnitudes = torch.rand(512, generator=generator) * torch.exp2(exponents)
    edges = torch.tensor(
        [0.0, 2.0**-126, 2.0**-133, 1e-30, 6.0, 7.5, 448.0, 1.5, 1.75, 1.875, 1.9375, 3e38, 65504.0]
    )
    high = torch.cat([magnitudes, edges]).to(dtype)
    high = torch.where(torch.isfinite(high), high, torch.finfo(dtype).max)
    low = -(high * torch.rand(high.shape, generator=generator).to(dtype)).flip(0)
    return low.reshape(-1, 1), high.reshape(-1, 1)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_rule_matches_the_library_calculate_qparams(name, dtype):
    args, peer_args = both_args(name)
    low, high = edge_ranges(dtype)
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(low.min().float(), high.max().float())
    ours, _ = qmath.calculate_qparams(low, high, args, global_scale)
    theirs, _ = calculate_qparams(low, high, peer_args, global_scale)
    assert_same_bits(ours, theirs)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qparams_for_matches_the_library_on_observed_ranges(name, dtype):
    """qmath.qparams_for == the library's generate_gparam (fp32 range) + calculate_qparams."""
    args, peer_args = both_args(name)
    w = weight((8, 128), dtype, seed=4)
    ours = qmath.qparams_for(w, args)
    groups = w.unflatten(-1, (-1, args.group_size))
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(w.amin().float().reshape(1), w.amax().float().reshape(1))
        assert_same_bits(ours.global_scale, global_scale)
    theirs, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), peer_args, global_scale)
    assert_same_bits(ours.scale, theirs.to(ours.scale.dtype))
