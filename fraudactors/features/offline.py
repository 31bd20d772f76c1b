"""Point-in-time features for training: for each transaction, what serving computed at its event time.

Same code path as the online store: the per-user state transition, the merchant buckets and the
label rule all come from :mod:`fraudactors.features.definition`. Transactions are processed in
event-time order (a stable sort, so ties keep their input order), which is the order a single
writer sees them live; rows come back in the input order. The one place serving can differ is a
live event that arrives after later events of the same user (see ``definition``: its windows
still only count earlier events, but its novelty flags see merchants used "after" it).

Labels: a fraud label counts for a transaction only once reported, from the start of the hour
after its ``labeled_at`` (``definition.merchant_features`` applies that rule from the buckets, so
all labels can be loaded up front). It counts at its transaction's merchant, joined by
``transaction_id`` (``schema.label_merchant``): the label's own ``merchant_id`` is used only for a
transaction not in the data, and a label naming none for such a transaction counts nowhere; such a
transaction's later labels (``labeled_at`` order) go where its first placed one went, as online
(a transaction's labels count at one merchant). For one
transaction (and merchant) the label with the latest ``labeled_at`` stands (ties: the first given),
as in the online store; a standing fraud verdict counts at the ``labeled_at`` of the report that
first said fraud since the last "not fraud". Online, a verdict flipped to "not fraud" counted as
fraud until the flip was applied; here only the standing verdict counts. And online the first
label of a transaction whose decision the engine no longer remembers is placed by its own
``merchant_id`` (engine/labels.py; its later labels follow it): those two are the places labels
make the two differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fraudactors.errors import InvalidRecord
from fraudactors.features.definition import (
    N_FEATURES,
    MerchantState,
    UserState,
    count_merchant_fraud,
    count_merchant_tx,
    is_new_customer,
    transition,
)
from fraudactors.features.schema import (
    Label,
    Transaction,
    label_from_obj,
    label_merchant,
    transaction_from_obj,
)

_CHUNK = 4096


def merchant_states_from_labels(labels: Iterable[Label],
                                merchant_of: Mapping[str, str] | None = None) -> dict[str, MerchantState]:
    """Merchant fraud buckets from the standing label of each transaction (module doc);
    ``merchant_of``: the merchant of each labelled transaction in the data, by ``transaction_id``."""
    # (merchant, transaction_id) -> (labeled_at ms of the latest label, is_fraud, counted report time):
    # keyed as the online marks are (one hash per merchant)
    standing: dict[tuple[str, str], tuple[int, bool, float]] = {}
    known = dict(merchant_of or {})  # and where each transaction not in the data was placed
    for label in sorted(labels, key=lambda x: round(x.labeled_at * 1000)):
        merchant_id = label_merchant(label, known.get(label.transaction_id))
        if merchant_id is None:
            continue
        known[label.transaction_id] = merchant_id
        at = round(label.labeled_at * 1000)
        key = (merchant_id, label.transaction_id)
        old = standing.get(key)
        if old is not None and at <= old[0]:
            continue
        if old is not None and old[1] == label.is_fraud:
            standing[key] = (at, old[1], old[2])
        else:
            standing[key] = (at, label.is_fraud, label.labeled_at)
    merchants: dict[str, MerchantState] = {}
    for (merchant_id, _), (_, is_fraud, reported) in standing.items():
        if is_fraud:
            m = merchants.get(merchant_id)
            if m is None:
                m = merchants[merchant_id] = MerchantState()
            count_merchant_fraud(m, reported)
    return merchants


def offline_features(
    transactions: Sequence[Transaction],
    labels: Iterable[Label] = (),
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 ``(len(transactions), N_FEATURES)``, row ``i`` for ``transactions[i]``.

    ``progress`` (optional) is called with the number of rows done, every few thousand rows.
    """
    n = len(transactions)
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    times = np.fromiter((t.event_time for t in transactions), dtype=np.float64, count=n)
    order = np.argsort(times, kind="stable").tolist()
    given = list(labels)
    labelled = {label.transaction_id for label in given}
    merchants = merchant_states_from_labels(  # each label at its transaction's merchant (module doc)
        given, {t.transaction_id: t.merchant_id for t in transactions if t.transaction_id in labelled})
    users: dict[str, UserState] = {}
    rows: list[list[float]] = []
    idx: list[int] = []
    done = 0
    for i in order:
        txn = transactions[i]
        m = merchants.get(txn.merchant_id)
        features, state = transition(users.get(txn.user_id), m, txn)
        users[txn.user_id] = state
        if m is None:
            m = merchants[txn.merchant_id] = MerchantState()
        count_merchant_tx(m, txn.event_time, is_new_customer(features))
        rows.append(features)
        idx.append(i)
        if len(rows) == _CHUNK:
            out[idx] = rows
            rows.clear()
            idx.clear()
            done += _CHUNK
            if progress is not None:
                progress(done)
    if rows:
        out[idx] = rows
    if progress is not None:
        progress(n)
    return out


