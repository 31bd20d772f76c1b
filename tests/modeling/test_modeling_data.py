"""`fraudactors train --data FILE`: a user's CSV trains; bad files fail with one clear line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fraudactors.cli import main as cli_main
from fraudactors.features.schema import transaction_from_obj
from fraudactors.modeling.data import DataError
from fraudactors.modeling.registry import load_model_info
from fraudactors.modeling.table import describe_invalid, load_table, parse_mapping
from fraudactors.sim import Simulator

SPLIT = ["--warmup-days", "3", "--calib-days", "5", "--gap-days", "3", "--test-days", "7", "--quiet"]
HEADER = ["transaction_id", "user_id", "merchant_id", "amount", "currency", "merchant_category",
          "is_international", "timestamp", "is_fraud"]


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _sim_rows(days: float = 30, users: int = 400) -> list[list[object]]:
    rows = []
    for ev in Simulator(seed=8, n_users=users, n_merchants=300, days=days).stream():
        t = ev.txn
        rows.append([t["transaction_id"], t["user_id"], t["merchant_id"], t["amount"], t["currency"],
                     t["merchant_category"], "true" if t["is_international"] else "false", t["timestamp"],
                     int(ev.is_fraud)])
    return rows


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


def test_train_on_a_users_csv_with_column_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = ["txn", *HEADER[1:3], "amt", *HEADER[4:8], "fraud"]
    data = _write_csv(tmp_path / "tx.csv", header, _sim_rows())
    out = tmp_path / "models"
    code, err = _run(["train", "--data", str(data), "--map", "txn=transaction_id,amt=amount,fraud=is_fraud",
                      "--out", str(out), *SPLIT], capsys)
    assert code == 0, err
    for version in ("v1", "v2"):
        info = load_model_info(out, version)
        training = info.metadata["training"]
        assert training["data"]["kind"] == "file"
        assert training["data"]["mapping"] == {"txn": "transaction_id", "amt": "amount", "fraud": "is_fraud"}
        assert info.metadata["metrics"]["test"]["frauds"] > 0
        assert info.metadata["metrics"]["test"]["auc"] > 0.6
    # The shipped models were refit on all of the file: it holds no later transaction to evaluate them on.
    code, err = _run(["evaluate", "--models", str(out), "--data", str(data), "--quiet"], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "was refit on all its data up to 2026-10-30" in err and "metadata.json ('metrics')" in err
    # A later file (the same world eight more days) evaluates them on the transactions after their data.
    later = _write_csv(tmp_path / "later.csv", header, _sim_rows(days=38))
    report = tmp_path / "later.json"
    code, err = _run(["evaluate", "--models", str(out), "--data", str(later), "--json", str(report), "--quiet"],
                     capsys)
    assert code == 0, err
    after = json.loads(report.read_text())["v2"]
    assert after["window"].startswith("the transactions after the training data (2026-10-31")
    assert after["metrics"]["transactions"] > 1000 and len(after["card_precision_per_day"]) == 8
    # Shipped from the time split, `evaluate` rebuilds its held-out weeks from the same file and the
    # mapping in the metadata.
    plain = tmp_path / "plain"
    code, err = _run(["train", "--data", str(data), "--map", "txn=transaction_id,amt=amount,fraud=is_fraud",
                      "--out", str(plain), "--version", "v1", "--no-refit", *SPLIT], capsys)
    assert code == 0, err
    report = tmp_path / "eval.json"
    code, err = _run(["evaluate", "--models", str(plain), "--versions", "v1", "--data", str(data),
                      "--json", str(report), "--quiet"], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    assert results["v1"]["metrics"] == load_model_info(plain, "v1").metadata["metrics"]["test"]
    # No labeled_at column: frauds count as reported 7 days later (the default).
    ds = load_table(data, parse_mapping("txn=transaction_id,amt=amount,fraud=is_fraud"))
    frauds = ds.is_fraud.nonzero()[0]
    assert ((ds.labeled_at[frauds] - ds.event_time[frauds]) == 7 * 86400).all()


def test_labeled_at_and_epoch_timestamps_are_read(tmp_path: Path) -> None:
    rows = [["t1", "c1", "m1", 10.5, "USD", "grocery", "0", 1790812800, "1", "2026-10-03T00:00:00+00:00", "atm"],
            ["t2", "c1", "m1", "7", "", "", "", "2026-10-01T01:00:00", "0", "", ""],
            ["t3", "c2", "m1", "7", "", "", "", "2026-10-01T02:00:00", "1", "Never", ""]]
    data = _write_csv(tmp_path / "t.csv", [*HEADER, "labeled_at", "scenario"], rows)
    ds = load_table(data)
    assert ds.scenario.tolist() == ["atm", "unknown", "unknown"]
    assert len(ds) == 3 and ds.is_fraud.tolist() == [True, False, True]
    assert ds.labeled_at[0] == 1790812800 + 2 * 86400
    assert ds.labeled_at[2] == float("inf")  # a fraud never reported: a label at no cut-off
    assert ds.transactions[1].merchant_category == "unknown" and ds.transactions[1].amount == 7.0
    assert [label.transaction_id for label in ds.labels()] == ["t1"]


def test_a_basic_iso_date_is_a_date_not_epoch_seconds(tmp_path: Path) -> None:
    """Eight digits are ISO-8601's basic date, as the engine reads the same text in a transaction
    (SPEC §2): 20261001 is 2026-10-01, not 20,261,001 seconds after 1970. Ten digits stay epoch."""
    rows = [["t1", "c1", "m1", 10.5, "USD", "grocery", "0", "20261001", "1", "20261003", "atm"],
            ["t2", "c1", "m1", 7.0, "USD", "grocery", "0", "1790812800", "0", "", ""]]
    ds = load_table(_write_csv(tmp_path / "t.csv", [*HEADER, "labeled_at", "scenario"], rows))
    serving = transaction_from_obj({"transaction_id": "t1", "user_id": "c1", "amount": 1.0,
                                    "timestamp": "20261001"})
    assert ds.transactions[0].event_time == serving.event_time == 1790812800
    assert ds.labeled_at[0] == 1790812800 + 2 * 86400
    assert ds.transactions[1].event_time == 1790812800


BAD_ROWS = [
    (HEADER, [["t1", "c1", "m1", 1.0, "USD", "grocery", "false", "2026-10-01T00:00:00Z", "0"],
              ["t2", "c1", "m1", "abc", "USD", "grocery", "false", "2026-10-01T00:00:00Z", "0"]],
     "line 3: column amount: 'abc' is not a number"),
    (HEADER, [["t1", "c1", "m1", 1.0, "USD", "grocery", "maybe", "2026-10-01T00:00:00Z", "0"]],
     "line 2: column is_international: 'maybe' is not a boolean"),
    (HEADER, [["t1", "c1", "m1", 1.0, "USD", "grocery", "false", "yesterday", "0"]],
     "line 2: timestamp is not ISO-8601: 'yesterday'"),
    (HEADER, [["t1", "c1", "m1", -3, "USD", "grocery", "false", "2026-10-01T00:00:00Z", "0"]],
     "line 2: amount must be >= 0"),
    (HEADER, [["t1", "c1", "m1", 3, "USD", "grocery", "false", "2026-10-01T00:00:00Z", "0", "extra"]],
     "line 2: more values than header columns"),
]


@pytest.mark.parametrize(("header", "rows", "message"), [
    (HEADER[:-1], [["t1", "c1", "m1", 1.0, "USD", "grocery", "false", "2026-10-01T00:00:00Z"]],
     "missing column(s): is_fraud"),
    *BAD_ROWS,
    (HEADER, [], "no rows (only a header)"),
])
def test_bad_files_fail_with_one_clear_line_under_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         header: list[str], rows: list[list[object]],
                                                         message: str) -> None:
    data = _write_csv(tmp_path / "bad.csv", header, rows)
    code, err = _run(["train", "--data", str(data), "--strict", "--out", str(tmp_path / "m"), *SPLIT], capsys)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("fraudactors train: ")
    assert message in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("header", "rows", "message"), BAD_ROWS)
def test_without_strict_a_bad_row_is_skipped_and_reported(tmp_path: Path, header: list[str],
                                                          rows: list[list[object]], message: str) -> None:
    good = ["t0", "c1", "m1", 2.5, "USD", "grocery", "false", "2026-09-30T00:00:00Z", "0"]
    data = _write_csv(tmp_path / "t.csv", header, [good, *rows])
    ds = load_table(data)
    line = int(message.split(":")[0].removeprefix("line ")) + 1  # the good row moved it down one line
    assert [t.transaction_id for t in ds.transactions] == ["t0", "t1"][: 1 + len(rows) - 1]
    invalid = ds.source["invalid_rows"]
    assert invalid["total"] == 1
    [(kind, entry)] = invalid["by_reason"].items()
    assert entry == {"rows": 1, "first_lines": [line]}
    assert "'" not in kind  # counted by reason, without the row's value
    report = describe_invalid(ds.source)
    assert report is not None and f"skipped 1 invalid row(s) of {len(rows) + 1}" in report
    assert f"1 x {kind} (line {line})" in report


def test_amount_zero_is_a_transaction_and_invalid_rows_are_counted_per_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A card-verification authorisation (amount 0.00) trains; a few unusable rows among many good
    ones are skipped and reported (count per reason, first line numbers), not the whole file."""
    rows = _sim_rows()
    good = len(rows)
    for k in range(0, 4000, 400):  # zero amounts are fine
        rows[k][3] = "0.00"
    for k in range(7, 7 + 7 * 300, 300):
        rows[k][3] = "-1.00"
    for k in (11, 12):
        rows[k][7] = ""
    data = _write_csv(tmp_path / "tx.csv", HEADER, rows)
    out = tmp_path / "models"
    code = cli_main(["train", "--data", str(data), "--out", str(out), "--version", "v2", *SPLIT[:-1]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"skipped 9 invalid row(s) of {good:,} (--strict fails on the first instead)" in err
    assert "7 x amount must be >= 0 (line 9, 309, 609, 909, 1209, ...)" in err
    assert "2 x column timestamp is empty (line 13, 14)" in err
    summary = load_model_info(out, "v2").metadata["data_summary"]
    assert summary["transactions"] == good - 9
    assert summary["rows_read"] == good
    assert summary["invalid_rows"]["by_reason"]["amount must be >= 0"] == {"rows": 7,
                                                                          "first_lines": [9, 309, 609, 909, 1209]}
    assert summary["invalid_rows"]["by_reason"]["column timestamp is empty"]["rows"] == 2
    code = cli_main(["train", "--data", str(data), "--strict", "--out", str(tmp_path / "strict"), *SPLIT])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "line 9: amount must be >= 0" in err


def test_a_file_with_no_usable_row_names_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [["t1", "c1", "m1", "1,5", "USD", "grocery", "false", "2026-10-01T00:00:00Z", "0"]] * 3
    data = _write_csv(tmp_path / "t.csv", HEADER, rows)
    code, err = _run(["train", "--data", str(data), "--out", str(tmp_path / "m"), *SPLIT], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "none of the 3 rows is usable (3 x column amount: not a number, first at line 2)" in err


def test_an_empty_file_and_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    code, err = _run(["train", "--data", str(empty), "--quiet"], capsys)
    assert code != 0 and err.count("\n") == 1 and "the file is empty" in err
    code, err = _run(["train", "--data", str(tmp_path / "nope.csv"), "--quiet"], capsys)
    assert code != 0 and err.count("\n") == 1 and "no such file" in err


def test_a_too_short_history_says_what_to_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_csv(tmp_path / "short.csv", HEADER, _sim_rows(days=4, users=50))
    code, err = _run(["train", "--data", str(data), "--quiet"], capsys)
    assert code != 0 and err.count("\n") == 1
    assert "the time split needs more than" in err and "--test-days" in err


def test_bad_column_mapping(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected src=dst"):
        parse_mapping("amount")
    with pytest.raises(DataError, match="not a known column"):
        parse_mapping("a=amountt")
    data = _write_csv(tmp_path / "t.csv", HEADER, [])
    with pytest.raises(DataError, match="not in the file: amt"):
        load_table(data, {"amt": "amount"})


def test_parquet_without_pyarrow_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow is an optional extra: without it, importing it fails (None in sys.modules does that)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    data = tmp_path / "t.parquet"
    data.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="reading Parquet needs pyarrow, which is not installed"):
        load_table(data)


def test_parquet_with_typed_columns_reads_like_the_same_csv(tmp_path: Path) -> None:
    """A Parquet file as a data team writes one (timestamps, booleans and floats typed) gives the
    same dataset as the CSV of the same rows; a broken file is one clear error."""
    from datetime import datetime

    import pyarrow as pa  # a dev dependency: a missing one fails here, loudly
    import pyarrow.parquet as pq

    rows = _sim_rows(days=3, users=60)
    csv_data = load_table(_write_csv(tmp_path / "t.csv", HEADER, rows))
    columns = list(zip(*rows, strict=True))
    table = pa.table({
        "transaction_id": list(columns[0]), "user_id": list(columns[1]), "merchant_id": list(columns[2]),
        "amount": pa.array([float(v) for v in columns[3]], pa.float64()),
        "currency": list(columns[4]), "merchant_category": list(columns[5]),
        "is_international": pa.array([v == "true" for v in columns[6]], pa.bool_()),
        "timestamp": pa.array([datetime.fromisoformat(str(v)) for v in columns[7]], pa.timestamp("ms", tz="UTC")),
        "is_fraud": pa.array([bool(v) for v in columns[8]], pa.bool_()),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    parquet_data = load_table(tmp_path / "t.parquet")
    assert len(parquet_data.transactions) == len(csv_data.transactions) == len(rows)
    for a, b in zip(parquet_data.transactions, csv_data.transactions, strict=True):
        assert (a.transaction_id, a.user_id, a.merchant_id, a.amount, a.is_international) == \
            (b.transaction_id, b.user_id, b.merchant_id, b.amount, b.is_international)
        assert a.event_time == pytest.approx(b.event_time, abs=1e-3)
    assert parquet_data.is_fraud.tolist() == csv_data.is_fraud.tolist()
    assert parquet_data.is_fraud.any()

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_table(broken)


def test_the_console_script_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "bad.csv", HEADER[:-1], [])
    proc = subprocess.run([sys.executable, "-m", "fraudactors", "train", "--data", str(data)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "missing column(s): is_fraud" in proc.stderr
    assert json.dumps(proc.stdout) == '""'


def test_a_dataset_given_out_of_order_keeps_each_fraud_report_with_its_transaction() -> None:
    import numpy as np

    from fraudactors.features.schema import Transaction, format_timestamp
    from fraudactors.modeling.data import Dataset

    t0 = 1790812800.0
    txns = [Transaction(tid, "u", "m", 1.0, "USD", "x", False, t, format_timestamp(t))
            for tid, t in (("late", t0 + 200), ("early", t0 + 100), ("never", t0 + 150))]
    ds = Dataset(txns, np.array([True, True, True]), np.array(["a", "b", "c"]),
                 np.array([t0 + 900, t0 + 500, np.inf]))
    assert [t.transaction_id for t in ds.transactions] == ["early", "never", "late"]
    assert ds.labeled_at.tolist() == [t0 + 500, np.inf, t0 + 900]
    assert ds.scenario.tolist() == ["b", "c", "a"]
    # a fraud never reported is no report the features may learn from
    assert [(label.transaction_id, label.labeled_at) for label in ds.labels()] == [("early", t0 + 500),
                                                                                   ("late", t0 + 900)]


def test_a_blank_line_in_a_csv_is_no_row(tmp_path: Path) -> None:
    data = tmp_path / "t.csv"
    data.write_text(",".join(HEADER) + "\n"
                    "t1,c1,m1,1.0,USD,grocery,false,2026-10-01T00:00:00Z,0\n"
                    "\n"
                    "t2,c1,m1,2.0,USD,grocery,false,2026-10-01T01:00:00Z,1\n")
    ds = load_table(data)
    assert [t.transaction_id for t in ds.transactions] == ["t1", "t2"]
    assert ds.source["rows_read"] == 2 and ds.source["invalid_rows"]["total"] == 0
    assert describe_invalid(ds.source) is None


def test_a_transaction_id_given_twice_keeps_its_last_row_and_skips_the_earlier(tmp_path: Path) -> None:
    """One payment, one row: a second copy would count twice in the velocity features and train
    on two verdicts of one transaction. The later row is the later verdict (a chargeback after a
    review), as the latest label stands online."""
    rows = [["t1", "c1", "m1", 10.0, "USD", "grocery", "false", "2026-10-01T10:00:00Z", "0"],
            ["t1", "c1", "m1", 10.0, "USD", "grocery", "false", "2026-10-01T10:00:00Z", "1"],
            ["t2", "c1", "m1", 11.0, "USD", "grocery", "false", "2026-10-01T11:00:00Z", "0"]]
    ds = load_table(_write_csv(tmp_path / "dup.csv", HEADER, rows))
    assert [t.transaction_id for t in ds.transactions] == ["t1", "t2"] and ds.is_fraud.tolist() == [True, False]
    assert ds.source["invalid_rows"]["by_reason"] == {
        "duplicate transaction_id (the last row kept)": {"rows": 1, "first_lines": [2]}}
    with pytest.raises(DataError, match="line 3: transaction_id 't1' is also on line 2"):
        load_table(_write_csv(tmp_path / "dup.csv", HEADER, rows), strict=True)


def test_a_mapped_column_wins_over_a_file_column_of_the_target_name(tmp_path: Path) -> None:
    header = ["transaction_id", "user_id", "amount", "amount_usd", "timestamp", "event_ts", "is_fraud"]
    rows = [["t1", "c1", 1000, 10.5, "2026-12-01T00:00:00Z", "2026-10-01T08:00:00Z", "0"]]
    ds = load_table(_write_csv(tmp_path / "m.csv", header, rows),
                    mapping=parse_mapping("amount_usd=amount,event_ts=timestamp"))
    assert ds.transactions[0].amount == 10.5
    assert ds.transactions[0].timestamp.startswith("2026-10-01T08:00:00")


def test_a_fraud_reported_before_its_payment_is_read_as_reported_at_the_payment(tmp_path: Path) -> None:
    """A date-only labeled_at (midnight) on the day of the payment: read as reported at the
    payment, so the row's own report is not in its merchant's fraud counts."""
    from fraudactors.features.definition import FEATURE_INDEX
    from fraudactors.features.offline import offline_features

    rows = [["t1", "c1", "m1", 10.0, "USD", "grocery", "false", "2026-11-28T21:00:00Z", "1", "2026-11-28"],
            ["t2", "c2", "m1", 10.0, "USD", "grocery", "false", "2026-11-29T21:00:00Z", "0", ""]]
    ds = load_table(_write_csv(tmp_path / "l.csv", [*HEADER, "labeled_at"], rows))
    assert ds.labeled_at[0] == ds.transactions[0].event_time
    far = [["t3", "c3", "m1", 10.0, "USD", "grocery", "false", "2026-11-28T21:00:00Z", "1", "1970-01-01"]]
    with pytest.raises(DataError, match="more than a day before the payment"):
        load_table(_write_csv(tmp_path / "far.csv", [*HEADER, "labeled_at"], far), strict=True)
    X = offline_features(ds.transactions, ds.labels())
    assert X[0, FEATURE_INDEX["merchant_fraud_count_7d"]] == 0.0, "its own report counted for it"
    assert X[1, FEATURE_INDEX["merchant_fraud_count_7d"]] == 1.0


def test_a_final_calibration_window_without_enough_legitimate_rows_fails_instead_of_shipping_its_threshold(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A gap in the data where the final refit calibrates (the last --calib-days before the label
    cut-off) left one row, and a threshold just above its score: half the traffic declined."""
    from datetime import datetime, timedelta

    rows = _sim_rows()
    last = max(datetime.fromisoformat(str(r[7])) for r in rows)
    gap_from, gap_to = last - timedelta(days=8), last - timedelta(days=3)  # --gap-days 3, --calib-days 5
    kept = [r for r in rows if not gap_from <= datetime.fromisoformat(str(r[7])) < gap_to]
    data = _write_csv(tmp_path / "hole.csv", HEADER, kept)
    code, err = _run(["train", "--data", str(data), "--version", "v1", "--out", str(tmp_path / "m"), *SPLIT], capsys)
    last = err.splitlines()[-1]  # (after the time split's warnings about this small file)
    assert code == 2 and last.startswith("fraudactors train: "), err
    assert "final refit's calibration window" in last and "holds 0 legitimate transaction(s)" in last
    assert not (tmp_path / "m").exists()


def test_a_simulated_csv_trains_on_the_labels_the_simulator_knows_never_reported_frauds_included(
        tmp_path: Path) -> None:
    """scripts/sim_csv.py writes the simulator's stream for ``train --data``: read back, it is the
    dataset ``train --synthetic`` builds. A fraud never reported is never a known label (it counts
    as legitimate in the fit, as with --synthetic), not one reported --label-delay-days later."""
    import numpy as np

    from fraudactors.modeling.data import synthetic_dataset
    from fraudactors.modeling.split import known_labels

    out = tmp_path / "sim.csv"
    script = Path(__file__).resolve().parents[2] / "scripts" / "sim_csv.py"
    subprocess.run([sys.executable, str(script), "--days", "20", "--users", "500", "--merchants", "200",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    read = load_table(out, strict=True)
    simulated = synthetic_dataset(7, 20, 500, 200)
    never = simulated.is_fraud & np.isinf(simulated.labeled_at)
    assert never.any(), "the simulation has no never-reported fraud to check"
    assert [t.transaction_id for t in read.transactions] == [t.transaction_id for t in simulated.transactions]
    assert (read.is_fraud == simulated.is_fraud).all()
    assert (np.isinf(read.labeled_at) == np.isinf(simulated.labeled_at)).all()
    finite = np.isfinite(simulated.labeled_at)
    assert np.allclose(read.labeled_at[finite], simulated.labeled_at[finite], rtol=0, atol=1e-3)
    end = float(simulated.event_time[-1])
    assert (known_labels(read, end) == known_labels(simulated, end)).all()
    assert len(read.labels()) == len(simulated.labels())
