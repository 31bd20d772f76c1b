"""``fraudactors ab report``'s arguments: one clear line for what it cannot answer."""

from __future__ import annotations

import pytest

from fraudactors import cli


def test_a_window_longer_than_the_ledger_keeps_is_one_line_before_redis_is_asked(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines delete buckets older than ab.window_s (28 days by default): a 60-day report
    would be headed with 60 days and count 28. Redis is not reachable here: the refusal comes first."""
    monkeypatch.setenv("FRAUDACTORS_REDIS__URL", "redis://127.0.0.1:1/0")
    assert cli.main(["ab", "report", "--window-days", "60"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the ledger keeps ab.window_s = 28 days" in err[0], err
