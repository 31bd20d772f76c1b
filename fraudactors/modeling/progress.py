"""A small progress indicator on stderr for the long training steps (no dependency).

On a terminal it redraws one line; otherwise (logs, CI) it prints a line every 10 %.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_pct = -10
        self._done = 0

    def __call__(self, done: int) -> None:
        self.update(done)

    def update(self, done: int) -> None:
        self._done = done
        if not self.enabled:
            return
        if self.total:
            pct = min(100, int(100 * done / self.total))
            if self._tty:
                bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
                self.stream.write(f"\r{self.label:<28} [{bar}] {pct:3d}% {done:,}/{self.total:,}")
                self.stream.flush()
            elif pct >= self._last_pct + 10:
                self._last_pct = pct - pct % 10
                self.stream.write(f"{self.label}: {pct}% ({done:,}/{self.total:,})\n")
        elif self._tty:
            self.stream.write(f"\r{self.label:<28} {done:,}")
            self.stream.flush()

    def done(self, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        count = f" {self._done:,}" if self._done else ""
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
