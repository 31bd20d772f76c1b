"""From scores to decisions: A/B routing (SPEC §7), thresholds and the decision JSON (SPEC §3)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from fraudactors.settings import DecisionSettings, VariantSettings


def route_fraction(transaction_id: str) -> float:
    """A stable number in [0, 1) for a transaction id: the same id always routes the same way."""
    digest = hashlib.blake2b(transaction_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    version: str
    shadow: bool


class Router:
    """Deterministic weighted routing among the deciding variants; shadows score everything."""

    def __init__(self, variants: Mapping[str, VariantSettings]) -> None:
        deciding = sorted((name, v) for name, v in variants.items() if not v.shadow and v.weight > 0)
        total = sum(v.weight for _, v in deciding)
        self.deciding: tuple[Variant, ...] = tuple(Variant(n, v.version, False) for n, v in deciding)
        self.shadows: tuple[Variant, ...] = tuple(
            Variant(n, v.version, True) for n, v in sorted(variants.items()) if v.shadow)
        bounds: list[float] = []
        acc = 0.0
        for _, v in deciding:
            acc += v.weight / total
            bounds.append(acc)
        bounds[-1] = 1.0
        self._bounds = tuple(bounds)
        self.versions: tuple[str, ...] = tuple(
            sorted({v.version for v in self.deciding} | {v.version for v in self.shadows}))

    def route(self, transaction_id: str) -> Variant:
        x = route_fraction(transaction_id)
        for variant, bound in zip(self.deciding, self._bounds, strict=True):
            if x < bound:
                return variant
        return self.deciding[-1]  # pragma: no cover - x < 1.0 == bounds[-1]


@dataclass(frozen=True, slots=True)
class Thresholds:
    review: float
    decline: float

    @classmethod
    def resolve(cls, settings: DecisionSettings, model_review: float, model_decline: float) -> Thresholds:
        review = settings.review_threshold if settings.review_threshold >= 0 else model_review
        decline = settings.decline_threshold if settings.decline_threshold >= 0 else model_decline
        return cls(review=min(review, decline), decline=decline)

    def decide(self, probability: float) -> str:
        if probability >= self.decline:
            return "decline"
        if probability >= self.review:
            return "review"
        return "approve"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def encode_decision(
    *,
    transaction_id: str,
    user_id: str,
    is_fraud: bool,
    fraud_probability: float,
    decision: str,
    model_version: str,
    variant: str,
    reasons: Sequence[str],
    degraded: bool,
    event_time: str,
    decided_at: str,
    latency_ms: float,
    features: Mapping[str, float] | None = None,
    shadow: Mapping[str, float] | None = None,
) -> bytes:
    """The SPEC §3 decision as JSON bytes (field order as in the spec).

    ``shadow`` (only with ``engine.emit_shadow``): each shadow variant's probability, the optional
    SPEC §3 field ``"shadow"``. ``features`` (only with ``engine.emit_features``): the vector the
    decision was scored with, added as one extra key ``"features"`` after the SPEC fields.
    """
    obj = {
        "transaction_id": transaction_id,
        "user_id": user_id,
        "is_fraud": is_fraud,
        "fraud_probability": round(fraud_probability, 6),
        "decision": decision,
        "model_version": model_version,
        "variant": variant,
        "reasons": list(reasons),
        "degraded": degraded,
        "event_time": event_time,
        "decided_at": decided_at,
        "latency_ms": round(latency_ms, 3),
    }
    if shadow is not None:
        obj["shadow"] = {name: round(p, 6) for name, p in shadow.items()}
    if features is not None:
        obj["features"] = features
    return orjson.dumps(obj)
