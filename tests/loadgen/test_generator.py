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
