"""Structured logging: JSON lines on stdout (or console rendering on a terminal).

Context is bound, not repeated: ``log = get_logger(actor="worker", partition=3)`` and the
per-message keys go through :func:`structlog.contextvars.bound_contextvars`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once for the process (idempotent)."""
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Route the standard library (aiokafka, asyncio) through the same level.
    logging.basicConfig(level=max(_LEVELS.get(level, logging.INFO), logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("fraudactors").bind(**context)
