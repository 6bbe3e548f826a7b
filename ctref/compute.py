"""Fast execution of the reference's own tensor math, without a second copy of it.

Eager PyTorch runs a decode as a chain of element-wise passes (shift, mask, subtract, convert,
multiply), each a trip through memory; on large weights that is ~15x slower than the memory
bound (torch-and-gpu-notes.md). :func:`fused` runs the *same* Python function through
``torch.compile`` once its inputs are large, which fuses the chain into one kernel. Both paths
give identical bits where the maths is exact (all integer and FP8 decodes: every intermediate is
exactly representable in fp32); tests/test_compute.py checks it for each fused function.

``CTREF_COMPILE`` selects: ``auto`` (default: compile when the tensor arguments hold 4 MiB or more),
``always`` or ``never``. A compiler failure falls back to eager with one warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ctref.errors import CTRefError

F = TypeVar("F", bound=Callable[..., torch.Tensor])

LARGE_BYTES = 4 << 20
_compile_broken = False


def _mode() -> str:
    mode = os.environ.get("CTREF_COMPILE", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"CTREF_COMPILE must be auto, always or never, not {mode!r}")
    return mode


def wants_compile(*args: Any) -> bool:
    """Whether :func:`fused` would compile for these arguments (their tensors' size, the mode)."""
    mode = _mode()
    if mode == "never" or _compile_broken:
        return False
    if mode == "always":
        return True
    held = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    return held >= LARGE_BYTES


def fused(fn: F) -> F:
    """``fn`` unchanged for small inputs; compiled into fused kernels for large ones.

    The wrapper also accepts ``out=``: the result is written into that tensor (inside the
    compiled kernel, so a reused buffer costs no new allocation).
    """

    def into(out: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return out.copy_(fn(*args, **kwargs))

    compiled: dict[bool, Callable[..., torch.Tensor]] = {}

    @functools.wraps(fn)
    def run(*args: Any, out: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        global _compile_broken
        if wants_compile(*args):
            with_out = out is not None
            if with_out not in compiled:
                compiled[with_out] = torch.compile(into if with_out else fn, dynamic=False)
            try:
                if with_out:
                    return compiled[True](out, *args, **kwargs)
                return compiled[False](*args, **kwargs)
            except CTRefError:
                raise
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                _compile_broken = True
                warnings.warn(
                    f"ctref: torch.compile failed ({type(error).__name__}: {error}); "
                    "decoding eagerly from now on (set CTREF_COMPILE=never to silence)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return into(out, *args, **kwargs) if out is not None else fn(*args, **kwargs)

    return run  # type: ignore[return-value]

