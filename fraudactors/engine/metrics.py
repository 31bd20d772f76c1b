"""The engine's Prometheus metrics, in a registry of their own (tests run several engines)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

# Latency buckets in seconds: sub-millisecond stages up to multi-second stalls.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


# Below this many values a batch is observed one by one (numpy's call overhead is not worth it).
_OBSERVE_MANY_MIN = 8


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value (a histogram without labels, or one child of a
    labelled one), as one bucket count per bucket instead of a Python loop over the bounds per
    value: the same buckets (the first bound >= the value; a NaN in none of them) and count; the
    sum is added once, so it may differ from one-by-one adds in its last bits. Two of these per
    decision were ~2 % of the engine's CPU. Reads prometheus_client's histogram fields (stable
    since 0.4; ``tests/engine/test_metrics_observe_many.py`` checks the output against
    ``observe``) and observes one by one where they are missing."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(values) < _OBSERVE_MANY_MIN or bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    histogram._raise_if_not_observable()
    array = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(bounds, array, side="left"), minlength=len(bounds) + 1)
    for i in np.flatnonzero(counts[:len(bounds)]).tolist():  # the last slot: NaN, in no bucket
        buckets[i].inc(int(counts[i]))
    total.inc(float(array.sum()))


class _BeforeCollect:
    """Registered first: runs its hooks when the registry is collected, before any metric is read
    (figures too costly to keep current on the hot path are computed per scrape)."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        for hook in self.hooks:
            hook()
        return ()


