"""Input records: SPEC §2 transactions and §4 labels, parsed and validated.

This is the hot path of every feature worker (thousands of records per second): a well-formed
transaction is decoded and type-checked by a compiled msgspec decoder (the field types and
bounds below), and only a record it refuses takes the slower path -- ``orjson.loads`` and a
handful of type checks -- that names what is wrong. msgspec is never more lenient than that path
(strict types, UTF-8, code-point lengths, finite numbers), so both accept exactly the same records.
Every way a record can be wrong raises :class:`InvalidRecord` with a short reason that becomes
the dead-letter ``error`` header; nothing else escapes (the tests fuzz this).

Rules beyond SPEC §2 that a payment-risk team would expect:

- ``null`` is a wrong type for every field, optional ones included (an optional field is absent
  or has the right type).
- Optional string fields, when present, are 1-64 characters like the ids.
- Timestamps must fall in [1970-01-01, 2100-01-01) UTC; epoch *milliseconds* passed as seconds
  are out of range and rejected rather than silently read as the year 56,000.
- ``timestamp`` keeps the instant normalized to ISO-8601 UTC (``+00:00``, milliseconds, or
  microseconds when the input had them); ``event_time`` is the same instant in epoch seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import orjson

from fraudactors.errors import InvalidRecord
from fraudactors.records import record

MAX_VALUE_BYTES = 1 << 20  # 1 MiB
MAX_ID_CHARS = 64
MAX_AMOUNT = 1e9
MIN_EVENT_TIME = 0.0  # 1970-01-01T00:00:00Z
MAX_EVENT_TIME = 4102444800.0  # 2100-01-01T00:00:00Z
_MAX_TIMESTAMP_CHARS = 64

DEFAULT_MERCHANT_ID = "unknown"
DEFAULT_CURRENCY = "USD"
DEFAULT_CATEGORY = "unknown"


@record
class Transaction:
    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    currency: str
    merchant_category: str
    is_international: bool
    event_time: float  # epoch seconds, UTC
    timestamp: str  # ISO-8601 UTC, for the decision's event_time


@dataclass(frozen=True, slots=True)
class Label:
    transaction_id: str
    user_id: str
    merchant_id: str
    is_fraud: bool
    labeled_at: float  # epoch seconds, UTC


def label_merchant(label: Label, transaction_merchant: str | None) -> str | None:
    """The merchant whose risk a label counts in: its transaction's (``transaction_merchant``, when
    known: online the merchant the decision was made at, offline the transaction's in the data),
    else the label's own ``merchant_id`` when it names one; None when neither is known -- such a
    label counts nowhere, not at merchant "unknown" (which stands for the transactions without one).
    """
    if transaction_merchant is not None:
        return transaction_merchant
    return None if label.merchant_id == DEFAULT_MERCHANT_ID else label.merchant_id


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _loads(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise InvalidRecord("empty value (null record)")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidRecord(f"value must be bytes, got {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidRecord(f"value too large: {len(value)} bytes > {MAX_VALUE_BYTES}")
    if not value:
        raise InvalidRecord("empty value")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise InvalidRecord("not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"not a JSON object (got {_type_name(obj)})")
    return obj


def _required_str(obj: dict[str, Any], name: str) -> str:
    try:
        value = obj[name]
    except KeyError:
        raise InvalidRecord(f"missing field '{name}'") from None
    if type(value) is not str:
        raise InvalidRecord(f"{name} must be a string, got {_type_name(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidRecord(f"{name} must be 1-{MAX_ID_CHARS} characters, got {len(value)}")
    return value


def _optional_str(obj: dict[str, Any], name: str, default: str) -> str:
    value = obj.get(name, default)
    if value is default:
        return default
    if type(value) is not str:
        raise InvalidRecord(f"{name} must be a string, got {_type_name(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidRecord(f"{name} must be 1-{MAX_ID_CHARS} characters, got {len(value)}")
    return value


def _bool(obj: dict[str, Any], name: str, default: bool | None) -> bool:
    value = obj.get(name, default)
    if value is None:
        if name in obj:
            raise InvalidRecord(f"{name} must be a boolean, got null")
        raise InvalidRecord(f"missing field '{name}'")
    if type(value) is not bool:
        raise InvalidRecord(f"{name} must be a boolean, got {_type_name(value)}")
    return value


def _amount(obj: dict[str, Any]) -> float:
    try:
        value = obj["amount"]
    except KeyError:
        raise InvalidRecord("missing field 'amount'") from None
    kind = type(value)
    if kind is float:
        amount = value
    elif kind is int:
        amount = float(value)
    else:
        raise InvalidRecord(f"amount must be a number, got {_type_name(value)}")
    if not math.isfinite(amount):
        raise InvalidRecord("amount must be finite")
    if amount < 0.0:
        raise InvalidRecord("amount must be >= 0")
    if amount > MAX_AMOUNT:
        raise InvalidRecord(f"amount must be <= {MAX_AMOUNT:.0e}")
    return amount


def format_timestamp(event_time: float) -> str:
    """ISO-8601 UTC for an epoch time (milliseconds, or microseconds when it has them)."""
    return _format(datetime.fromtimestamp(event_time, UTC))


def _format(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds" if dt.microsecond % 1000 == 0 else "microseconds")


def _is_canonical(text: str) -> bool:
    """True for exactly the form :func:`_format` writes with milliseconds (``fromisoformat`` has
    already accepted ``text``; this only checks the layout)."""
    return (
        len(text) == 29
        and text[10] == "T"
        and text[19] == "."
        and text.endswith("+00:00")
        and text[4] == "-"
        and text[7] == "-"
        and text[13] == ":"
        and text[16] == ":"
    )


def parse_time(value: object, name: str = "timestamp") -> tuple[float, str]:
    """``(epoch seconds, normalized ISO-8601 UTC)`` from an ISO string or epoch seconds."""
    kind = type(value)
    if kind is str:
        text: str = value  # type: ignore[assignment]
        if len(text) > _MAX_TIMESTAMP_CHARS:
            raise InvalidRecord(f"{name} is not ISO-8601 (too long)")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRecord(f"{name} is not ISO-8601: {_short(text)}") from None
        try:
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            elif dt.utcoffset():
                dt = dt.astimezone(UTC)
            elif _is_canonical(text):
                # Already "YYYY-MM-DDTHH:MM:SS.fff+00:00" (the common case): skip re-formatting.
                seconds = dt.timestamp()
                if not MIN_EVENT_TIME <= seconds < MAX_EVENT_TIME:
                    raise InvalidRecord(f"{name} out of range (1970..2099): {_short(text)}")
                return seconds, text
            seconds = dt.timestamp()
        except (OverflowError, ValueError):
            raise InvalidRecord(f"{name} out of range: {_short(text)}") from None
        if not MIN_EVENT_TIME <= seconds < MAX_EVENT_TIME:
            raise InvalidRecord(f"{name} out of range (1970..2099): {_short(text)}")
        return seconds, _format(dt)
    if kind is int or kind is float:
        seconds = float(value)  # type: ignore[arg-type]
        if not math.isfinite(seconds):
            raise InvalidRecord(f"{name} must be finite")
        if not MIN_EVENT_TIME <= seconds < MAX_EVENT_TIME:
            raise InvalidRecord(f"{name} out of range: epoch seconds must be in [0, {MAX_EVENT_TIME:.0f})")
        return seconds, format_timestamp(seconds)
    raise InvalidRecord(f"{name} must be an ISO-8601 string or epoch seconds, got {_type_name(value)}")


def transaction_from_obj(obj: object) -> Transaction:
    """A :class:`Transaction` from decoded JSON (POST /predict); raises :class:`InvalidRecord`."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"not a JSON object (got {_type_name(obj)})")
    transaction_id = _required_str(obj, "transaction_id")
    user_id = _required_str(obj, "user_id")
    amount = _amount(obj)
    if "timestamp" not in obj:
        raise InvalidRecord("missing field 'timestamp'")
    event_time, timestamp = parse_time(obj["timestamp"])
    return Transaction(
        transaction_id=transaction_id,
        user_id=user_id,
        merchant_id=_optional_str(obj, "merchant_id", DEFAULT_MERCHANT_ID),
        amount=amount,
        currency=_optional_str(obj, "currency", DEFAULT_CURRENCY),
        merchant_category=_optional_str(obj, "merchant_category", DEFAULT_CATEGORY),
        is_international=_bool(obj, "is_international", False),
        event_time=event_time,
        timestamp=timestamp,
    )


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]


