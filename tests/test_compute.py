"""The fused (compiled) decode path gives the same bits as the eager one.

:mod:`ctref.compute` runs large decodes through ``torch.compile``; the reference is only as good
as that path, so each fused decode is compared with its eager self on data large enough to take
it, and the wrapper's own switches are checked.
"""

from __future__ import annotations

import pytest
import torch

from ctref import compute
from ctref.config import QuantArgs
from ctref.formats import get_format

FUSED_CASES = {
    "pack-w4-group": ("pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 128}),
    "pack-w3-asym-group": (
        "pack-quantized",
        {"num_bits": 3, "strategy": "group", "group_size": 64, "symmetric": False},
    ),
    "fp8-block-ragged": (
        "float-quantized",
        {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
    ),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_decode_equals_eager(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, fields = FUSED_CASES[case]
    args = QuantArgs.from_dict(fields, key="weights")
    shape = (1000, 2100) if fmt == "float-quantized" else (1024, 4096)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    codec = get_format(fmt)
    stored = codec.encode(weight, args)
    monkeypatch.setenv("CTREF_COMPILE", "never")
    eager = codec.decode(stored, args, layout="dense")
    monkeypatch.setenv("CTREF_COMPILE", "always")
    fused = codec.decode(stored, args, layout="dense")
    assert fused.dtype == eager.dtype
    assert torch.equal(fused, eager)


def test_out_buffer_receives_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTREF_COMPILE", "never")
    double = compute.fused(lambda x: x * 2)
    out = torch.empty(4)
    result = double(torch.arange(4.0), out=out)
    assert result is out
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0, 6.0]))


def test_unknown_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTREF_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="auto, always or never"):
        compute.fused(lambda x: x)(torch.ones(1))


def test_small_inputs_stay_eager_in_auto_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTREF_COMPILE", "auto")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    compute.fused(lambda x: x + 1)(torch.ones(8))
    assert compiled == []
