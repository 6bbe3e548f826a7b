"""ctref: the reference reader and conformance suite for compressed-tensors checkpoints.

``open_checkpoint(path)`` opens a checkpoint directory lazily; ``Checkpoint.dequantize(module)``
returns one module's dense weight. Only torch and safetensors are imported.
"""

from ctref.checkpoint import Checkpoint, ModuleInfo, open_checkpoint
from ctref.config import QuantArgs, QuantizationConfig, QuantScheme
from ctref.errors import CTRefError
from ctref.formats import format_names, get_format

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CTRefError",
    "ModuleInfo",
    "QuantArgs",
    "QuantScheme",
    "QuantizationConfig",
    "__version__",
    "format_names",
    "get_format",
    "open_checkpoint",
]
