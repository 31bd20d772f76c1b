"""Hostile records for the ``poison`` drill: every one must end up on the dead-letter topic.

Deterministic (index ``i`` always gives the same record for a given ``now``) and cycling through
:data:`KINDS`. A JSON object that carries a usable ``user_id`` is keyed by it, so each record is
refused for its own defect and not merely for a key mismatch; only the ``key_mismatch`` kind is
keyed otherwise. ``future`` and ``key_mismatch`` parse as transactions: the worker's validation
(``stage=validate``) refuses them; everything else fails ``parse_transaction``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

Record = tuple[bytes | None, bytes | None, str]  # key, value, kind

_FIELDS = ("transaction_id", "user_id", "amount", "timestamp")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _txn(i: int, now: float, **changes: Any) -> dict[str, Any]:
    txn: dict[str, Any] = {"transaction_id": f"poison-{i}", "user_id": f"c-poison-{i % 97}",
                           "merchant_id": f"m-poison-{i % 13}", "amount": 12.5 + i % 50, "currency": "USD",
                           "merchant_category": "grocery", "is_international": False, "timestamp": _iso(now)}
    txn.update(changes)
    return txn


def _obj(txn: dict[str, Any], i: int) -> Record:
    user = txn.get("user_id")
    key = user.encode() if isinstance(user, str) and 0 < len(user) <= 64 else f"poison-{i}".encode()
    return key, json.dumps(txn).encode(), ""  # the stdlib writes integers beyond 64 bits too


def _raw(i: int, value: bytes | None) -> Record:
    return f"c-poison-{i % 97}".encode(), value, ""


def _not_json(i: int, now: float) -> Record:
    variants = [b"\xff\xfe\x00poison " + str(i).encode(), b'{"transaction_id": "poison-%d", "amount": ' % i,
                b'{"transaction_id": "poison-%d", "user_id": "u", "amount": NaN, "timestamp": 1}' % i,
                b'{"transaction_id": "\xff\xfe", "user_id": "u", "amount": 1, "timestamp": 1}',
                b"[" * 2000 + b"]" * 2000, b"", None]
    return _raw(i, variants[i % len(variants)])


def _not_object(i: int, now: float) -> Record:
    variants: list[Any] = [[f"poison-{i}", 1, 2], f"poison-{i}", i, None, True, []]
    return _raw(i, orjson.dumps(variants[i % len(variants)]))


def _missing(i: int, now: float) -> Record:
    txn = _txn(i, now)
    del txn[_FIELDS[i % len(_FIELDS)]]
    return _obj(txn, i)


def _wrong_type(i: int, now: float) -> Record:
    variants: list[dict[str, Any]] = [{"transaction_id": i}, {"amount": f"{i}.50"}, {"is_international": "yes"},
                                      {"timestamp": True}, {"amount": [1, 2]}, {"merchant_id": None},
                                      {"currency": 840}, {"amount": None}]
    return _obj(_txn(i, now, **variants[i % len(variants)]), i)


def _bad_amount(i: int, now: float) -> Record:
    variants = [-0.01, -1e9, 1e9 + 1, 1e30, 10**40]
    return _obj(_txn(i, now, amount=variants[i % len(variants)]), i)


def _bad_timestamp(i: int, now: float) -> Record:
    variants: list[Any] = ["yesterday", "2026-13-01T00:00:00", "2026-02-30", "9" * 80, -1, 1.0e12,
                           "2026-11-28T25:00:00Z"]
    return _obj(_txn(i, now, timestamp=variants[i % len(variants)]), i)


def _huge(i: int, now: float) -> Record:
    variants = [{"transaction_id": "t" * 5000}, {"merchant_id": "m" * 65}, {"currency": "X" * 2000},
                {"transaction_id": f"poison-{i}", "pad": "x" * (1 << 20)}]  # the last: a value over 1 MiB
    # One value over 1 MiB in 250 of this kind: the broker and the DLQ producer carry them, but
    # they are heavy for a 1,000/s stream.
    variant = variants[i % 3] if i % 250 else variants[3]
    return _obj(_txn(i, now, **variant), i)


def _future(i: int, now: float) -> Record:
    """Well formed, but dated 30 days to 70 years ahead (past ``engine.max_future_skew_s``)."""
    ahead = [30 * 86400.0, 365 * 86400.0, 70 * 365 * 86400.0]
    return _obj(_txn(i, now, timestamp=_iso(now + ahead[i % len(ahead)])), i)


def _key_mismatch(i: int, now: float) -> Record:
    """Well formed, keyed by another user than its ``user_id`` (or by nothing)."""
    txn = _txn(i, now)
    key = None if i % 5 == 0 else f"c-other-{i % 89}".encode()
    return key, orjson.dumps(txn), ""


KINDS: dict[str, Callable[[int, float], Record]] = {
    "not_json": _not_json, "not_object": _not_object, "missing_field": _missing, "wrong_type": _wrong_type,
    "bad_amount": _bad_amount, "bad_timestamp": _bad_timestamp, "huge": _huge, "future": _future,
    "key_mismatch": _key_mismatch,
}


def hostile_record(i: int, now: float) -> Record:
    """The ``i``-th hostile record (key, value, kind); timestamps count from ``now`` (epoch s)."""
    names = tuple(KINDS)
    kind = names[i % len(names)]
    key, value, _ = KINDS[kind](i // len(names), now)
    return key, value, kind


def hostile_records(n: int, now: float) -> list[Record]:
    return [hostile_record(i, now) for i in range(n)]
