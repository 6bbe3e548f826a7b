"""CPU and CUDA decodes agree bit for bit, eager and fused (compiled) alike.

The reference must give the same dense weight wherever it runs: a CUDA decode that differed from
the CPU one in a single bit would make GPU conformance verdicts depend on where ctref ran.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctref.config import QuantArgs
from ctref.formats import get_format

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP8 = "torch.float8_e4m3fn"
CASES = {
    "pack-w4-group": ("pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 128}),
    "pack-w3-asym-channel": (
        "pack-quantized",
        {"num_bits": 3, "strategy": "channel", "symmetric": False},
    ),
    "pack-w8-tensor": ("pack-quantized", {"num_bits": 8, "strategy": "tensor"}),
    "int8-channel": ("int-quantized", {"num_bits": 8, "strategy": "channel"}),
    "fp8-block": (
        "float-quantized",
        {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
    ),
    "nvfp4": (
        "nvfp4-pack-quantized",
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "scale_dtype": FP8,
            "zp_dtype": FP8,
        },
    ),
    "mxfp4": (
        "mxfp4-pack-quantized",
        {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
         "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"},
    ),
    "mxfp8": (
        "mxfp8-quantized",
        {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32,
         "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"},
    ),
}


def decode_both(case: str, shape: tuple[int, int], dtype: torch.dtype, seed: int, monkeypatch):
    """The eager CPU decode, and the CUDA decode (fused where the inputs are large)."""
    fmt, fields = CASES[case]
    args = QuantArgs.from_dict(fields, key="weights")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    codec = get_format(fmt)
    stored = codec.encode(weight, args)
    with monkeypatch.context() as patch:
        patch.setenv("CTREF_COMPILE", "never")
        on_cpu = codec.decode(stored, args, layout="dense")
    on_cuda = codec.decode({k: v.cuda() for k, v in stored.items()}, args, layout="dense")
    return on_cpu, on_cuda


@settings(max_examples=10, deadline=None)
@given(
    case=st.sampled_from(sorted(CASES)),
    rows=st.integers(1, 9).map(lambda r: 16 * r + 1 if r % 2 else 16 * r),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_small_decodes_agree(case: str, rows: int, dtype: torch.dtype, seed: int) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        on_cpu, on_cuda = decode_both(case, (rows, 256), dtype, seed, monkeypatch)
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cpu, on_cuda.cpu())


@pytest.mark.parametrize("case", sorted(CASES))
def test_large_fused_decodes_agree(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large enough for the compiled path on CUDA (Triton), compared with the eager CPU decode."""
    monkeypatch.setenv("CTREF_COMPILE", "auto")
    on_cpu, on_cuda = decode_both(case, (2048, 4096), torch.bfloat16, 7, monkeypatch)
    assert torch.equal(on_cpu, on_cuda.cpu())
