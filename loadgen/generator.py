"""Where the load generator's transactions come from: the project simulator, with ground truth.

The interface is narrow: a :class:`TransactionSource` hands out the next ``n`` transactions already
serialized (key = user_id, value = SPEC §2 JSON), their ground truth, and the labels (SPEC §4) that
become due while they are sent. Each transaction's id is ``<prefix><index>`` (index = its position
in the run, from 0) so the collector matches decisions by integer parse, not by a dictionary.

Event time: by default each transaction keeps the simulator's own event time (the world runs faster
than the wall clock; the engine computes features on event time, so the models see traffic like
their training data and the accuracy numbers mean something). ``event_time="send"`` restamps each
transaction with its scheduled send time instead (wall clock; use for plumbing, not accuracy).

The simulated world starts on a fixed date (``fraudactors.sim.DEFAULT_START``), so the default
stream is the same everywhere. A run long enough to reach the wall clock would send transactions
dated in the future, which the engine dead-letters (``engine.max_future_skew_s``); given the run's
length, the source starts that world earlier by whole weeks instead, so that it ends a day before
now: the same stream, earlier dates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import orjson

from fraudactors.sim import DEFAULT_START, LabelEvent, SimEvent, Simulator, iso

EventTimeMode = Literal["sim", "send"]
_SIM_PREFIX = "t-"
_DAY = 86400.0
_WEEK = 7 * _DAY


@dataclass(slots=True)
class PendingLabel:
    send_after: int  # run index of the transaction after which the label goes out
    key: bytes
    value: bytes


@dataclass(slots=True)
class TxnBatch:
    keys: list[bytes]
    values: list[bytes]
    is_fraud: np.ndarray  # bool (n,)
    scenarios: list[str]
    labels: list[PendingLabel] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


class TransactionSource(Protocol):
    name: str

    def take(self, n: int, send_times: np.ndarray) -> TxnBatch:
        """The next ``n`` transactions; ``send_times`` are their scheduled send times (epoch s)."""
        ...

    def begin_run(self, prefix: str) -> None:
        """What was taken so far was warm-up (its ids, and its later labels, keep their prefix); from
        now on ids are ``prefix`` + index from 0."""
        ...


class SimSource:
    """:class:`fraudactors.sim.Simulator` (endless, seeded) adapted to the load generator."""

    name = "fraudactors.sim"

    def __init__(self, prefix: str, seed: int = 7, n_users: int = 5000, n_merchants: int = 1000,
                 event_time: EventTimeMode = "sim", run_length: int | None = None) -> None:
        self.prefix = prefix
        self.event_time = event_time
        self.simulator = Simulator(seed=seed, n_users=n_users, n_merchants=n_merchants, days=None,
                                   id_prefix=_SIM_PREFIX)
        if event_time == "sim" and run_length:
            start = start_before_now(self.simulator.expected_tps(), run_length)
            if start != self.simulator.start_time:
                self.simulator = Simulator(seed=seed, n_users=n_users, n_merchants=n_merchants, days=None,
                                           id_prefix=_SIM_PREFIX, start_time=start)
        self._events: Iterator[SimEvent | LabelEvent] = self.simulator.events()
        self._next = 0  # run index of the next transaction
        self._offset = 0  # simulator transactions taken before the run (warm-up)
        self._warmup_prefix = prefix
        self._last_send_time = 0.0

    def begin_run(self, prefix: str) -> None:
        if prefix == self.prefix:
            raise ValueError("the run's prefix must differ from the warm-up's")
        self._offset += self._next
        self._next = 0
        self._warmup_prefix, self.prefix = self.prefix, prefix

    def _id(self, sim_index: int) -> str:
        if sim_index < self._offset:
            return f"{self._warmup_prefix}{sim_index}"
        return f"{self.prefix}{sim_index - self._offset}"

    def take(self, n: int, send_times: np.ndarray) -> TxnBatch:
        keys: list[bytes] = []
        values: list[bytes] = []
        fraud = np.zeros(n, dtype=bool)
        scenarios: list[str] = []
        labels: list[PendingLabel] = []
        prefix, dumps, restamp = self.prefix, orjson.dumps, self.event_time == "send"
        times = send_times.tolist()
        k = 0
        events = self._events
        while k < n:
            ev = next(events)
            if isinstance(ev, LabelEvent):
                label = dict(ev.label)
                sim_id = str(label["transaction_id"])
                label["transaction_id"] = self._id(int(sim_id[len(_SIM_PREFIX):]) - 1)
                if restamp:
                    label["labeled_at"] = iso(self._last_send_time)
                labels.append(PendingLabel(self._next + k - 1, str(label["user_id"]).encode(), dumps(label)))
                continue
            txn = dict(ev.txn)  # the simulator still reads its own (for the label it emits later)
            txn["transaction_id"] = f"{prefix}{self._next + k}"
            if restamp:
                self._last_send_time = times[k]
                txn["timestamp"] = iso(times[k])
            keys.append(str(txn["user_id"]).encode())
            values.append(dumps(txn))
            fraud[k] = ev.is_fraud
            scenarios.append(ev.scenario)
            k += 1
        self._next += n
        return TxnBatch(keys, values, fraud, scenarios, labels)


def start_before_now(legit_tps: float, run_length: int, now: float | None = None) -> float:
    """The simulated world's start for a run of ``run_length`` transactions (warm-up included):
    the fixed default, or whole weeks before it when the run would otherwise end later than a
    day before ``now`` (a tenth more transactions than the legitimate rate: frauds and margin)."""
    now = time.time() if now is None else now
    span = 1.1 * run_length / legit_tps
    late = DEFAULT_START + span - (now - _DAY)
    return DEFAULT_START if late <= 0 else DEFAULT_START - math.ceil(late / _WEEK) * _WEEK


def make_source(prefix: str, seed: int = 7, event_time: EventTimeMode = "sim",
                run_length: int | None = None) -> TransactionSource:
    """The transaction source for a run (``run_length``: the transactions it will take, to keep
    its simulated dates in the past); one seed gives the same traffic every time."""
    return SimSource(prefix, seed=seed, event_time=event_time, run_length=run_length)
