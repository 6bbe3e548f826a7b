"""Cross-checks of the legacy formats against compressed-tensors 0.14.0.1, the last writer of them.

sparse-bitmask, sparse-24-bitmask (alone and stacked on FP8/INT8 weights), marlin-24 and group
act-order ``weight_g_idx`` exist only up to 0.14.0.1, whose API (instance compressors) differs
from 0.20's, so these run in their own environment: ``nox -s peer-legacy``. Elsewhere they skip.
Every comparison is bit for bit (floats viewed as integers of their width, so -0.0 counts).
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

# Skip on the distribution's version, then import plainly: an installed 0.14 that cannot be
# imported (0.14.0.1 imports psutil without declaring it) must fail the session, not skip it.
try:
    PEER_VERSION = metadata.version("compressed-tensors")
except metadata.PackageNotFoundError:
    pytest.skip(
        "compressed-tensors 0.14.0.1 not installed (nox -s peer-legacy)", allow_module_level=True
    )
if not PEER_VERSION.startswith("0.14"):
    pytest.skip(
        f"legacy peer tests need compressed-tensors 0.14.x (nox -s peer-legacy), found "
        f"{PEER_VERSION}",
        allow_module_level=True,
    )

import compressed_tensors as peer  # noqa: E402

assert peer.__version__.startswith("0.14"), peer.__version__

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from compressed_tensors.utils import mask_creator  # noqa: E402

from ctref import qmath  # noqa: E402
from ctref.config import QuantArgs  # noqa: E402
from ctref.formats import get_format  # noqa: E402

pytestmark = pytest.mark.peer_legacy

SPARSE_CONFIGS = {"sparse-bitmask": BitmaskConfig, "sparse-24-bitmask": Sparse24BitMaskConfig}
MODULE = "model.layers.0.mlp.down_proj"
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.dtype.is_floating_point else t


def assert_same(mine: torch.Tensor, theirs: torch.Tensor, name: str = "") -> None:
    assert mine.dtype == theirs.dtype, f"{name}: {mine.dtype} != {theirs.dtype}"
    assert mine.shape == theirs.shape, f"{name}: {tuple(mine.shape)} != {tuple(theirs.shape)}"
    assert torch.equal(bits(mine), bits(theirs)), name


def local(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's tensors under their local names."""
    prefix = MODULE + "."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def sparse_compressor(name: str):
    return BaseCompressor.load_from_registry(name, config=SPARSE_CONFIGS[name]())


def library_sparse_decode(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    keys = ("shape", "compressed", "bitmask") + (
        ("row_offsets",) if name == "sparse-bitmask" else ()
    )
    return sparse_compressor(name).decompress_weight({k: tensors[k] for k in keys})


def awkward_weight(dtype: torch.dtype, rows: int = 24, cols: int = 48) -> torch.Tensor:
    """Random values with zeros, -0.0, ties and sparse groups, in ``dtype``."""
    generator = torch.Generator().manual_seed(rows * cols)
    weight = torch.randn(rows, cols, generator=generator) * 4
    weight[torch.rand(rows, cols, generator=generator) < 0.35] = 0.0
    weight[0] = 0.0
    weight[1, ::4] = 3.0  # one non-zero per group
    weight[2] = torch.tensor([2.0, -2.0, 2.0, 1.0] * (cols // 4))  # three-way ties
    weight[3, 1::3] = -0.0
    if dtype == torch.int8:
        weight = weight.round().clamp(-128, 127)
        weight[4, ::4] = -128  # int8 abs(-128) wraps
        return weight.to(torch.int8)
    return weight.to(dtype)


@pytest.mark.parametrize("name", SPARSE_CONFIGS)
@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8],
    ids=str,
)
def test_sparse_encode_and_decode_match_library(name: str, dtype: torch.dtype) -> None:
    weight = awkward_weight(dtype)
    theirs = local(sparse_compressor(name).compress({f"{MODULE}.weight": weight}))
    mine = get_format(name).encode(weight, None)
    assert set(mine) == set(theirs)
    for key, tensor in mine.items():
        assert_same(tensor, theirs[key], key)
    assert_same(
        get_format(name).decode(theirs, None, layout="dense"), library_sparse_decode(name, theirs)
    )


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8], ids=str
)
def test_sparse24_selection_matches_library_for_every_tie_pattern(dtype: torch.dtype) -> None:
    """Every group over {0, ±1, ±2, ±3} magnitudes (incl. -0.0 and fp8 negatives): same bytes."""
    values = torch.tensor([0.0, -0.0, 1.0, -2.0, 2.0, -3.0, 3.0])
    index = torch.cartesian_prod(*[torch.arange(len(values))] * 4)
    weight = values[index].to(dtype)  # one group a row, every combination
    if dtype == torch.int8:
        weight[::7, 0] = -128
    theirs = local(sparse_compressor("sparse-24-bitmask").compress({f"{MODULE}.weight": weight}))
    mine = get_format("sparse-24-bitmask").encode(weight, None)
    for key, tensor in mine.items():
        assert_same(tensor, theirs[key], key)


