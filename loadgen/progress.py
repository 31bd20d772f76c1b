"""Live progress on stderr: one refreshing line on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True, plain_every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.5 if self.tty else plain_every_s
        self._dirty = False

    def update(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, line: str | None = None) -> None:
        if not self.enabled:
            return
        if line is not None:
            self.update(line)
        if self.tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
        self._dirty = False


def format_line(phase: str, t_s: float, duration_s: float, target_rate: float, send_rate: float,
                sent: int, decided: int, p99_ms: float | None, dlq: int | None = None) -> str:
    p99 = "-" if p99_ms is None else f"{p99_ms:,.1f}ms"
    parts = [
        f"[{phase}] {t_s:5.1f}/{duration_s:.0f}s",
        f"target {target_rate:,.0f}/s",
        f"sent {send_rate:,.0f}/s",
        f"total {sent:,}",
        f"decided {decided:,}",
        f"pending {max(sent - decided, 0):,}",
        f"p99(window) {p99}",
    ]
    if dlq:
        parts.append(f"dlq {dlq:,}")
    return " | ".join(parts)
