"""Finding a backend by name: the built-in adapters, then the ``ctref.backends`` entry points.

Selection order: ``--backend NAME``, else the environment variable ``CTREF_BACKEND``, else
``reference``. An engine vendor registers an adapter from their own package, without touching this
repository, in its ``pyproject.toml``::

    [project.entry-points."ctref.backends"]
    my-engine = "my_engine.ctref_adapter:MyEngineBackend"

The entry point names a :class:`~conformance.backends.base.Backend` class (or any callable
returning a backend) taking no arguments.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from conformance.backends.base import Backend

ENTRY_POINT_GROUP = "ctref.backends"
ENV_VAR = "CTREF_BACKEND"
DEFAULT = "reference"

BUILTIN = {
    "reference": "conformance.backends.reference:ReferenceBackend",
    "compressed-tensors": "conformance.backends.compressed_tensors:CompressedTensorsBackend",
    "transformers": "conformance.backends.transformers:TransformersBackend",
    "torch-kernels": "conformance.backends.torch_kernels:TorchKernelsBackend",
    "trtllm": "conformance.backends.trtllm:TensorRTLLMBackend",
    "vllm": "conformance.backends.vllm:VLLMBackend",
}


class UnknownBackend(LookupError):
    """No built-in adapter or entry point has the requested name."""


def selected_name(option: str | None) -> str:
    """The backend name: the command-line option, else ``$CTREF_BACKEND``, else ``reference``."""
    return option or os.environ.get(ENV_VAR) or DEFAULT


def available() -> dict[str, str]:
    """Every selectable name and where it comes from (``module:attr``); entry points win ties
    only where no built-in has the name."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def load_backend(name: str) -> Backend:
    """Instantiate the backend called ``name`` (built-in first, then entry points)."""
    if name in BUILTIN:
        module_name, _, attribute = BUILTIN[name].partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            known = ", ".join(sorted(available()))
            raise UnknownBackend(
                f"no backend named {name!r}; known: {known} (built-ins, plus entry points in "
                f"group {ENTRY_POINT_GROUP!r})"
            )
        factory = matches[0].load()
    backend = factory()
    if not isinstance(backend, Backend):
        raise TypeError(f"backend {name!r} ({factory!r}) does not implement the Backend protocol")
    return backend
