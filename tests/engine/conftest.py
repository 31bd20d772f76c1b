"""Fixtures of the engine's tests: settings for an in-process engine (models: ``models_dir`` in
tests/conftest.py, the committed ones)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudactors.settings import Settings


def _inference_mode() -> str:
    try:
        from fraudactors.actors.pool import ProcessPool  # noqa: F401
    except ImportError:
        return "thread"
    return "process"


@pytest.fixture
def engine_settings(settings: Settings, models_dir: Path) -> Iterator[Settings]:
    """The shared ``settings`` plus models, quick group timeouts and the default inference mode."""
    yield settings.replace(
        models={"dir": str(models_dir)},
        engine={"inference_mode": _inference_mode(), "commit_interval_ms": 200, "shutdown_timeout_s": 15.0},
        kafka={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
    )