def _column_list(columns: Mapping[str, Any], name: str, n: int | None) -> list[Any] | None:
    if name not in columns:
        return None
    col = columns[name]
    values: list[Any] = col.tolist() if isinstance(col, np.ndarray) else list(col)
    if n is not None and len(values) != n:
        raise InvalidRecord(f"column '{name}' has {len(values)} rows, expected {n}")
    return values


def _rows(columns: Mapping[str, Any], names: Sequence[str], time_names: Sequence[str],
          required: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise InvalidRecord(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    present: list[str] = []
    values: list[list[Any]] = []
    for name in names:
        col = _column_list(columns, name, n)
        if col is not None:
            present.append(name)
            values.append(col)
    time_col = next((c for c in time_names if c in columns), None)
    missing = [name for name in required if name not in columns]
    if time_col is None:
        missing.append(" or ".join(time_names))
    if missing:
        raise InvalidRecord(f"missing column(s): {', '.join(missing)}")
    assert time_col is not None
    present.append(time_names[0])
    values.append(_column_list(columns, time_col, n) or [])
    return present, values


def transactions_from_columns(columns: Mapping[str, Any]) -> list[Transaction]:
    """Validated transactions from columns (dict of numpy arrays or lists; no pandas needed).

    Columns: ``transaction_id``, ``user_id``, ``amount`` and ``timestamp`` (ISO-8601 strings or
    epoch seconds; ``event_time`` is accepted as an alias), optional ``merchant_id``,
    ``currency``, ``merchant_category``, ``is_international``. The SPEC §2 rules apply to each
    row; a bad row raises :class:`InvalidRecord` naming the row.
    """
    names = ("transaction_id", "user_id", "merchant_id", "amount", "currency", "merchant_category",
             "is_international")
    present, values = _rows(columns, names, ("timestamp", "event_time"),
                            ("transaction_id", "user_id", "amount"))
    out: list[Transaction] = []
    for row, record in enumerate(zip(*values, strict=True)):
        try:
            out.append(transaction_from_obj(dict(zip(present, record, strict=True))))
        except InvalidRecord as exc:
            raise InvalidRecord(f"row {row}: {exc.reason}") from None
    return out


def labels_from_columns(columns: Mapping[str, Any]) -> list[Label]:
    """Labels from columns: ``transaction_id``, ``is_fraud``, ``labeled_at``, optional
    ``user_id`` (default ``"unknown"``) and ``merchant_id``."""
    names = ("transaction_id", "user_id", "merchant_id", "is_fraud")
    present, values = _rows(columns, names, ("labeled_at",), ("transaction_id", "is_fraud"))
    has_user = "user_id" in present
    out: list[Label] = []
    for row, record in enumerate(zip(*values, strict=True)):
        obj = dict(zip(present, record, strict=True))
        if not has_user:
            obj["user_id"] = "unknown"
        try:
            out.append(label_from_obj(obj))
        except InvalidRecord as exc:
            raise InvalidRecord(f"row {row}: {exc.reason}") from None
    return out


def offline_features_columns(
    transactions: Mapping[str, Any],
    labels: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`offline_features` from columnar input (see :func:`transactions_from_columns`)."""
    txns = transactions_from_columns(transactions)
    return offline_features(txns, labels_from_columns(labels) if labels else (), progress=progress)
