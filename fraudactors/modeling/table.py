"""Training data from a file a user brings: CSV (any suffix but Parquet's) or Parquet (pyarrow).

Columns are the SPEC §2 fields plus ``is_fraud`` and optionally ``labeled_at`` (when absent or
empty, a fraud counts as reported ``label_delay_days`` after the transaction; ``never``: a fraud
never reported, which no training cut-off knows, as the simulator's) and ``scenario``;
``--map src=dst`` renames them. Each row is validated by the engine's own parser
(``features.schema.transaction_from_obj``), so training accepts exactly what serving accepts.

A row that cannot be used (an amount that is not a number, a bad timestamp, ...) is skipped and
counted per reason, with the first few line numbers (:class:`InvalidRows`); ``strict=True``
fails on the first one instead. A file that cannot be read at all (no header, a missing column,
not CSV or Parquet) always fails. Line numbers are the file's: the header is line 1 of a CSV
file, the first row is row 1 of a Parquet file.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import InvalidRecord
from fraudactors.features.schema import Transaction, parse_time, transaction_from_obj
from fraudactors.modeling.data import DAY_S, DataError, Dataset
from fraudactors.modeling.progress import Progress

REQUIRED = ("transaction_id", "user_id", "amount", "timestamp", "is_fraud")
OPTIONAL = ("merchant_id", "currency", "merchant_category", "is_international", "labeled_at", "scenario")
UNKNOWN_SCENARIO = "unknown"
FIRST_LINES = 5  # line numbers kept per reason
_TRUE = frozenset({"true", "t", "yes", "y", "1", "1.0"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "0.0"})
_PROGRESS_EVERY = 16384


class _RowError(Exception):
    """One row cannot be used: ``kind`` is the reason without the row's values (for counting)."""

    def __init__(self, kind: str, message: str | None = None) -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.message = message or kind


