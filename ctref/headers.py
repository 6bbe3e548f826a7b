"""Safetensors headers, parsed from the bytes without touching any tensor's data.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and ``data_offsets`` relative to the end of the header, plus optional ``__metadata__``),
then the data. Reading the header costs two small reads however large the file; the byte offsets
let a caller size, copy or read one tensor exactly (``os.pread``), so nothing is memory-mapped.

:func:`index_disagreements` compares an index's weight map with the shards, listing every
disagreement rather than the first, which is what a linter needs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ctref.errors import CTRefError

__all__ = ["ShardHeader", "TensorEntry", "index_disagreements", "read_header"]

HEADER_LIMIT = 100_000_000
"""safetensors refuses headers above 100 MB; a larger length means a corrupt or foreign file."""

_RE_SAVE = "re-download or re-save the shard"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: safetensors dtype name (``BF16``), shape, absolute byte span."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    """A shard's header: its tensors in file order (by offset) and its ``__metadata__``."""

    path: Path
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]

    @property
    def file(self) -> str:
        return self.path.name

    @property
    def data_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())


def read_header(path: str | Path) -> ShardHeader:
    """Parse ``path``'s header; CTRefError (naming the file) for anything a reader would choke on.

    Checks that the header fits the file, is a JSON object of well-formed entries, and that every
    tensor's bytes lie inside the file (a truncated download is caught here, before any data is
    read).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            size = path.stat().st_size
            if len(prefix) < 8:
                raise CTRefError(
                    f"only {len(prefix)} bytes, too short for a safetensors header; {_RE_SAVE}",
                    file=path.name,
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > HEADER_LIMIT or 8 + length > size:
                raise CTRefError(
                    f"header length {length} does not fit the file ({size} bytes): not a "
                    f"safetensors file, or truncated; {_RE_SAVE}",
                    file=path.name,
                )
            raw = handle.read(length)
    except OSError as error:
        raise CTRefError(
            f"cannot read ({error.strerror or error}); check the file's permissions",
            file=path.name,
        ) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CTRefError(
            f"the safetensors header is not valid JSON ({error}); {_RE_SAVE}", file=path.name
        ) from None
    if not isinstance(header, dict):
        raise CTRefError(f"the safetensors header is not a JSON object; {_RE_SAVE}", file=path.name)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries = [_entry(path.name, name, value, data_start) for name, value in header.items()]
    entries.sort(key=lambda entry: entry.start)
    for entry in entries:
        if entry.end > size:
            raise CTRefError(
                f"its bytes end at {entry.end} but the file has {size}: the file is truncated; "
                f"{_RE_SAVE}",
                file=path.name,
                tensor=entry.name,
            )
    return ShardHeader(
        path=path,
        tensors={entry.name: entry for entry in entries},
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )


def _entry(file: str, name: str, value: object, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = value["dtype"], value["shape"], value["data_offsets"]  # type: ignore[index]
        valid = (
            isinstance(dtype, str)
            and all(isinstance(dim, int) and dim >= 0 for dim in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise CTRefError(
            f"malformed header entry {value!r} (needs dtype, shape, data_offsets); {_RE_SAVE}",
            file=file,
            tensor=name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def index_disagreements(
    index_name: str, weight_map: Mapping[str, str], shards: Mapping[str, ShardHeader]
) -> list[CTRefError]:
    """Every way the index's ``weight_map`` and the shards' headers disagree.

    ``shards`` maps file names to headers of the files that exist. Reported: a shard the index
    names that does not exist, a tensor the index lists but its shard lacks or another shard
    holds, a stored tensor the index does not list, a tensor stored in two shards.
    """
    problems: list[CTRefError] = []
    stored_in: dict[str, str] = {}
    for file, header in shards.items():
        for name in header.tensors:
            if name in stored_in:
                problems.append(
                    CTRefError(
                        f"also stored in {stored_in[name]}; a tensor lives in one file",
                        file=file,
                        tensor=name,
                    )
                )
            else:
                stored_in[name] = file
    missing_files = sorted({file for file in weight_map.values() if file not in shards})
    for file in missing_files:
        count = sum(1 for f in weight_map.values() if f == file)
        problems.append(
            CTRefError(
                f"{index_name} maps {count} tensors to this file, which does not exist", file=file
            )
        )
    for name, file in weight_map.items():
        if file not in shards:
            continue
        holder = stored_in.get(name)
        if holder is None:
            problems.append(
                CTRefError(
                    f"listed in {index_name} but not stored in this file", file=file, tensor=name
                )
            )
        elif holder != file:
            problems.append(
                CTRefError(
                    f"stored here, but {index_name} maps it to {file}", file=holder, tensor=name
                )
            )
    for name, file in stored_in.items():
        if name not in weight_map:
            problems.append(
                CTRefError(f"stored here but not listed in {index_name}", file=file, tensor=name)
            )
    return problems
