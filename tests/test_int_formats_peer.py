"""ctref against compressed-tensors 0.20.0 for the integer and FP8 formats, bit for bit.

For every format x strategy x bits x symmetry x weight dtype the library handles, on random
weights: ctref's encode writes the bytes the library's ``compress`` writes from the same scale and
zero point, ctref's decode of those bytes equals the library's ``decompress``, and ctref's
``calculate_qparams`` equals the library's. Combinations the library refuses are asserted to be
refused, so that the matrix says what it covers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "compressed_tensors",
    minversion="0.20",
    reason="peer cross-checks need compressed-tensors 0.20 (install the 'peer' extra)",
)

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

from ctref import qmath  # noqa: E402
from ctref.config import QuantArgs  # noqa: E402
from ctref.errors import CTRefError  # noqa: E402
from ctref.formats import get_format  # noqa: E402

pytestmark = pytest.mark.peer

NAIVE_NAMES = ("naive-quantized", "int-quantized", "float-quantized")
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {"64x256": (64, 256), "200x300": (200, 300)}
STRATEGIES = {
    "tensor": {"strategy": "tensor"},
    "channel": {"strategy": "channel"},
    "group128": {"strategy": "group", "group_size": 128},
    "group100": {"strategy": "group", "group_size": 100},
    "block128x128": {"strategy": "block", "block_structure": [128, 128]},
}
EXPERT_SHAPE = (4, 32, 128)
EXPERT_STRATEGIES = {
    "tensor": {"strategy": "tensor"},
    "channel": {"strategy": "channel"},
    "group32": {"strategy": "group", "group_size": 32},
}
# How the library refuses: group quantization of a K that the group size does not divide, and
# block quantization of 3-D weights (its block reshape assumes 2-D).
REFUSES_RAGGED_GROUP = (ValueError, "divisble by the given group_size")
REFUSES_3D_BLOCK = (RuntimeError, "is invalid for input of size")


def random_weight(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05 + 0.01).to(dtype)


def library_scheme(fields: dict) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**fields))


def assert_bit_equal(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.dtype == theirs.dtype, name
    assert ours.shape == theirs.shape, name
    if ours.dtype == torch.float8_e4m3fn:
        ours, theirs = ours.view(torch.uint8), theirs.view(torch.uint8)
    assert torch.equal(ours, theirs), name


def assert_matches_library(format_name: str, fields: dict, weight: torch.Tensor) -> None:
    """Same qparams, same stored tensors from the same qparams, same decoded weight."""
    args = QuantArgs.from_dict(fields, key="weights")
    scheme = library_scheme(fields)
    library = BaseCompressor.get_value_from_registry(format_name)

    low, high = qmath.observe_min_max(weight, args)
    our_scale, our_zero_point = qmath.calculate_qparams(low, high, args)
    their_scale, their_zero_point = calculate_qparams(low, high, scheme.weights)
    assert_bit_equal(our_scale, their_scale, "scale")
    if not args.symmetric:
        assert_bit_equal(our_zero_point, their_zero_point, "zero_point")

    qparams = qmath.qparams_for(weight, args)
    ours = get_format(format_name).encode(weight, args, qparams=qparams)
    state = {"weight": weight, "weight_scale": qparams.scale}
    if qparams.zero_point is not None:
        state["weight_zero_point"] = qparams.zero_point  # unpacked: the library packs it itself
    theirs = library.compress(state, scheme)
    assert set(ours) == set(theirs)
    for name in ours:
        assert_bit_equal(ours[name], theirs[name], name)

    their_weight = library.decompress(dict(theirs), scheme)["weight"]
    our_weight = get_format(format_name).decode(theirs, args, layout="dense")
    assert_bit_equal(our_weight, their_weight, "weight")


def assert_library_refuses(
    format_name: str, fields: dict, weight: torch.Tensor, refusal: tuple[type[Exception], str]
) -> None:
    """The library refuses both to compress and to decompress this combination."""
    error, message = refusal
    args = QuantArgs.from_dict(fields, key="weights")
    scheme = library_scheme(fields)
    library = BaseCompressor.get_value_from_registry(format_name)
    qparams = qmath.qparams_for(weight, args)
    state = {"weight": weight, "weight_scale": qparams.scale}
    if qparams.zero_point is not None:
        state["weight_zero_point"] = qparams.zero_point
    with pytest.raises(error, match=message):
        library.compress(state, scheme)
    with pytest.raises(error, match=message):
        library.decompress(get_format(format_name).encode(weight, args, qparams=qparams), scheme)


def refusal_of(strategy: str, shape: tuple[int, ...]) -> tuple[type[Exception], str] | None:
    """The library's refusal of a strategy on a weight shape, or None where it handles it."""
    fields = STRATEGIES[strategy]
    if fields["strategy"] == "group" and shape[-1] % fields["group_size"]:
        return REFUSES_RAGGED_GROUP
    return None