# ---------------------------------------------------------------------------------------------
# sparsity stacked on FP8 / INT8 quantization: quantize, then compress the codes


STACKED_QUANT = {
    "float-quantized": {"num_bits": 8, "type": "float", "strategy": "channel"},
    "int-quantized": {"num_bits": 8, "type": "int", "strategy": "channel"},
}


@pytest.mark.parametrize("sparse_name", SPARSE_CONFIGS)
@pytest.mark.parametrize("quant_name", STACKED_QUANT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sparsity_stacked_on_quantization_matches_library(
    sparse_name: str, quant_name: str, dtype: torch.dtype
) -> None:
    args_dict = STACKED_QUANT[quant_name]
    library_args = QuantizationArgs(**args_dict)
    args = QuantArgs.from_dict(args_dict, key="weights")
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    weight = weight * mask_creator(weight).to(dtype)  # 2:4 pruned, as a sparse model is
    weight[5, :16] = 0.0
    low, high = qmath.observe_min_max(weight, args)
    scale, zero_point = calculate_qparams(low, high, library_args)

    state = {
        f"{MODULE}.weight": weight,
        f"{MODULE}.weight_scale": scale,
        f"{MODULE}.weight_zero_point": zero_point,
    }
    schemes = {MODULE: QuantizationScheme(targets=["Linear"], weights=library_args)}
    quant_compressor = BaseCompressor.load_from_registry(quant_name)
    quantized = quant_compressor.compress(state, names_to_scheme=schemes)
    theirs = sparse_compressor(sparse_name).compress(quantized, compression_targets={MODULE})

    # The writer adds the (all-zero) symmetric zero point while quantizing, which turns -0.0
    # into +0.0; ctref is given the same parameters.
    qparams = qmath.QParams(scale, zero_point)
    codes = get_format(quant_name).encode(weight, args, qparams=qparams)["weight"]
    assert_same(codes, quantized[f"{MODULE}.weight"], "weight")
    mine = get_format(sparse_name).encode(codes, None)
    for key, tensor in mine.items():
        assert_same(tensor, theirs[f"{MODULE}.{key}"], key)

    # Decode: sparsity first, then quantization.
    library_codes = dict(sparse_compressor(sparse_name).decompress_from_state_dict(theirs))
    library_dense = quant_compressor.decompress_weight(
        {"weight": library_codes[f"{MODULE}.weight"], "weight_scale": scale},
        quantization_args=library_args,
    )
    my_codes = get_format(sparse_name).decode(local(theirs), None, layout="dense")
    assert_same(my_codes, library_codes[f"{MODULE}.weight"], "codes")
    my_dense = get_format(quant_name).decode(
        {"weight": my_codes, "weight_scale": scale}, args, layout="dense"
    )
    assert_same(my_dense, library_dense, "dense")


# ---------------------------------------------------------------------------------------------
# marlin-24: the library writes it and cannot read it; ctref's decoder must invert its writer


@pytest.mark.parametrize("bits_", [4, 8])
@pytest.mark.parametrize(("strategy", "cols"), [("group", 512), ("group", 256), ("channel", 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_marlin24_round_trip_through_library_writer(
    bits_: int, strategy: str, cols: int, dtype: torch.dtype
) -> None:
    """compress(2:4-pruned fake-quantized W) → ctref decode == the library's fp16 fake-quant."""
    args_dict = {
        "num_bits": bits_,
        "strategy": strategy,
        "group_size": 128 if strategy == "group" else None,
    }
    library_args = QuantizationArgs(**args_dict)
    args = QuantArgs.from_dict(args_dict, key="weights")
    rows = 128
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(bits_ * cols)).to(
        dtype
    )
    weight = weight * mask_creator(weight).to(dtype)
    weight[3, :128] = 0.0  # a degenerate all-zero group: eps scale, every nibble from the zero rule
    weight[7] = 0.0
    weight[7, ::4] = 1.0  # groups with a single non-zero
    low, high = qmath.observe_min_max(weight, args)
    scale, zero_point = calculate_qparams(low, high, library_args)
    fake = fake_quantize(weight, scale, zero_point, library_args)

    state = {
        f"{MODULE}.weight": fake,
        f"{MODULE}.weight_scale": scale,
        f"{MODULE}.weight_zero_point": zero_point,
    }
    schemes = {MODULE: QuantizationScheme(targets=["Linear"], weights=library_args)}
    with pytest.warns(DeprecationWarning):
        theirs = local(
            BaseCompressor.load_from_registry("marlin-24").compress(state, names_to_scheme=schemes)
        )
    assert set(theirs) == {"weight_packed", "meta", "scale_packed"}

    fp16_scale = scale.to(torch.float16)
    expected = fake_quantize(fake.to(torch.float16), fp16_scale, zero_point, library_args)
    decoded = get_format("marlin-24").decode(theirs, args, layout="dense")
    assert_same(decoded, expected, "decoded")
    if dtype == torch.float16:
        # Equal values; the integer codes carry no -0.0, which the fake-quantized weight may hold.
        assert torch.equal(decoded, fake)

    mine = get_format("marlin-24").encode(fake, args, qparams=qmath.QParams(scale))
    for key, tensor in mine.items():
        assert_same(tensor, theirs[key], key)


# ---------------------------------------------------------------------------------------------
# legacy group act-order: pack-quantized with weight_g_idx


@pytest.mark.parametrize(("num_bits", "symmetric"), [(4, True), (4, False), (8, True), (3, False)])
def test_pack_quantized_act_order_matches_library(num_bits: int, symmetric: bool) -> None:
    """0.14 packs sub-byte fields in the legacy word layout (whole fields per word)."""
    args_dict = {
        "num_bits": num_bits,
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": 16,
        "actorder": "group",
    }
    library_args = QuantizationArgs(**args_dict)
    args = QuantArgs.from_dict(args_dict, key="weights")
    rows, cols = 24, 80
    generator = torch.Generator().manual_seed(num_bits)
    weight = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    g_idx = (torch.arange(cols) // 16)[torch.randperm(cols, generator=generator)].to(torch.int32)
    qparams = qmath.qparams_for(weight, args, g_idx)

    state = {
        f"{MODULE}.weight": weight,
        f"{MODULE}.weight_scale": qparams.scale,
        f"{MODULE}.weight_g_idx": g_idx,
    }
    if qparams.zero_point is not None:
        state[f"{MODULE}.weight_zero_point"] = qparams.zero_point
    schemes = {MODULE: QuantizationScheme(targets=["Linear"], weights=library_args)}
    compressor = BaseCompressor.load_from_registry("pack-quantized")
    theirs = local(compressor.compress(state, names_to_scheme=schemes))

    pack = get_format("pack-quantized")
    mine = pack.encode(weight, args, layout="legacy", qparams=qparams)
    assert set(mine) == set(theirs)
    for key, tensor in mine.items():
        assert_same(tensor, theirs[key], key)

    library_dense = compressor.decompress_weight(dict(theirs), quantization_args=library_args)
    assert_same(pack.decode(theirs, args, layout="legacy"), library_dense, "dense")
    # The g_idx gather matters: contiguous groups decode differently.
    without = {k: v for k, v in theirs.items() if k != "weight_g_idx"}
    assert not torch.equal(pack.decode(without, args, layout="legacy"), library_dense)
