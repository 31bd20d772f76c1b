"""Training data: the simulator, or a CSV / Parquet file a user brings.

A :class:`Dataset` is transactions in event-time order with their ground truth (``is_fraud``, the
``scenario`` when known) and the fraud labels as they were *reported* (``labeled_at``), which the
point-in-time features and the training cut-off need. File columns are the SPEC §2 fields plus
``is_fraud`` and optionally ``labeled_at`` (when absent or empty, a fraud counts as reported
``label_delay_days`` after the transaction) and ``scenario``. ``--map src=dst`` renames columns.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import FraudActorsError, InvalidRecord
from fraudactors.features.schema import Label, Transaction, parse_time, transaction_from_obj

DAY_S = 86400.0
REQUIRED = ("transaction_id", "user_id", "amount", "timestamp", "is_fraud")
OPTIONAL = ("merchant_id", "currency", "merchant_category", "is_international", "labeled_at", "scenario")
UNKNOWN_SCENARIO = "unknown"
_TRUE = frozenset({"true", "t", "yes", "y", "1", "1.0"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "0.0"})


class DataError(FraudActorsError):
    """Training data that cannot be used. The message names the file, and the line and column
    when one row is at fault."""


@dataclass
class Dataset:
    transactions: list[Transaction]  # event-time order
    is_fraud: np.ndarray  # bool (n,)
    scenario: np.ndarray  # str (n,)
    labeled_at: np.ndarray  # float (n,): when the fraud was reported; inf for legit / never reported
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        times = np.fromiter((t.event_time for t in self.transactions), dtype=np.float64,
                            count=len(self.transactions))
        order = np.argsort(times, kind="stable")
        if not np.array_equal(order, np.arange(order.size)):
            self.transactions = [self.transactions[i] for i in order]
            self.is_fraud = self.is_fraud[order]
            self.scenario = self.scenario[order]
            self.labeled_at = self.labeled_at[order]
            times = times[order]
        self.event_time = times

    def __len__(self) -> int:
        return len(self.transactions)

    def labels(self) -> list[Label]:
        """The fraud reports (SPEC §4) this data implies, for the merchant-risk features."""
        return [Label(t.transaction_id, t.user_id, t.merchant_id, True, float(at))
                for t, fraud, at in zip(self.transactions, self.is_fraud.tolist(), self.labeled_at.tolist(),
                                        strict=True)
                if fraud and math.isfinite(at)]

    def summary(self) -> dict[str, Any]:
        n = len(self)
        per = {str(s): int(c) for s, c in zip(*np.unique(self.scenario[self.is_fraud], return_counts=True),
                                              strict=True)}
        return {
            **self.source,
            "transactions": n,
            "frauds": int(self.is_fraud.sum()),
            "fraud_rate": round(float(self.is_fraud.mean()), 6) if n else 0.0,
            "frauds_by_scenario": per,
            "users": len({t.user_id for t in self.transactions}),
            "merchants": len({t.merchant_id for t in self.transactions}),
            "start": _iso(self.event_time[0]) if n else None,
            "end": _iso(self.event_time[-1]) if n else None,
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(float(t), UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- the simulator


def synthetic_dataset(seed: int, days: float, n_users: int, n_merchants: int,
                      progress: Callable[[int], None] | None = None) -> Dataset:
    from fraudactors.sim import Simulator

    sim = Simulator(seed=seed, n_users=n_users, n_merchants=n_merchants, days=days)
    txns: list[Transaction] = []
    fraud: list[bool] = []
    scenario: list[str] = []
    labeled: list[float] = []
    for ev in sim.stream():
        txns.append(transaction_from_obj(ev.txn))  # the engine's own parsing path
        fraud.append(ev.is_fraud)
        scenario.append(ev.scenario)
        labeled.append(math.inf if ev.label_at is None else ev.label_at)
        if progress is not None and len(txns) % 50_000 == 0:
            progress(len(txns))
    source = {"kind": "synthetic", "seed": seed, "days": days, "users_configured": n_users,
              "merchants_configured": n_merchants, "start_time": _iso(sim.start_time)}
    return Dataset(txns, np.array(fraud, dtype=bool), np.array(scenario, dtype=str),
                   np.array(labeled, dtype=np.float64), source)


# ---------------------------------------------------------------------- files


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"src=dst,src2=dst2"`` -> ``{"src": "dst", ...}`` (file column -> expected column)."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise DataError(f"--map: expected src=dst, got {part!r}")
        dst = dst.strip()
        if dst not in REQUIRED + OPTIONAL:
            raise DataError(f"--map: {dst!r} is not a known column (known: {', '.join(REQUIRED + OPTIONAL)})")
        mapping[src.strip()] = dst
    return mapping


@contextmanager
def _open_table(path: Path) -> Iterator[tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]]:
    """``(header, rows)`` where rows yield ``(line number, {column: value})``; the file closes on exit."""
    if path.suffix.lower() in (".parquet", ".pq"):
        yield _parquet(path)
        return
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable CSV file: {exc}") from None
        if not header:
            raise DataError(f"{path}: the file is empty (expected a header line and rows)")

        def rows() -> Iterator[tuple[int, dict[str, Any]]]:
            try:
                for row in reader:
                    if None in row:
                        raise DataError(f"{path} line {reader.line_num}: more values than header columns")
                    yield reader.line_num, row
            except (UnicodeDecodeError, csv.Error) as exc:
                raise DataError(f"{path} line {reader.line_num}: not readable CSV: {exc}") from None

        yield [h.strip() for h in header], rows()


def _parquet(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                        "(pip install pyarrow, or convert the file to CSV)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's own error types
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    header = list(table.column_names)
    columns = table.to_pydict()

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(table.num_rows):
            yield i + 1, {name: columns[name][i] for name in header}

    return header, rows()


def _number(value: Any, where: str, column: str) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}: column {column}: expected a number, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: column {column}: {text[:40]!r} is not a number") from None


def _boolean(value: Any, where: str, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{where}: column {column}: {str(value)[:40]!r} is not a boolean (true/false, 1/0, yes/no)")


def _time(value: Any, where: str, column: str) -> float | str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return text


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def load_table(path: str | Path, mapping: Mapping[str, str] | None = None, label_delay_days: float = 7.0,
               progress: Callable[[int], None] | None = None) -> Dataset:
    """Read a CSV file (any other suffix) or a Parquet file (``.parquet``, ``.pq``; needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with _open_table(path) as (header, rows):
        return _read(path, header, rows, dict(mapping or {}), label_delay_days, progress)


def _read(path: Path, header: list[str], rows: Iterator[tuple[int, dict[str, Any]]], mapping: dict[str, str],
          label_delay_days: float, progress: Callable[[int], None] | None) -> Dataset:
    unknown_src = [s for s in mapping if s not in header]
    if unknown_src:
        raise DataError(f"{path}: --map names column(s) not in the file: {', '.join(unknown_src)} "
                        f"(file has: {', '.join(header)})")
    renamed = {h: mapping.get(h, h) for h in header}
    present = set(renamed.values())
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s): {', '.join(missing)} (file has: {', '.join(header)}); "
                        "rename yours with --map src=dst")
    delay = label_delay_days * DAY_S
    txns: list[Transaction] = []
    fraud: list[bool] = []
    scenario: list[str] = []
    labeled: list[float] = []
    for line, raw in rows:
        row = {renamed[k]: v for k, v in raw.items() if k in renamed}
        where = f"{path} line {line}"
        obj: dict[str, Any] = {}
        for col in ("transaction_id", "user_id", "merchant_id", "currency", "merchant_category"):
            value = row.get(col)
            if not _empty(value):
                obj[col] = str(value).strip()
        for col in ("amount", "timestamp", "is_fraud"):
            if _empty(row.get(col)):
                raise DataError(f"{where}: column {col} is empty")
        obj["amount"] = _number(row["amount"], where, "amount")
        obj["timestamp"] = _time(row["timestamp"], where, "timestamp")
        if not _empty(row.get("is_international")):
            obj["is_international"] = _boolean(row["is_international"], where, "is_international")
        is_fraud = _boolean(row["is_fraud"], where, "is_fraud")
        try:
            txn = transaction_from_obj(obj)
        except InvalidRecord as exc:
            raise DataError(f"{where}: {exc.reason}") from None
        reported = math.inf
        if is_fraud:
            value = row.get("labeled_at")
            if _empty(value):
                reported = txn.event_time + delay
            else:
                try:
                    reported = parse_time(_time(value, where, "labeled_at"), "labeled_at")[0]
                except InvalidRecord as exc:
                    raise DataError(f"{where}: {exc.reason}") from None
        txns.append(txn)
        fraud.append(is_fraud)
        scenario.append(UNKNOWN_SCENARIO if _empty(row.get("scenario")) else str(row["scenario"]).strip())
        labeled.append(reported)
        if progress is not None and len(txns) % 50_000 == 0:
            progress(len(txns))
    if not txns:
        raise DataError(f"{path}: no rows (only a header)")
    source = {"kind": "file", "path": str(path), "label_delay_days_default": label_delay_days,
              "column_mapping": dict(mapping)}
    return Dataset(txns, np.array(fraud, dtype=bool), np.array(scenario, dtype=str),
                   np.array(labeled, dtype=np.float64), source)
