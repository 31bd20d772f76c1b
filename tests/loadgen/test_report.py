"""Matching decisions, latency from the scheduled time, the report's arithmetic and files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import orjson
import pytest

from loadgen.collector import DecisionCollector
from loadgen.progress import Progress, format_line
from loadgen.report import (
    auc_score,
    build_report,
    check_report,
    ensure_report_dir,
    format_table,
    lost_line,
    remove_old_report,
    render_markdown,
    write_outputs,
)
from loadgen.runner import LoadConfig, LoadgenError, RunResult
from loadgen.schedule import make_profile, scheduled_times

PREFIX = "lg-test-"


def decision(i: int, *, prob: float = 0.1, variant: str = "A", degraded: bool = False,
             prefix: str = PREFIX, engine_ms: float | None = None) -> bytes:
    d = {"transaction_id": f"{prefix}{i}", "user_id": "c-1", "is_fraud": prob >= 0.5,
         "fraud_probability": prob, "decision": "decline" if prob >= 0.5 else "approve",
         "variant": variant, "degraded": degraded}
    if engine_ms is not None:
        d["latency_ms"] = engine_ms
    return orjson.dumps(d)


def make_result(collector: DecisionCollector, is_fraud: np.ndarray, sent: int, duration: float,
                rate: float) -> RunResult:
    profile = make_profile("constant", rate, duration)
    sched = collector.scheduled_s
    return RunResult(
        config=LoadConfig(profile=profile, progress=False), run_id="test", prefix=PREFIX,
        started_at="2026-11-28T00:00:00+00:00", scheduled_s=sched, sent_at_s=sched.copy(), is_fraud=is_fraud,
        scenarios=["legit" if not f else "stolen_card" for f in is_fraud], collector=collector, sent=sent,
        send_errors=0, send_end_s=duration, end_s=duration + 0.5, drained=True, dlq=3, labels_sent=0,
        source_name="test")


def test_latency_counts_from_the_scheduled_send_time() -> None:
    sched = np.array([0.0, 0.5, 1.0])
    c = DecisionCollector(PREFIX, sched, start=100.0)
    # read at run time 2.0 s: the decisions are 2.0, 1.5 and 1.0 s late, however fast the send was
    c.feed([decision(0), decision(1), decision(2)], now=102.0)
    np.testing.assert_allclose(c.matches.latency_ms, [2000.0, 1500.0, 1000.0])
    assert c.histogram.get_max_value() == pytest.approx(2_000_000, rel=1e-3)  # microseconds
    assert c.histogram.get_min_value() == pytest.approx(1_000_000, rel=1e-3)


def test_duplicates_foreign_and_malformed_decisions_are_counted_apart() -> None:
    sched = np.zeros(4)
    c = DecisionCollector(PREFIX, sched, start=0.0)
    c.feed([decision(0), decision(1), decision(0), decision(0), decision(9, prefix="other-"),
            decision(17), b"not json", b'{"no": "id"}'], now=1.0)
    assert c.distinct == 2
    assert c.duplicates == 2
    assert c.foreign == 2  # another run's id, and an index past the run's end
    assert c.malformed == 2
    assert c.matches.counts.tolist() == [3, 1, 0, 0]


def test_report_arithmetic_lost_duplicates_accuracy_variants() -> None:
    n = 10
    sched = np.arange(n) / 10.0
    c = DecisionCollector(PREFIX, sched, start=0.0)
    is_fraud = np.array([True, True, False, False, False, False, False, False, False, False])
    # 0: fraud caught; 1: fraud missed; 2: false positive; 3..7 fine; 8, 9 never decided; 3 twice
    values = [decision(0, prob=0.9, variant="B"), decision(1, prob=0.2), decision(2, prob=0.7),
              *[decision(i, prob=0.05, degraded=(i == 4)) for i in range(3, 8)], decision(3, prob=0.05)]
    c.feed(values, now=1.5)
    report = build_report(make_result(c, is_fraud, n, 1.0, 10))
    check_report(report)
    assert report["sent"] == 10
    assert report["decided"] == 8
    assert report["lost"] == 2
    assert report["duplicates"] == 1
    assert report["dlq"] == 3
    assert report["variants"] == {"A": 7, "B": 1}
    assert report["degraded"] == 1
    acc = report["accuracy"]
    assert acc["detection_rate"] == pytest.approx(0.5)
    assert acc["false_positive_rate"] == pytest.approx(1 / 6, abs=1e-6)
    # scores: frauds 0.9, 0.2; legit 0.7, 0.05 x5 -> pairs won: 0.9 beats all 6, 0.2 beats 5 of 6
    assert acc["auc"] == pytest.approx(11 / 12, abs=1e-6)
    assert report["latency_ms"]["max"] == pytest.approx(1500.0, rel=1e-3)
    assert report["achieved_tps"] == pytest.approx(8 / 1.5, abs=0.05)
    assert report["fraud_by_scenario"] == {"stolen_card": {"sent": 2, "flagged": 1}}
    assert "lost" in format_table(report)


def test_degraded_decisions_get_their_own_detection_and_false_positive_rate() -> None:
    n = 8
    c = DecisionCollector(PREFIX, np.zeros(n), start=0.0)
    is_fraud = np.array([True, True, True, False, False, False, False, False])
    # normal: 0 caught, 3 clean, 4 clean; degraded: 1 caught, 2 missed, 5 false positive, 6 and 7 (B) clean
    c.feed([decision(0, prob=0.9), decision(3), decision(4),
            decision(1, prob=0.8, degraded=True), decision(2, prob=0.1, degraded=True),
            decision(5, prob=0.6, degraded=True), decision(6, degraded=True),
            decision(7, variant="B", degraded=True)], now=1.0)
    report = build_report(make_result(c, is_fraud, n, 1.0, n))
    check_report(report)
    assert report["degraded"] == 5
    deg = report["degraded_accuracy"]
    assert (deg["positives"], deg["negatives"], deg["true_positives"], deg["false_positives"]) == (2, 3, 1, 1)
    assert deg["detection_rate"] == pytest.approx(0.5)
    assert deg["false_positive_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert deg["by_variant"]["B"]["negatives"] == 1 and deg["by_variant"]["B"]["false_positive_rate"] == 0.0
    assert report["accuracy"]["false_positive_rate"] == pytest.approx(1 / 5)  # all decisions, as before
    assert "degraded: detection / FPR" in format_table(report) and "0.500 / 0.3333" in format_table(report)
    markdown = render_markdown(report)
    assert "| degraded: detection / FPR | 0.500 / 0.3333 |" in markdown
    assert "| B | 1 | 0.000 | 0.0000 |" in markdown and "| all | 5 | 0.500 | 0.3333 |" in markdown
    no_outage = DecisionCollector(PREFIX, np.zeros(2), start=0.0)
    no_outage.feed([decision(0), decision(1)], now=1.0)
    quiet = build_report(make_result(no_outage, np.zeros(2, dtype=bool), 2, 1.0, 2))
    assert quiet["degraded_accuracy"]["negatives"] == 0
    assert "degraded: detection" not in format_table(quiet)


def test_engine_latency_comes_from_the_first_decision_of_each_transaction() -> None:
    n = 100
    c = DecisionCollector(PREFIX, np.zeros(n), start=0.0)
    c.feed([decision(i, engine_ms=float(i + 1)) for i in range(n)], now=1.0)
    c.feed([decision(0, engine_ms=5000.0)], now=2.0)  # a repeat does not count
    report = build_report(make_result(c, np.zeros(n, dtype=bool), n, 1.0, n))
    eng = report["engine_latency_ms"]
    assert eng["max"] == 100.0
    assert eng["p50"] == pytest.approx(50.5)
    assert eng["p99"] == pytest.approx(99.01)
    assert "engine latency p50 / p99" in format_table(report)
    no_field = DecisionCollector(PREFIX, np.zeros(2), start=0.0)
    no_field.feed([decision(0), decision(1)], now=1.0)
    assert build_report(make_result(no_field, np.zeros(2, dtype=bool), 2, 1.0, 2))["engine_latency_ms"] == {}


def test_check_report_rejects_bad_arithmetic() -> None:
    c = DecisionCollector(PREFIX, np.zeros(2), start=0.0)
    report = build_report(make_result(c, np.zeros(2, dtype=bool), 2, 1.0, 2))
    check_report(report)
    report["lost"] = 0
    with pytest.raises(ValueError, match="lost"):
        check_report(report)
    report.update(sent=1, decided=2, lost=-1)  # what counting unacknowledged sends as unsent gave
    with pytest.raises(ValueError, match="negative"):
        check_report(report)


def test_the_lost_line_names_unacknowledged_sends_without_subtracting_them() -> None:
    c = DecisionCollector(PREFIX, np.zeros(3), start=0.0)
    c.feed([decision(0)], now=1.0)
    result = make_result(c, np.zeros(3, dtype=bool), 3, 1.0, 3)
    result.send_errors = 1  # e.g. transaction 1's request timed out; it may still have been delivered
    report = build_report(result)
    check_report(report)
    assert (report["sent"], report["decided"], report["lost"], report["send_errors"]) == (3, 1, 2, 1)
    assert lost_line(report) == ("2 of 3 transactions got no decision within the drain timeout "
                                 "(1 of the sends were not acknowledged by the broker)")
    result.send_errors = 0
    assert lost_line(build_report(result)) == "2 of 3 transactions got no decision within the drain timeout"


def test_auc_handles_ties_and_single_classes() -> None:
    assert auc_score(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert auc_score(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2])) == pytest.approx(1.0)
    assert auc_score(np.array([0, 0]), np.array([0.1, 0.2])) is None


def test_outputs_json_markdown_and_png_charts(tmp_path: Path) -> None:
    profile = make_profile("constant", 200, 3.0)
    sched = scheduled_times(profile)
    c = DecisionCollector(PREFIX, sched, start=0.0)
    for s in range(4):
        c.feed([decision(i, prob=(0.9 if i % 50 == 0 else 0.01)) for i in range(s * 200, min((s + 1) * 200, 600))],
               now=s + 0.9)
    result = make_result(c, np.arange(600) % 50 == 0, 600, 3.0, 200)
    report = write_outputs(result, tmp_path / "out" / "run.json")
    on_disk = orjson.loads((tmp_path / "out" / "run.json").read_bytes())
    check_report(on_disk)
    assert on_disk["decided"] == 600 and on_disk["lost"] == 0
    md = (tmp_path / "out" / "run.md").read_text()
    assert "| lost | 0 |" in md and "run-latency.png" in md
    for path in report["charts"]:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_progress_refreshes_one_line_on_a_terminal_and_prints_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        p = Progress(stream)
        p.update(format_line("send", 1.0, 10, 1000, 990, 1000, 950, 4.2))
        p.update(format_line("send", 2.0, 10, 1000, 1010, 2000, 1990, None))
        p.finish()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    assert plain.getvalue().count("\n") == 2 and "\r" not in plain.getvalue()
    assert "p99(window) 4.2ms" in plain.getvalue()


def test_variants_other_than_a_and_b_are_counted_under_their_own_names() -> None:
    """Variant names are configurable (and `fraudactors models promote` adds new ones): a C gets
    its own count and accuracy row instead of vanishing from both."""
    n = 6
    c = DecisionCollector(PREFIX, np.arange(n) / 10.0, start=0.0)
    is_fraud = np.array([True, False, True, False, False, False])
    c.feed([decision(0, prob=0.9, variant="C"), decision(1, variant="C"), decision(2, prob=0.8, variant="B"),
            decision(3), decision(4), decision(5, variant="challenger-2")], now=1.0)
    report = build_report(make_result(c, is_fraud, n, 1.0, 10))
    check_report(report)
    assert report["variants"] == {"A": 2, "B": 1, "C": 2, "challenger-2": 1}
    assert report["accuracy_by_variant"]["C"]["detection_rate"] == pytest.approx(1.0)
    assert report["other_variants"] == {}


def test_latency_percentiles_are_those_of_the_decisions() -> None:
    """1,000 decisions, 1 ms to 1,000 ms late: p50 is the 500th, p95 the 950th, p99 the 990th and
    p99.9 the 999th (within the histogram's 3 significant digits)."""
    n = 1000
    c = DecisionCollector(PREFIX, np.zeros(n), start=0.0)
    for i in range(n):
        c.feed([decision(i)], now=(i + 1) / 1000.0)
    latency = build_report(make_result(c, np.zeros(n, dtype=bool), n, 1.0, n))["latency_ms"]
    expected = {"p50": 500.0, "p95": 950.0, "p99": 990.0, "p999": 999.0, "max": 1000.0, "min": 1.0,
                "mean": 500.5}
    assert latency == {k: pytest.approx(v, rel=1e-3) for k, v in expected.items()}


@pytest.mark.parametrize("sibling", ["r.md", "r-latency.png", "r-distribution.png", "r-engine.log"])
def test_a_report_file_taken_by_a_directory_fails_before_the_run(tmp_path: Path, sibling: str) -> None:
    (tmp_path / sibling).mkdir()
    with pytest.raises(LoadgenError, match=sibling):
        ensure_report_dir(tmp_path / "r.json", extra=("-engine.log",))


@pytest.mark.parametrize("taken", ["r.json", "r.md", "r-engine.log"])
def test_a_report_path_that_is_no_regular_file_is_refused_and_never_removed(tmp_path: Path, taken: str) -> None:
    """``--report /dev/null`` (or a FIFO, or a link) is not a report to replace: the run is refused
    before it starts, and clearing an earlier report removes regular files only (root may unlink
    a device node)."""
    import os

    os.mkfifo(tmp_path / taken)
    (tmp_path / "r-latency.png").write_bytes(b"an earlier run's chart")
    with pytest.raises(LoadgenError, match="is not a regular file"):
        ensure_report_dir(tmp_path / "r.json", extra=("-engine.log",))
    remove_old_report(tmp_path / "r.json", extra=("-engine.log",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken]


def test_a_report_where_no_file_can_be_created_fails_before_the_run_even_for_root() -> None:
    with pytest.raises(LoadgenError, match="no file can be created"):
        ensure_report_dir("/proc/report.json")


def test_a_report_that_cannot_be_written_fails_in_one_line_after_the_summary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loadgen.cli import finish

    c = DecisionCollector(PREFIX, np.array([0.0, 0.5]), start=0.0)
    c.feed([decision(0), decision(1)], now=1.0)
    (tmp_path / "r.md").mkdir()  # appeared after the check before the run
    with pytest.raises(LoadgenError, match=r"cannot write the report: .*r\.md"):
        finish(make_result(c, np.zeros(2, dtype=bool), 2, 1.0, 2.0), str(tmp_path / "r.json"))
    assert "| decided" in capsys.readouterr().out  # the results are on the screen all the same


def test_a_run_without_decisions_has_no_latency_rather_than_zero(tmp_path: Path) -> None:
    c = DecisionCollector(PREFIX, np.array([0.0, 0.5, 1.0]), start=0.0)
    report = write_outputs(make_result(c, np.zeros(3, dtype=bool), 3, 1.5, 2.0), tmp_path / "r.json")
    check_report(report)
    assert report["decided"] == 0 and report["lost"] == 3
    assert report["latency_ms"] == {"p50": None, "p95": None, "p99": None, "p999": None, "max": None}
    assert orjson.loads((tmp_path / "r.json").read_bytes())["latency_ms"]["p99"] is None
    assert "| latency p50 / p95 / p99 | - / - / - ms |" in (tmp_path / "r.md").read_text()
    assert "- / - / - ms" in format_table(report)
    assert len(report["charts"]) == 3
    # null is for a run that decided nothing; a run with decisions must give numbers
    with pytest.raises(ValueError, match="latency_ms"):
        check_report({**report, "decided": 1, "lost": 2})
