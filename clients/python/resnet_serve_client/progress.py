"""A one-line progress bar on a terminal stream.

Drawn here rather than taken from tqdm so the SDK keeps its three
dependencies and ``pip install`` alone gives the CLI its progress display;
it needs no more than a counter, a rate and an estimate of the time left.
"""

from __future__ import annotations

import time
from typing import TextIO

_WIDTH = 24
_INTERVAL = 0.1  # seconds between redraws


class Progress:
    """``done/total  pct% |████····| rate/s  ETA``, redrawn in place at most 10 times a second."""

    def __init__(self, total: int, stream: TextIO, *, unit: str = "images") -> None:
        self.total, self.stream, self.unit = total, stream, unit
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0

    def __enter__(self) -> Progress:
        self.draw()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()

    def update(self, count: int = 1) -> None:
        self.done += count
        if time.monotonic() - self._drawn >= _INTERVAL:
            self.draw()

    def clear(self) -> None:
        """Blank the bar's line, so other output can be written to the same terminal."""
        self.stream.write("\r\033[K")

    def draw(self) -> None:
        now = time.monotonic()
        self._drawn = now
        elapsed = now - self._start
        fraction = self.done / self.total if self.total else 1.0
        filled = round(fraction * _WIDTH)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f"ETA {(self.total - self.done) / rate:4.0f}s" if rate else "ETA    ?"
        self.stream.write(
            f"\r{self.done:>{len(str(self.total))}}/{self.total} {fraction:4.0%} "
            f"|{'█' * filled}{'·' * (_WIDTH - filled)}| {rate:6.1f} {self.unit}/s  {left}"
        )
        self.stream.flush()