class _Wire(msgspec.Struct):
    """SPEC §2 as msgspec checks it (unknown fields ignored); ``timestamp`` by :func:`parse_time`."""

    transaction_id: _Id
    user_id: _Id
    amount: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_AMOUNT)]
    timestamp: str | float
    merchant_id: _Id = DEFAULT_MERCHANT_ID
    currency: _Id = DEFAULT_CURRENCY
    merchant_category: _Id = DEFAULT_CATEGORY
    is_international: bool = False


_decode_wire = msgspec.json.Decoder(_Wire).decode


def parse_transaction(value: bytes | None) -> Transaction:
    """A :class:`Transaction` from a Kafka record value; raises :class:`InvalidRecord`."""
    if type(value) is bytes and 0 < len(value) <= MAX_VALUE_BYTES:
        try:
            wire = _decode_wire(value)
        except (msgspec.MsgspecError, RecursionError, ValueError):
            pass  # the checks below name the reason
        else:
            event_time, timestamp = parse_time(wire.timestamp)
            return Transaction(wire.transaction_id, wire.user_id, wire.merchant_id, wire.amount, wire.currency,
                               wire.merchant_category, wire.is_international, event_time, timestamp)
    return transaction_from_obj(_loads(value))


def label_from_obj(obj: object) -> Label:
    """A :class:`Label` from decoded JSON; raises :class:`InvalidRecord`."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"not a JSON object (got {_type_name(obj)})")
    transaction_id = _required_str(obj, "transaction_id")
    user_id = _required_str(obj, "user_id")
    merchant_id = _optional_str(obj, "merchant_id", DEFAULT_MERCHANT_ID)
    is_fraud = _bool(obj, "is_fraud", None)
    if "labeled_at" not in obj:
        raise InvalidRecord("missing field 'labeled_at'")
    labeled_at, _ = parse_time(obj["labeled_at"], "labeled_at")
    return Label(transaction_id, user_id, merchant_id, is_fraud, labeled_at)


def parse_label(value: bytes | None) -> Label:
    """A :class:`Label` from a Kafka record value (SPEC §4); raises :class:`InvalidRecord`."""
    return label_from_obj(_loads(value))


def transaction_to_obj(txn: Transaction) -> dict[str, Any]:
    """The SPEC §2 JSON object for a transaction (what the load generator and tests send)."""
    return {
        "transaction_id": txn.transaction_id,
        "user_id": txn.user_id,
        "merchant_id": txn.merchant_id,
        "amount": txn.amount,
        "currency": txn.currency,
        "merchant_category": txn.merchant_category,
        "is_international": txn.is_international,
        "timestamp": txn.timestamp,
    }


def label_to_obj(label: Label) -> dict[str, Any]:
    """The SPEC §4 JSON object for a label."""
    return {
        "transaction_id": label.transaction_id,
        "user_id": label.user_id,
        "merchant_id": label.merchant_id,
        "is_fraud": label.is_fraud,
        "labeled_at": format_timestamp(label.labeled_at),
    }
