"""The simulator source: ids by run index, ground truth, and labels that point at sent transactions."""

from __future__ import annotations

import numpy as np
import orjson

from loadgen.generator import SimSource


def _take_all(source: SimSource, n: int, chunk: int) -> tuple[list[dict], list[bool], list]:
    txns, fraud, labels = [], [], []
    while len(txns) < n:
        batch = source.take(min(chunk, n - len(txns)), np.zeros(min(chunk, n - len(txns))))
        txns += [orjson.loads(v) for v in batch.values]
        fraud += batch.is_fraud.tolist()
        labels += batch.labels
    return txns, fraud, labels


def test_ids_are_run_indices_and_labels_follow_their_transaction() -> None:
    source = SimSource("run-", seed=3)
    txns, fraud, labels = _take_all(source, 60_000, 7_000)
    assert [t["transaction_id"] for t in txns[:3]] == ["run-0", "run-1", "run-2"]
    assert txns[-1]["transaction_id"] == "run-59999"
    assert 0.001 < np.mean(fraud) < 0.05  # the simulator's fraud rate, tagged per transaction
    assert labels, "60k simulated transactions span days: some frauds are reported within the run"
    by_id = {t["transaction_id"]: (t, f) for t, f in zip(txns, fraud, strict=True)}
    for pending in labels:
        label = orjson.loads(pending.value)
        txn, is_fraud = by_id[label["transaction_id"]]
        assert is_fraud and label["is_fraud"] is True
        assert label["user_id"] == txn["user_id"] and pending.key == txn["user_id"].encode()
        # sent only after the transaction it reports
        assert pending.send_after >= int(label["transaction_id"].removeprefix("run-"))


def test_warmup_keeps_its_own_ids_and_the_run_counts_from_zero() -> None:
    source = SimSource("warm-", seed=3)
    warm = source.take(30_000, np.zeros(30_000))
    source.begin_run("run-")
    txns, _, labels = _take_all(source, 30_000, 10_000)
    assert orjson.loads(warm.values[-1])["transaction_id"] == "warm-29999"
    assert txns[0]["transaction_id"] == "run-0"
    ids = {orjson.loads(label.value)["transaction_id"].split("-")[0] for label in labels}
    assert ids <= {"warm", "run"} and "warm" in ids  # late labels of warm-up frauds keep the warm-up id
    same = SimSource("x-", seed=3)
    assert [orjson.loads(v)["amount"] for v in same.take(5, np.zeros(5)).values] == \
        [orjson.loads(v)["amount"] for v in warm.values[:5]]  # seeded: same world every time


def test_a_run_long_enough_to_reach_the_clock_starts_its_world_whole_weeks_earlier() -> None:
    """The engine dead-letters transactions dated past the clock: a run that would reach it gets
    the same stream dated whole weeks earlier, ending a day before now; a short run keeps the
    fixed default dates (the same stream everywhere)."""
    from fraudactors.sim import DEFAULT_START, iso
    from loadgen.generator import start_before_now

    day, week = 86400.0, 7 * 86400.0
    now = DEFAULT_START + 60 * day
    assert start_before_now(14_000 / day, 300_000, now) == DEFAULT_START  # ~24 days
    early = start_before_now(14_000 / day, 1_000_000, now)  # ~79 days of simulated time
    assert (DEFAULT_START - early) % week == 0 and early < DEFAULT_START
    assert early + 1.1 * 1_000_000 / (14_000 / day) <= now - day

    short, long = SimSource("a-", seed=3, run_length=1000), SimSource("a-", seed=3, run_length=50_000_000)
    shift = short.simulator.start_time - long.simulator.start_time
    assert short.simulator.start_time == DEFAULT_START and shift > 0 and shift % week == 0
    a, _, _ = _take_all(short, 2_000, 2_000)
    b, _, _ = _take_all(long, 2_000, 2_000)
    assert [t["timestamp"] for t in b] == [iso(_epoch(t["timestamp"]) - shift) for t in a]
    assert [(t["user_id"], t["amount"]) for t in a] == [(t["user_id"], t["amount"]) for t in b]


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp).timestamp()