def matrix(*axes: dict) -> list:
    """The cross product of named axes as pytest params with readable ids ("int4-asym-...")."""
    params = [((), ())]
    for axis in axes:
        params = [
            (values + (value,), ids + (name,))
            for values, ids in params
            for name, value in axis.items()
        ]
    return [pytest.param(*values, id="-".join(ids)) for values, ids in params]


PACK_ARGS = {
    f"int{bits}-{'sym' if symmetric else 'asym'}": {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
    }
    for bits in range(1, 9)
    for symmetric in (True, False)
}
NAIVE_ARGS = {
    "int8-sym": {"num_bits": 8, "type": "int", "symmetric": True},
    "int8-asym": {"num_bits": 8, "type": "int", "symmetric": False},
    "fp8-sym": {"num_bits": 8, "type": "float", "symmetric": True},
    "fp8-asym": {"num_bits": 8, "type": "float", "symmetric": False},
}


@pytest.mark.parametrize(
    ("quant", "strategy", "shape", "dtype"),
    matrix(PACK_ARGS, {s: s for s in STRATEGIES}, SHAPES, WEIGHT_DTYPES),
)
def test_pack_quantized_matches_library(quant, strategy, shape, dtype):
    fields = {**quant, **STRATEGIES[strategy]}
    weight = random_weight(shape, dtype, seed=quant["num_bits"])
    refusal = refusal_of(strategy, shape)
    if refusal:
        assert_library_refuses("pack-quantized", fields, weight, refusal)
    else:
        assert_matches_library("pack-quantized", fields, weight)


@pytest.mark.parametrize(
    ("quant", "strategy", "dtype"),
    matrix(PACK_ARGS, {s: s for s in EXPERT_STRATEGIES}, WEIGHT_DTYPES),
)
def test_pack_quantized_experts_match_library(quant, strategy, dtype):
    """Stacked 3-D expert weights: every expert packed on its own (zero points along N)."""
    fields = {**quant, **EXPERT_STRATEGIES[strategy]}
    assert_matches_library("pack-quantized", fields, random_weight(EXPERT_SHAPE, dtype, seed=3))


@pytest.mark.parametrize("quant", matrix(PACK_ARGS))
def test_pack_quantized_3d_block_is_refused_by_library(quant):
    fields = {**quant, "strategy": "block", "block_structure": [16, 64]}
    weight = random_weight(EXPERT_SHAPE, torch.bfloat16, seed=4)
    assert_library_refuses("pack-quantized", fields, weight, REFUSES_3D_BLOCK)


@pytest.mark.parametrize(
    ("format_name", "quant", "strategy", "shape", "dtype"),
    matrix(
        {n: n for n in NAIVE_NAMES}, NAIVE_ARGS, {s: s for s in STRATEGIES}, SHAPES, WEIGHT_DTYPES
    ),
)
def test_naive_quantized_matches_library(format_name, quant, strategy, shape, dtype):
    """The three names share one storage; the library's aliases do not check the type either."""
    fields = {**quant, **STRATEGIES[strategy]}
    weight = random_weight(shape, dtype, seed=5)
    refusal = refusal_of(strategy, shape)
    if refusal:
        assert_library_refuses(format_name, fields, weight, refusal)
    else:
        assert_matches_library(format_name, fields, weight)


@pytest.mark.parametrize(
    ("format_name", "bits"), matrix({n: n for n in NAIVE_NAMES}, {"fp4": 4, "fp6": 6})
)
def test_naive_fp4_and_fp6_are_refused_by_library(format_name, bits):
    """Only FP8 floats have a naive storage dtype; FP4/FP6 need their own packed formats."""
    fields = {"num_bits": bits, "type": "float", "strategy": "group", "group_size": 16}
    weight = random_weight((16, 64), torch.bfloat16, seed=6)
    scale = torch.ones(16, 4, dtype=torch.bfloat16)
    library = BaseCompressor.get_value_from_registry(format_name)
    with pytest.raises(NotImplementedError, match=r"Only num_bits in \(8\)"):
        library.compress({"weight": weight, "weight_scale": scale}, library_scheme(fields))


@pytest.mark.parametrize("bits", [9, 16])
def test_pack_quantized_wider_than_8_bits_is_refused(bits):
    fields = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel"}
    weight = random_weight((16, 64), torch.bfloat16, seed=7)
    args = QuantArgs.from_dict(fields, key="weights")
    state = {"weight": weight, "weight_scale": qmath.qparams_for(weight, args).scale}
    library = BaseCompressor.get_value_from_registry("pack-quantized")
    with pytest.raises(ValueError, match=r"only supported for num_bits in \[1, 8\]"):
        library.compress(state, library_scheme(fields))
    with pytest.raises(CTRefError, match="1 to 8 bits"):
        get_format("pack-quantized").encode(weight, args)
