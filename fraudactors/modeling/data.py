"""Training data: a :class:`Dataset`, and the simulator's (a file's: :mod:`.table`).

A :class:`Dataset` is transactions in event-time order with their ground truth (``is_fraud``, the
``scenario`` when known) and the fraud labels as they were *reported* (``labeled_at``), which the
point-in-time features and the training cut-off need.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fraudactors.errors import FraudActorsError
from fraudactors.features.schema import Label, Transaction, transaction_from_obj

DAY_S = 86400.0


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
