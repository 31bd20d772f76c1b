"""A tiny model set trained once per module run (fast: a few hundred simulated users)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraudactors.cli import main as cli_main

TINY = ["--synthetic", "--seed", "3", "--users", "400", "--merchants", "300", "--days", "30",
        "--warmup-days", "3", "--calib-days", "5", "--gap-days", "3", "--test-days", "7", "--quiet"]


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """The ``fraudactors train`` arguments of :func:`tiny_models` (without ``--out``)."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    assert cli_main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_models_no_refit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same models shipped from the time split itself (``--no-refit``)."""
    out = tmp_path_factory.mktemp("models-no-refit")
    assert cli_main(["train", *TINY, "--no-refit", "--out", str(out)]) == 0
    return out
