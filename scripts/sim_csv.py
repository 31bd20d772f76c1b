"""Write the built-in simulator's stream as a CSV that ``fraudactors train --data`` reads.

Columns: the SPEC §2 transaction fields, ``is_fraud``, ``labeled_at`` (empty for a legitimate
payment, ``never`` for a fraud never reported: ``train --data`` then knows it at no cut-off, as
``train --synthetic`` does, instead of taking it as reported ``--label-delay-days`` later) and
``scenario``. Used to measure how fast ``train --data`` reads a big file
(docs/models.md); about 16,000 rows per simulated day at 5,000 users. Run:
``.venv/bin/python scripts/sim_csv.py --days 70 --out /tmp/sim.csv`` (about a million rows).
"""

from __future__ import annotations

import argparse
import csv
import sys

from fraudactors.modeling.table import NEVER
from fraudactors.sim import Simulator
from fraudactors.sim.simulator import SimEvent, iso

HEADER = ("transaction_id", "user_id", "merchant_id", "amount", "currency", "merchant_category",
          "is_international", "timestamp", "is_fraud", "labeled_at", "scenario")


def labeled_at(ev: SimEvent) -> str:
    if ev.label_at is not None:
        return iso(ev.label_at)
    return NEVER if ev.is_fraud else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=float, default=70.0)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--merchants", type=int, default=1000)
    args = p.parse_args(argv)
    sim = Simulator(seed=args.seed, n_users=args.users, n_merchants=args.merchants, days=args.days)
    n = 0
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for ev in sim.stream():
            t = ev.txn
            writer.writerow((t["transaction_id"], t["user_id"], t["merchant_id"], f"{t['amount']:.2f}",
                             t["currency"], t["merchant_category"], "true" if t["is_international"] else "false",
                             t["timestamp"], 1 if ev.is_fraud else 0, labeled_at(ev), ev.scenario))
            n += 1
    print(f"wrote {n:,} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
