"""The alert rules under `promtool test rules`: deploy/prometheus/tests/*.yml show every alert of
deploy/prometheus/alerts.yml firing on the series that should fire it, and quiet on the ones that
should not. promtool comes with Debian's `prometheus` package (.ci/run and `make test` install it
when missing); without it these tests fail, never skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
INSTALL = "apt-get install -y --no-install-recommends prometheus (Debian's package ships promtool)"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool is not on PATH: install it with `{INSTALL}` (make test does when it can)")
    return path


def run_rule_tests(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), "test", "rules", *map(str, files)], capture_output=True, text=True,
                          timeout=120, check=False)


def alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r]


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no promtool tests in deploy/prometheus/tests"
    result = run_rule_tests(*RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        spec: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert [(path.parent / f).resolve() for f in spec["rule_files"]] == [ALERTS.resolve()]
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alert_names())
    assert names - firing == set(), "alerts no promtool test shows firing"
    assert names - quiet == set(), "alerts no promtool test shows quiet"
    assert (firing | quiet) - names == set(), "promtool tests of alerts that do not exist"


def test_a_wrong_expectation_fails_the_promtool_run(tmp_path: Path) -> None:
    """The runner reads promtool's verdict: a test that expects the drift alert on a PSI under the
    threshold fails."""
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": 'fraudactors_score_psi{version="v1"}', "values": "0.1x30"}],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "FraudactorsScorePSIHigh",
                             "exp_alerts": [{"exp_labels": {"severity": "ticket", "team": "fraud-ml",
                                                            "version": "v1"}}]}]}]}
    path = tmp_path / "wrong_test.yml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = run_rule_tests(path)
    assert result.returncode != 0 and "FraudactorsScorePSIHigh" in result.stdout + result.stderr


def test_without_promtool_the_rule_tests_fail_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(BaseException) as info:  # a skip (BaseException) must not pass for a failure
        test_the_alert_rules_pass_their_promtool_unit_tests()
    assert info.type is pytest.fail.Exception
    assert "apt-get install" in str(info.value) and "prometheus" in str(info.value)
