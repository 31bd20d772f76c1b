"""A small progress indicator on stderr for the long training steps (no dependency).

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every 10 %. Counts are
rows, or bytes (``unit="bytes"``, shown in MB) when a file is read and its row count is unknown.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 enabled: bool = True, unit: str = "rows") -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_pct = -10
        self._done = 0

    def __call__(self, done: int) -> None:
        self.update(done)

    def _count(self, n: int) -> str:
        return f"{n / 1e6:,.1f} MB" if self.unit == "bytes" else f"{n:,}"

    def update(self, done: int) -> None:
        self._done = done
        if not self.enabled:
            return
        if self.total:
            pct = min(100, int(100 * done / self.total))
            of = f"{self._count(done)}/{self._count(self.total)}"
            if self._tty:
                bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
                self.stream.write(f"\r{self.label:<28} [{bar}] {pct:3d}% {of}")
                self.stream.flush()
            elif pct >= self._last_pct + 10:
                self._last_pct = pct - pct % 10
                self.stream.write(f"{self.label}: {pct}% ({of})\n")
        elif self._tty:
            self.stream.write(f"\r{self.label:<28} {self._count(done)}")
            self.stream.flush()

    def done(self, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        count = f" {self._count(self._done)}" if self._done else ""
        end = f" {note}" if note else ""
        prefix = "\r" if self._tty else ""
        self.stream.write(f"{prefix}{self.label:<28}{count} done in {elapsed:.1f}s{end}" + " " * 20 + "\n")
        self.stream.flush()


def step(label: str, enabled: bool = True) -> Progress:
    """A step without a count: announces itself, then ``done()`` prints the elapsed time."""
    p = Progress(label, enabled=enabled)
    if enabled and not p._tty:
        p.stream.write(f"{label}...\n")
    return p