@dataclass
class InvalidRows:
    """The rows skipped while reading a file: how many per reason, and the first line numbers."""

    counts: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, line: int) -> None:
        self.counts[kind] += 1
        lines = self.first_lines.setdefault(kind, [])
        if len(lines) < FIRST_LINES:
            lines.append(line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        """For ``metadata.json``: ``{"total": n, "by_reason": {reason: {"rows": c, "first_lines": [...]}}}``."""
        return {"total": self.total,
                "by_reason": {kind: {"rows": n, "first_lines": self.first_lines[kind]}
                              for kind, n in self.counts.most_common()}}


def reason_kind(reason: str) -> str:
    """A schema reason without the offending value: ``"timestamp is not ISO-8601: 'x'"`` ->
    ``"timestamp is not ISO-8601"``, ``"user_id must be 1-64 characters, got 70"`` -> ``"user_id
    must be 1-64 characters"``."""
    for marker in (": '", ", got "):
        cut = reason.find(marker)
        if cut >= 0:
            reason = reason[:cut]
    return reason


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


# ---------------------------------------------------------------------- opening


@dataclass
class _Source:
    header: list[str]
    rows: Iterator[tuple[int, Sequence[Any]]]  # (line number, values in header order)
    size: int  # for the progress: bytes of a CSV file, rows of a Parquet file
    unit: str  # "bytes" or "rows"
    position: Callable[[], int]  # how far through ``size`` the reader is


@contextmanager
def _open(path: Path) -> Iterator[_Source]:
    if path.suffix.lower() in (".parquet", ".pq"):
        yield _parquet(path)
        return
    with open(path, newline="", encoding="utf-8-sig") as fh:
        consumed = [0]

        def lines() -> Iterator[str]:
            n = 0
            for line in fh:
                n += len(line)
                if n >= _PROGRESS_EVERY * 64:
                    consumed[0] += n
                    n = 0
                yield line
            consumed[0] += n

        reader = csv.reader(lines())
        try:
            header = next(reader, None)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable CSV file: {exc}") from None
        if not header:
            raise DataError(f"{path}: the file is empty (expected a header line and rows)")

        def rows() -> Iterator[tuple[int, Sequence[Any]]]:
            try:
                for row in reader:
                    if row:  # a blank line is no row
                        yield reader.line_num, row
            except (UnicodeDecodeError, csv.Error) as exc:
                raise DataError(f"{path} line {reader.line_num}: not readable CSV: {exc}") from None

        yield _Source([h.strip() for h in header], rows(), os.path.getsize(path), "bytes",
                      lambda: consumed[0])


def _parquet(path: Path) -> _Source:
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
    columns = [table.column(name).to_pylist() for name in header]
    done = [0]

    def rows() -> Iterator[tuple[int, Sequence[Any]]]:
        for i, row in enumerate(zip(*columns, strict=True), start=1):
            done[0] = i
            yield i, row

    return _Source(header, rows(), table.num_rows, "rows", lambda: done[0])


# ---------------------------------------------------------------------- values
# A cell is a stripped string (CSV, empty = missing) or a typed value (Parquet, None = missing).

_MISSING = ("", None)
NEVER = "never"  # labeled_at of a fraud never reported (scripts/sim_csv.py writes it)


def _number(value: Any, column: str) -> float:
    if type(value) is str:
        try:
            return float(value)
        except ValueError:
            raise _RowError(f"column {column}: not a number",
                            f"column {column}: {value[:40]!r} is not a number") from None
    if isinstance(value, bool):
        raise _RowError(f"column {column}: a boolean, not a number",
                        f"column {column}: expected a number, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    return _number(str(value).strip(), column)


def _boolean(value: Any, column: str) -> bool:
    if type(value) is str:
        text = value.lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    elif isinstance(value, bool):
        return value
    elif isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise _RowError(f"column {column}: not a boolean",
                    f"column {column}: {str(value)[:40]!r} is not a boolean (true/false, 1/0, yes/no)")


def _time(value: Any) -> float | str:
    """A timestamp cell for ``parse_time``: epoch seconds as a float, ISO-8601 text as is."""
    if type(value) is str:
        if "-" in value[1:] or ":" in value:  # ISO-8601 (a date has '-' after its first character)
            return value
        if len(value) == 8 and value.isdigit():
            # ISO-8601's basic date, 20261128, as the serving parser reads the same text (not
            # epoch seconds of 1970, the only reading of eight digits as a number).
            return value
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return _time(str(value).strip())


# ---------------------------------------------------------------------- reading


def load_table(path: str | Path, mapping: Mapping[str, str] | None = None, label_delay_days: float = 7.0,
               progress: Progress | None = None, *, strict: bool = False) -> Dataset:
    """Read a CSV or Parquet file into a :class:`Dataset` (module doc).

    ``progress`` (optional) follows the reader through the file: bytes of a CSV file, rows of a
    Parquet file. The skipped rows are summarized in ``dataset.source["invalid_rows"]``
    (:func:`describe_invalid` words it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with _open(path) as source:
        if progress is not None:
            progress.total = source.size
            progress.unit = source.unit
        return _read(path, source, dict(mapping or {}), label_delay_days, progress, strict)


def _columns(path: Path, header: list[str], mapping: dict[str, str]) -> dict[str, int]:
    """Expected column name -> its index in the file's rows."""
    unknown_src = [s for s in mapping if s not in header]
    if unknown_src:
        raise DataError(f"{path}: --map names column(s) not in the file: {', '.join(unknown_src)} "
                        f"(file has: {', '.join(header)})")
    index: dict[str, int] = {}
    for i, name in enumerate(header):  # the file's own names, then --map's, which win
        if name not in mapping:
            index.setdefault(name, i)
    for i, name in enumerate(header):
        if name in mapping:
            index[mapping[name]] = i
    missing = [c for c in REQUIRED if c not in index]
    if missing:
        raise DataError(f"{path}: missing column(s): {', '.join(missing)} (file has: {', '.join(header)}); "
                        "rename yours with --map src=dst")
    return index


def _read(path: Path, source: _Source, mapping: dict[str, str], label_delay_days: float,
          progress: Progress | None, strict: bool) -> Dataset:
    index = _columns(path, source.header, mapping)
    width = len(source.header)
    delay = label_delay_days * DAY_S
    strings = [(name, index[name]) for name in ("transaction_id", "user_id", "merchant_id", "currency",
                                                  "merchant_category") if name in index]
    i_amount, i_time, i_fraud = index["amount"], index["timestamp"], index["is_fraud"]
    i_intl, i_labeled, i_scenario = index.get("is_international"), index.get("labeled_at"), index.get("scenario")

    def parse(row: Sequence[Any]) -> tuple[Transaction, bool, float, str]:
        if len(row) != width:
            if len(row) > width:
                raise _RowError("more values than header columns")
            row = [*row, *[""] * (width - len(row))]
        cells = [c.strip() if type(c) is str else c for c in row]
        obj: dict[str, Any] = {name: c if type(c) is str else str(c)
                               for name, i in strings if (c := cells[i]) not in _MISSING}
        for name, i in (("amount", i_amount), ("timestamp", i_time), ("is_fraud", i_fraud)):
            if cells[i] in _MISSING:
                raise _RowError(f"column {name} is empty")
        obj["amount"] = _number(cells[i_amount], "amount")
        obj["timestamp"] = _time(cells[i_time])
        if i_intl is not None and cells[i_intl] not in _MISSING:
            obj["is_international"] = _boolean(cells[i_intl], "is_international")
        is_fraud = _boolean(cells[i_fraud], "is_fraud")
        try:
            txn = transaction_from_obj(obj)
            reported = math.inf  # legitimate, or a fraud never reported: a label at no cut-off
            value = None if i_labeled is None or not is_fraud else cells[i_labeled]
            if is_fraud and not (type(value) is str and value.lower() == NEVER):
                # A report cannot precede its payment: a date-only labeled_at (midnight) on the
                # day of the payment is read as reported at the payment, else the row's own
                # label would be in its merchant's fraud counts (from the hour after the report);
                # one a day or more before its payment is an error in the row.
                reported = (txn.event_time + delay if value in _MISSING
                            else parse_time(_time(value), "labeled_at")[0])
                if reported < txn.event_time - DAY_S:
                    raise _RowError("labeled_at before the payment",
                                    f"labeled_at {value!r} is more than a day before the payment")
                reported = max(reported, txn.event_time)
        except InvalidRecord as exc:
            raise _RowError(reason_kind(exc.reason), exc.reason) from None
        scenario = UNKNOWN_SCENARIO
        if i_scenario is not None and (c := cells[i_scenario]) not in _MISSING:
            scenario = c if type(c) is str else str(c)
        return txn, is_fraud, reported, scenario

    txns: list[Transaction] = []
    fraud: list[bool] = []
    scenario: list[str] = []
    labeled: list[float] = []
    invalid = InvalidRows()
    read = 0
    seen: dict[str, tuple[int, int]] = {}  # transaction_id -> (its place in the lists, its line)
    for line, row in source.rows:
        read += 1
        try:
            txn, is_fraud, reported, scen = parse(row)
            earlier = seen.get(txn.transaction_id)
            if earlier is not None:
                # One payment, one row: a second would count twice in the velocity features and
                # train on two verdicts. Files list a transaction's later verdict later (a
                # chargeback after a review): the last row stands, the earlier one is skipped.
                if strict:
                    raise _RowError("duplicate transaction_id", f"transaction_id {txn.transaction_id!r} is "
                                    f"also on line {earlier[1]} (give each transaction one row)")
                at, earlier_line = earlier
                invalid.add("duplicate transaction_id (the last row kept)", earlier_line)
                txns[at], fraud[at], scenario[at], labeled[at] = txn, is_fraud, scen, reported
                seen[txn.transaction_id] = (at, line)
                continue
            seen[txn.transaction_id] = (len(txns), line)
        except _RowError as exc:
            if strict:
                raise DataError(f"{path} line {line}: {exc.message}") from None
            invalid.add(exc.kind, line)
            continue
        txns.append(txn)
        fraud.append(is_fraud)
        scenario.append(scen)
        labeled.append(reported)
        if progress is not None and read % _PROGRESS_EVERY == 0:
            progress(source.position())
    if progress is not None:
        progress(source.size)
    if read == 0:
        raise DataError(f"{path}: no rows (only a header)")
    if not txns:
        kind, n = invalid.counts.most_common(1)[0]
        raise DataError(f"{path}: none of the {read:,} rows is usable ({n:,} x {kind}, first at line "
                        f"{invalid.first_lines[kind][0]}); see --map and the column formats in docs/models.md")
    source_info: dict[str, Any] = {"kind": "file", "path": str(path), "label_delay_days_default": label_delay_days,
                                   "column_mapping": dict(mapping), "rows_read": read,
                                   "invalid_rows": invalid.summary()}
    return Dataset(txns, np.array(fraud, dtype=bool), np.array(scenario, dtype=str),
                   np.array(labeled, dtype=np.float64), source_info)


def describe_invalid(source: Mapping[str, Any]) -> str | None:
    """The skipped-rows report (lines for stderr) of a dataset's ``source``, or None when no row
    was skipped: the total, then one line per reason, most frequent first."""
    invalid = source.get("invalid_rows") or {}
    if not invalid.get("total"):
        return None
    lines = [f"{source.get('path', 'data')}: skipped {invalid['total']:,} invalid row(s) of "
             f"{source.get('rows_read', 0):,} (--strict fails on the first instead):"]
    for kind, entry in invalid["by_reason"].items():
        shown = ", ".join(str(x) for x in entry["first_lines"])
        more = ", ..." if entry["rows"] > len(entry["first_lines"]) else ""
        lines.append(f"  {entry['rows']:,} x {kind} (line {shown}{more})")
    return "\n".join(lines)
