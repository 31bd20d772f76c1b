"""The engine's test settings run what production runs: the process pool, never a quiet substitute."""

from __future__ import annotations

import sys

import pytest

from fraudactors.settings import Settings


def test_engine_settings_keep_the_process_pool_even_when_it_cannot_be_imported(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken pool module must fail the engine's tests, not switch them to thread mode.
    monkeypatch.setitem(sys.modules, "fraudactors.actors.pool", None)
    settings: Settings = request.getfixturevalue("engine_settings")
    assert settings.engine.inference_mode == "process"
