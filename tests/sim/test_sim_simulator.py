"""The simulator: reproducible, time-ordered, realistic fraud share, tagged scenarios, delayed labels."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pytest

from fraudactors.features.schema import label_from_obj, transaction_from_obj
from fraudactors.sim import LEGIT, SCENARIOS, LabelEvent, SimEvent, Simulator

DAY = 86400.0


@pytest.fixture(scope="module")
def month() -> list[SimEvent]:
    return list(Simulator(seed=3, n_users=3000, n_merchants=600, days=28).stream())


def _key(ev: SimEvent) -> tuple[object, ...]:
    return (tuple(ev.txn.items()), ev.event_time, ev.is_fraud, ev.scenario, ev.label_at)


def test_same_seed_same_stream_and_restartable() -> None:
    a = Simulator(seed=11, n_users=500, n_merchants=300, days=5)
    b = Simulator(seed=11, n_users=500, n_merchants=300, days=5)
    first = [_key(e) for e in a.stream()]
    assert first == [_key(e) for e in b.stream()]
    assert first == [_key(e) for e in a.stream()]  # stream() restarts from the seed
    other = [_key(e) for e in itertools.islice(Simulator(seed=12, n_users=500, n_merchants=300, days=5).stream(),
                                               1000)]
    assert other != first[:1000]


def test_events_are_time_ordered_valid_spec_transactions(month: list[SimEvent]) -> None:
    times = [e.event_time for e in month]
    assert times == sorted(times)
    start = Simulator(seed=3, n_users=3000, n_merchants=600, days=28).start_time
    assert start <= times[0] and times[-1] < start + 28 * DAY
    ids = [e.txn["transaction_id"] for e in month]
    assert len(set(ids)) == len(ids)
    for ev in month[::97]:
        txn = transaction_from_obj(ev.txn)  # the engine's parser accepts it as is
        assert txn.event_time == ev.event_time
        assert set(ev.txn) == {"transaction_id", "user_id", "merchant_id", "amount", "currency",
                               "merchant_category", "is_international", "timestamp"}


def test_fraud_share_in_band_and_every_scenario_tagged(month: list[SimEvent]) -> None:
    rate = sum(e.is_fraud for e in month) / len(month)
    assert 0.005 <= rate <= 0.02
    counts = Counter(e.scenario for e in month)
    assert set(counts) == {LEGIT, *SCENARIOS}
    assert all(e.is_fraud == (e.scenario != LEGIT) for e in month)


def test_scenarios_have_their_signatures(month: list[SimEvent]) -> None:
    def hour(e: SimEvent) -> int:
        return datetime.fromtimestamp(e.event_time, UTC).hour

    by = {s: [e for e in month if e.scenario == s] for s in SCENARIOS}
    tiny = [float(e.txn["amount"]) < 5.0 for e in by["card_testing"]]  # type: ignore[arg-type]
    assert np.mean(tiny) > 0.7
    assert np.mean([hour(e) < 7 for e in by["account_takeover"]]) > 0.9
    # Compromised terminals: many frauds through few merchants.
    merchants = Counter(e.txn["merchant_id"] for e in by["compromised_merchant"])
    assert len(merchants) < len(by["compromised_merchant"]) / 20
    legit_amount = np.median([float(e.txn["amount"]) for e in month if not e.is_fraud])  # type: ignore[arg-type]
    spree_amount = np.median([float(e.txn["amount"]) for e in by["stolen_card"]])  # type: ignore[arg-type]
    assert spree_amount > 2 * legit_amount
    assert np.mean([e.txn["is_international"] for e in by["stolen_card"]]) > 0.25


def test_legit_users_also_travel_splurge_and_shop_at_night(month: list[SimEvent]) -> None:
    legit = [e for e in month if not e.is_fraud]
    n = len(legit)
    assert sum(bool(e.txn["is_international"]) for e in legit) / n > 0.02
    assert sum(datetime.fromtimestamp(e.event_time, UTC).hour < 6 for e in legit) / n > 0.03
    amounts = np.array([float(e.txn["amount"]) for e in legit])  # type: ignore[arg-type]
    assert (amounts > 1000).sum() > 100
    assert (amounts < 5).sum() > 1000


def test_labels_arrive_days_later_some_weeks_some_never(month: list[SimEvent]) -> None:
    fraud = [e for e in month if e.is_fraud]
    assert all(e.label_at is None for e in month if not e.is_fraud)
    delays = np.array([(e.label_at - e.event_time) / DAY for e in fraud if e.label_at is not None])
    assert (delays > 0).all()
    assert 0.5 < np.median(delays) < 5
    assert (delays > 7).mean() > 0.05  # some weeks
    assert delays.max() < 40
    never = sum(e.label_at is None for e in fraud)
    assert 0 < never < 0.1 * len(fraud)


def test_events_merge_labels_in_time_order() -> None:
    sim = Simulator(seed=5, n_users=800, n_merchants=300, days=10)
    events = list(sim.events())
    txns = [e for e in events if isinstance(e, SimEvent)]
    labels = [e for e in events if isinstance(e, LabelEvent)]
    assert [_key(e) for e in txns] == [_key(e) for e in sim.stream()]
    assert len(labels) == sum(e.label_at is not None for e in txns)
    clock = [e.event_time if isinstance(e, SimEvent) else e.at for e in events]
    assert clock == sorted(clock)
    seen: dict[object, SimEvent] = {}
    for ev in events:
        if isinstance(ev, SimEvent):
            seen[ev.txn["transaction_id"]] = ev
        else:
            label = label_from_obj(ev.label)  # SPEC §4, parses
            origin = seen[label.transaction_id]  # its transaction came first
            assert label.is_fraud and origin.is_fraud
            assert label.labeled_at == ev.at == origin.label_at
            assert label.merchant_id == origin.txn["merchant_id"]


def test_live_restamps_with_the_clock_and_scales_label_delay() -> None:
    ticks = itertools.count(1_800_000_000.0, 0.001)
    sim = Simulator(seed=2, n_users=2000, n_merchants=300, days=None)
    live = list(itertools.islice(sim.live(clock=lambda: next(ticks), label_delay_scale=0.001), 3000))
    base = list(itertools.islice(sim.stream(), 3000))
    for i, (a, b) in enumerate(zip(live, base, strict=True)):
        assert a.event_time == pytest.approx(1_800_000_000.0 + i * 0.001, abs=1e-3)
        assert transaction_from_obj(a.txn).event_time == a.event_time
        assert a.scenario == b.scenario and a.txn["transaction_id"] == b.txn["transaction_id"]
        if b.label_at is not None:
            assert a.label_at == pytest.approx(a.event_time + (b.label_at - b.event_time) * 0.001, abs=2e-3)


def test_endless_stream_keeps_going_past_a_day() -> None:
    sim = Simulator(seed=1, n_users=200, n_merchants=200, days=None)
    last = None
    for ev in sim.stream():
        last = ev
        if ev.event_time > sim.start_time + 2.5 * DAY:
            break
    assert last is not None and last.event_time > sim.start_time + 2.5 * DAY
