"""Every compression format, registered by name; importing this package registers them all."""

from ctref.formats import dense, naive, pack  # noqa: F401  (registration side effects)
from ctref.formats.base import Format, TensorSpec, format_names, get_format

__all__ = ["Format", "TensorSpec", "format_names", "get_format"]
