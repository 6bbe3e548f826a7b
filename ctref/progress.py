"""A plain-text progress line for long commands, on stderr.

On a terminal it redraws one line (``\\r``) at most a few times a second: a bar, the count, bytes
and an estimate of the time left. When stderr is not a terminal (a log, a pipe, CI) or the user
asked for ``--quiet``, nothing is drawn. Either way :meth:`Progress.finish` prints one summary
line, so a log still records what was done and how long it took.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]

BAR_WIDTH = 24
REDRAW_SECONDS = 0.2


def human_bytes(count: float) -> str:
    """``1.5 GiB``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} TiB"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Progress over ``total_bytes`` of input, reported as items (``unit``) and bytes.

    The bar follows bytes, which is what time is spent on; the count of items is shown beside it.
    """

    def __init__(
        self,
        label: str,
        total_items: int = 0,
        total_bytes: int = 0,
        *,
        unit: str = "modules",
        quiet: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.unit = unit
        self.set_totals(total_items, total_bytes)
        self.items = 0
        self.bytes = 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = not quiet and self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def set_totals(self, total_items: int, total_bytes: int) -> None:
        """The totals, once known (after the checkpoint is opened and planned)."""
        self.total_items = total_items
        self.total_bytes = max(total_bytes, 1)

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if self.live and now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self.stream.write("\r" + self._line() + "\x1b[K")
            self.stream.flush()

    def _line(self) -> str:
        done = min(self.bytes / self.total_bytes, 1.0)
        filled = int(done * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = self.elapsed
        left = f"  {_clock(elapsed * (1 - done) / done)} left" if 0 < done < 1 else ""
        return (
            f"{self.label} [{bar}] {self.items}/{self.total_items} {self.unit}  "
            f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)}  {_clock(elapsed)}{left}"
        )

    def finish(self, summary: str) -> None:
        """Clear the live line and print ``summary`` with the elapsed time."""
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{summary} in {self.elapsed:.1f} s\n")
        self.stream.flush()
