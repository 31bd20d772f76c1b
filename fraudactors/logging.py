"""Structured logging: JSON lines on stdout (or console rendering on a terminal).

Context is bound, not repeated: ``log = get_logger(actor="worker", partition=3)`` and the
per-message keys go through :func:`structlog.contextvars.bound_contextvars`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable, Iterable, MutableMapping
from typing import Any

import orjson
import structlog

from fraudactors.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def _scrub(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, BaseException):  # rendered as its repr, which may quote a URL
        return redact(repr(value), secrets)
    return value


class _Redactor:
    """A structlog processor: URL passwords and the given secrets out of every value."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = frozenset(secrets)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
        return {key: _scrub(value, self._secrets) for key, value in event.items()}


class _RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._secrets = frozenset(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._secrets)


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None,
                      secrets: Iterable[str] = ()) -> None:
    """Configure structlog once for the process (idempotent). Every line, the standard library's
    too, has URL passwords and ``secrets`` (see ``settings.secret_values``) replaced by ``***``."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Route the standard library (aiokafka, asyncio) through the same level.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s", secrets))
    logging.basicConfig(level=max(_LEVELS.get(level, logging.INFO), logging.WARNING), handlers=[handler])


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("fraudactors").bind(**context)


class Every:
    """Whether a line about ``key`` is due: at most one per ``interval_s`` per key -- a failure
    that repeats on every batch or flush is said once a minute per kind, not once per try."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        return True
