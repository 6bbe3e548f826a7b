"""Every compression format, registered by name; importing this package registers them all."""

from ctref.formats import dense, marlin24, mxfp4, mxfp6, mxfp8, naive, nvfp4, pack, sparse24, sparse_bitmask  # noqa: F401  (registration side effects)
from ctref.formats.base import Format, TensorSpec, format_names, get_format

__all__ = ["Format", "TensorSpec", "format_names", "get_format"]
