"""Per-function cost of the feature transition on a steady-state population (a benchmark, not a test).

    python scripts/bench_transition.py [--users 2000] [--days 31] [--repeat 5]

Simulates ``--days`` days, applies all but the last day to per-user states (the population then
holds up to 30 days of history, as in production), and times on the last day's transactions:
``user_features`` (the states only read), ``apply_transaction`` (on copies made outside the
timing) and ``merchant_features``. Process CPU time, best of ``--repeat``, in microseconds per
transaction. Numbers depend on the machine and its load; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import orjson

from fraudactors.features.definition import (
    DAY_S,
    MerchantState,
    apply_transaction,
    count_merchant_tx,
    is_new_customer,
    merchant_features,
    transition,
    user_features,
)
from fraudactors.features.schema import Transaction, parse_transaction
from fraudactors.sim.simulator import Simulator


def best_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--merchants", type=int, default=500)
    parser.add_argument("--days", type=float, default=31.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    sim = Simulator(seed=args.seed, n_users=args.users, n_merchants=args.merchants, days=args.days)
    txns = [parse_transaction(orjson.dumps(ev.txn)) for ev in sim.stream()]
    cut = sim.start_time + (args.days - 1.0) * DAY_S
    users: dict = {}
    merchants: dict[str, MerchantState] = {}
    last: list[Transaction] = []
    for txn in txns:
        if txn.event_time >= cut:
            last.append(txn)
            continue
        m = merchants.setdefault(txn.merchant_id, MerchantState())
        row, users[txn.user_id] = transition(users.get(txn.user_id), m, txn)
        count_merchant_tx(m, txn.event_time, is_new_customer(row))
    pairs = [(users.get(t.user_id), t) for t in last]
    n = len(pairs)
    events = [len(s.times) for s, _ in pairs if s is not None]
    print(f"{len(txns):,} transactions, {len(users):,} users; timed on the last day's {n:,} "
          f"({sum(events) / max(1, len(events)):.1f} stored events per user on average)")

    def features() -> None:
        for state, txn in pairs:
            user_features(state, txn)

    print(f"user_features: {best_us(features, n, args.repeat):.2f} us/tx")

    applied = [(s, t) for s, t in pairs if s is not None]
    best = float("inf")
    for _ in range(args.repeat):
        copies = [(copy.deepcopy(s), t) for s, t in applied]
        started = time.process_time()
        for state, txn in copies:
            apply_transaction(state, txn)
        best = min(best, time.process_time() - started)
    print(f"apply_transaction: {best / len(applied) * 1e6:.2f} us/tx")

    ms = [(merchants.get(t.merchant_id), t.event_time) for t in last]

    def merchant() -> None:
        for m, t in ms:
            merchant_features(m, t)

    print(f"merchant_features: {best_us(merchant, n, args.repeat):.2f} us/tx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
