"""Fixtures of the engine's tests: settings for an in-process engine (models: ``models_dir`` in
tests/conftest.py, the committed ones)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudactors.settings import Settings


@pytest.fixture
def engine_settings(settings: Settings, models_dir: Path) -> Iterator[Settings]:
    """The shared ``settings`` (with its quick group timeouts: Tansu holds a group's first JoinGroup
    for about ``session_timeout_ms / 2``, see tests/conftest.py) plus the committed models and the
    default inference mode (the process pool)."""
    yield settings.replace(
        models={"dir": str(models_dir)},
        engine={"commit_interval_ms": 200, "shutdown_timeout_s": 15.0},
    )
