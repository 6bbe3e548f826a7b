"""The preset schemes of compressed-tensors 0.20.0 (spec §5.1), kept as data.

A ``config_groups`` entry whose value is a list of targets names a preset by its key (looked up
upper-cased), e.g. ``{"W4A16": ["Linear"]}``; :class:`ctref.config.QuantizationConfig` expands it
to ``{"targets": [...], **PRESET_SCHEMES[name]}``. Each value holds exactly the ``weights`` /
``input_activations`` dicts a config would carry, with the fields the library sets explicitly
(the rest stay at their defaults), so an expanded preset equals the same scheme written out.

History (spec §5.2): W8A16 was int8 *channel* before 0.16 (group 128 since); the WxAy template
family appeared in 0.18; MXFP4XFP8, MXFP6A16 and MXFP6A8 in 0.20. A preset name in an old
checkpoint is therefore expanded with today's meaning, as 0.20.0 itself would.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESET_SCHEMES"]

_FP8_E4M3 = "torch.float8_e4m3fn"
_E8M0 = "torch.uint8"
_NVFP4_DTYPES = {"scale_dtype": _FP8_E4M3, "zp_dtype": _FP8_E4M3}
_MX_DTYPES = {"scale_dtype": _E8M0, "zp_dtype": _E8M0}


def _int(bits: int, strategy: str, **fields: Any) -> dict[str, Any]:
    """Symmetric integer args."""
    return {"num_bits": bits, "type": "int", "strategy": strategy, "symmetric": True, **fields}


def _float(bits: int, strategy: str, **fields: Any) -> dict[str, Any]:
    """Symmetric float args."""
    return {"num_bits": bits, "type": "float", "strategy": strategy, "symmetric": True, **fields}


def _int_wxay(weight_bits: int, act_bits: int) -> dict[str, Any]:
    """The 0.18+ template: int group-128 weights, plus int token-dynamic inputs below 16 bits."""
    scheme = {"weights": _int(weight_bits, "group", group_size=128, dynamic=False)}
    if act_bits < 16:
        scheme["input_activations"] = _int(act_bits, "token", dynamic=True)
    return scheme


_INT8_W8A8 = {
    "weights": _int(8, "channel", dynamic=False),
    "input_activations": _int(8, "token", dynamic=True),
}

_MXFP4_WEIGHTS = _float(4, "group", group_size=32, dynamic=False, **_MX_DTYPES)
_MXFP6_WEIGHTS = _float(6, "group", group_size=32, dynamic=False, **_MX_DTYPES)
_MXFP8_WEIGHTS = _float(8, "group", group_size=32, dynamic=False, **_MX_DTYPES)
_NVFP4_WEIGHTS = _float(4, "tensor_group", group_size=16, dynamic=False, **_NVFP4_DTYPES)

PRESET_SCHEMES: dict[str, dict[str, Any]] = {
    "UNQUANTIZED": {},
    # Allowed: 2 <= w <= 8, a in {4, 8, 16}, w <= a. W8A8 is not a template member: it is the
    # channel-weight INT8 scheme below.
    **{
        f"W{w}A{a}": _int_wxay(w, a)
        for w in range(2, 9)
        for a in (4, 8, 16)
        if w <= a and (w, a) != (8, 8)
    },
    "W4A16_ASYM": {
        "weights": {**_int(4, "group", group_size=128, dynamic=False), "symmetric": False},
    },
    "W8A8": _INT8_W8A8,
    "INT8": _INT8_W8A8,
    "W4AFP8": {
        "weights": _int(4, "group", group_size=128, dynamic=False),
        "input_activations": _float(8, "token", dynamic=True),
    },
    "FP8": {
        "weights": _float(8, "tensor", dynamic=False),
        "input_activations": _float(8, "tensor", dynamic=False, observer="static_minmax"),
    },
    "FP8_DYNAMIC": {
        "weights": _float(8, "channel", dynamic=False),
        "input_activations": _float(8, "token", dynamic=True),
    },
    "FP8_BLOCK": {
        "weights": _float(8, "block", block_structure=[128, 128], dynamic=False),
        "input_activations": _float(8, "group", group_size=128, dynamic=True),
    },
    "NVFP4A16": {"weights": _NVFP4_WEIGHTS},
    "NVFP4": {
        "weights": _NVFP4_WEIGHTS,
        "input_activations": _float(
            4,
            "tensor_group",
            group_size=16,
            dynamic="local",
            observer="static_minmax",
            **_NVFP4_DTYPES,
        ),
    },
    "MXFP4A16": {"weights": _MXFP4_WEIGHTS},
    "MXFP4": {
        "weights": _MXFP4_WEIGHTS,
        "input_activations": _float(4, "group", group_size=32, dynamic=True, **_MX_DTYPES),
    },
    "MXFP4XFP8": {
        "weights": _MXFP4_WEIGHTS,
        "input_activations": _float(8, "group", group_size=128, dynamic=True),
    },
    "MXFP6A16": {"weights": _MXFP6_WEIGHTS},
    "MXFP6A8": {
        "weights": _MXFP6_WEIGHTS,
        "input_activations": _float(8, "group", group_size=32, dynamic=True, **_MX_DTYPES),
    },
    "MXFP8A16": {"weights": _MXFP8_WEIGHTS},
    "MXFP8": {
        "weights": _MXFP8_WEIGHTS,
        "input_activations": _float(8, "group", group_size=32, dynamic=True, **_MX_DTYPES),
    },
}