class EngineMetrics:
    """Every metric the engine exports. Names are part of the operations contract."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        before = _BeforeCollect()
        r.register(before)
        # called on every collection of the registry (a /metrics scrape), before the metrics are read
        self.on_collect = before.hooks
        self.records_consumed = Counter(
            "fraudactors_records_consumed", "Records fetched from the transactions topic.",
            ["partition"], registry=r)
        self.decisions = Counter(
            "fraudactors_decisions", "Decisions published, by deciding variant and outcome.",
            ["variant", "model_version", "decision"], registry=r)
        self.shadow_scores = Counter(
            "fraudactors_shadow_scores", "Transactions scored by a shadow variant (never decides).",
            ["variant", "model_version", "decision"], registry=r)
        self.dlq = Counter(
            "fraudactors_dlq", "Records sent to the dead-letter topic, by the stage that refused them.",
            ["stage"], registry=r)
        self.degraded = Counter(
            "fraudactors_degraded", "Decisions made without the online features (feature store down).",
            registry=r)
        self.stage_latency = Histogram(
            "fraudactors_stage_latency_seconds", "Time spent per micro-batch in each pipeline stage.",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decision_latency = Histogram(
            "fraudactors_decision_latency_seconds",
            "From the record's arrival at the ingestor to the decision handed to the producer.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.mailbox_depth = Gauge(
            "fraudactors_mailbox_depth", "Messages waiting in an actor's mailbox.", ["mailbox"], registry=r)
        self.consumer_lag = Gauge(
            "fraudactors_consumer_lag", "High watermark minus the next offset to process, per partition.",
            ["partition"], registry=r)
        self.actor_restarts = Counter(
            "fraudactors_actor_restarts", "Actor restarts by the supervisors.", ["actor"], registry=r)
        self.partition_paused = Gauge(
            "fraudactors_partition_paused", "1 while a partition is paused by backpressure: its worker "
            "is full, or too many of its records wait for the broker's acknowledgement.",
            ["partition"], registry=r)
        self.unacknowledged_age = Gauge(
            "fraudactors_unacknowledged_age_seconds", "Age of the partition's oldest batch handed to "
            "the publisher and not yet acknowledged by the broker (0: none); its commits wait for it.",
            ["partition"], registry=r)
        self.partition_unreadable = Gauge(
            "fraudactors_partition_unreadable",
            "1 while a partition is stopped at a batch the consumer cannot decode (logged as "
            "partition_unreadable with its offset): nothing after it is read until an operator acts. "
            "topic: transactions (not decided), labels (not applied) or the control topic (routing "
            "changes do not reach the replica).",
            ["topic", "partition"], registry=r)
        self.fraud_probability = Histogram(
            "fraudactors_fraud_probability", "Scored fraud probability per variant (shadow included).",
            ["variant"], buckets=_PROBABILITY_BUCKETS, registry=r)
        self.label_outcomes = Counter(
            "fraudactors_label_outcomes",
            "Labelled decisions per variant: tp, fp, tn, fn (online accuracy).",
            ["variant", "outcome"], registry=r)
        self.labels_unmatched = Counter(
            "fraudactors_labels_unmatched", "Labels whose decision is unknown (expired or never seen).",
            registry=r)
        self.labels_unplaced = Counter(
            "fraudactors_labels_unplaced",
            "Labels counted in no merchant's risk: their decision is forgotten and they name no merchant_id.",
            registry=r)
        self.outcome_flush_failures = Counter(
            "fraudactors_outcome_flush_failures",
            "Failed flushes of the outcome recorder, by part (outcomes: the decisions' lists; ledger: an "
            "A/B ledger payload) and kind (unavailable; refused: oom, wrongtype, script, invalid).",
            ["part", "kind"], registry=r)
        self.label_flips = Counter(
            "fraudactors_label_flips",
            "Labels that overturned the standing verdict of their transaction (latest labeled_at wins).",
            registry=r)
        self.ready = Gauge("fraudactors_ready", "1 when the engine is ready (see /readyz).", registry=r)
        self.inference_batch_size = Histogram(
            "fraudactors_inference_batch_size", "Rows per coalesced inference call.",
            buckets=_BATCH_BUCKETS, registry=r)
        self.feature_batch_size = Histogram(
            "fraudactors_feature_batch_size", "Records per coalesced feature-store call (all partitions).",
            buckets=_BATCH_BUCKETS, registry=r)
        self.feature_store_up = Gauge(
            "fraudactors_feature_store_up", "1 while the online feature store is reachable.", registry=r)
        self.publish_retries = Counter(
            "fraudactors_publish_retries", "Producer sends retried after a failure.", ["topic"], registry=r)
        self.fetch_delay = Histogram(
            "fraudactors_fetch_delay_seconds",
            "Record timestamp (producer time) to its arrival at the ingestor, oldest record per fetch.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram(
            "fraudactors_event_loop_lag_seconds",
            "How late the event loop ran a timer (CPU saturation or a blocking call).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.feature_store_slow = Counter(
            "fraudactors_feature_store_slow",
            "Feature batches retried because Redis answered too late while still alive (load, not outage).",
            registry=r)
        self.predict_store_busy = Counter(
            "fraudactors_predict_store_busy",
            "POST /predict requests answered 503: every http.max_store_reads Redis read was in use "
            "for http.store_read_wait_ms.", registry=r)
        self.commits = Counter("fraudactors_commits", "Offset commits.", registry=r)
        # the state path (docs/architecture.md, "State and its invariants")
        self.feature_store_errors = Counter(
            "fraudactors_feature_store_errors",
            "Requests Redis refused deterministically (oom, wrongtype, script, invalid): not an outage.",
            ["kind"], registry=r)
        self.state_skipped = Counter(
            "fraudactors_state_skipped",
            "Decided transactions that never entered the online state, by reason.",
            ["reason"], registry=r)
        self.state_backlog = Gauge(
            "fraudactors_state_backlog",
            "Transactions decided in degraded mode waiting to be applied to the online state.", registry=r)
        self.state_backlog_applied = Counter(
            "fraudactors_state_backlog_applied",
            "Degraded-mode transactions applied to the online state after Redis came back.", registry=r)
        self.stale_writes = Counter(
            "fraudactors_stale_writes",
            "User-state writes refused because a newer owner of the partition had written them (fencing).",
            registry=r)
        self.replays = Counter(
            "fraudactors_replayed_records",
            "Records delivered again after their state write (scored with their first vector: exact).",
            ["exact"], registry=r)
        self.unreadable_state = Counter(
            "fraudactors_unreadable_state",
            "Stored state that could not be read and was started afresh: a user's blob, a merchant's counts.",
            ["kind"], registry=r)
        self.late_records = Counter(
            "fraudactors_late_records",
            "Records older than their user's 30-day history: scored from the current state, not applied.",
            registry=r)
        self.future_records = Counter(
            "fraudactors_future_records",
            "Transactions and labels dated more than engine.max_future_skew_s ahead of the clock (dead-lettered).",
            registry=r)
        self.commit_failures = Counter(
            "fraudactors_commit_failures", "Offset commits given up: timeout (engine.commit_timeout_s) or error.",
            ["reason"], registry=r)
        self.publish_window = Gauge(
            "fraudactors_publish_window",
            "Records handed to the producer and not yet acknowledged, per output partition "
            "(at most engine.publish_window).", ["topic", "partition"], registry=r)

        # the model monitor (engine/monitor.py; docs/operations.md, "Model monitor")
        self.feature_psi = Gauge(
            "fraudactors_feature_psi",
            "Population stability index of a feature over the monitor's event-time window vs the "
            "version's training reference (top: one of the reference's most important features).",
            ["version", "feature", "top"], registry=r)
        self.score_psi = Gauge(
            "fraudactors_score_psi",
            "Population stability index of a version's scores over the monitor's window vs its training reference.",
            ["version"], registry=r)
        self.degraded_share = Gauge(
            "fraudactors_degraded_share", "Share of degraded decisions in the monitor's event-time window.",
            registry=r)
        self.model_offline_detection_rate = Gauge(
            "fraudactors_model_offline_detection_rate",
            "A version's (or its fallback's) detection rate at its review threshold on its held-out weeks (metadata.json).",
            ["version"], registry=r)
        # A/B evidence over the ledger's window of event time (fraudactors.ab; docs/models.md),
        # refreshed every ab.refresh_s; the same figures as `fraudactors ab report`.
        ab = ["variant", "version", "role"]
        self.ab_decisions = Gauge(
            "fraudactors_ab_decisions", "Decisions (or shadow scores) per model in the A/B window.", ab, registry=r)
        self.ab_flagged_rate = Gauge(
            "fraudactors_ab_flagged_rate", "Share of the A/B window's transactions the model flagged.", ab,
            registry=r)
        self.ab_frauds = Gauge(
            "fraudactors_ab_frauds", "Labelled frauds in the A/B window, caught or missed by the model.",
            [*ab, "outcome"], registry=r)
        self.ab_detection_rate = Gauge(
            "fraudactors_ab_detection_rate", "Labelled frauds caught / labelled frauds, in the A/B window.", ab,
            registry=r)
        self.ab_detection_rate_ci = Gauge(
            "fraudactors_ab_detection_rate_ci", "95 % Wilson interval of fraudactors_ab_detection_rate.",
            [*ab, "bound"], registry=r)
        self.ab_precision = Gauge(
            "fraudactors_ab_precision",
            "Labelled frauds caught / transactions flagged, in the A/B window (a lower bound until mature).",
            ab, registry=r)
        self.ab_label_maturity = Gauge(
            "fraudactors_ab_label_maturity",
            "Share of the A/B window's decisions older than ab.label_delay_s (their labels should be in).",
            ab, registry=r)
        self.ab_p_value = Gauge(
            "fraudactors_ab_p_value",
            "p-value of the detection difference, challenger against champion (McNemar or z-test).",
            ["challenger", "champion", "traffic"], registry=r)
        self.nonfinite_scores = Counter(
            "fraudactors_nonfinite_scores",
            "Scores a model returned that were no probability (NaN, infinite, outside 0..1): each row "
            "decided at the model's review threshold (logged as model_score_not_a_probability).",
            ["version"], registry=r)
        self.ab_report_failures = Counter(
            "fraudactors_ab_report_failures",
            "A/B refreshes whose report could not be made (logged as ab_report_failed; the last figures stay up).",
            registry=r)
        self.routing_changes = Counter(
            "fraudactors_routing_changes",
            "Routing documents from the control topic: applied, or refused (the routing in force kept serving).",
            ["result"], registry=r)
        self.routing_revision = Gauge(
            "fraudactors_routing_revision",
            "Revision of the routing this replica decides with (0: the configuration's variants).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
