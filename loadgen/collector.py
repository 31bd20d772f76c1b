"""Reads decisions from ``predictions`` and matches them to what the load generator sent.

Every transaction the run sends has the id ``<prefix><index>``, so matching is an integer parse
and array indexing (no dictionary of hundreds of thousands of strings). Latency is the time the
decision was read minus the transaction's *scheduled* send time. Decisions for ids outside the run
(other traffic on the topic) are counted as ``foreign`` and otherwise ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import orjson
from hdrh.histogram import HdrHistogram

# Latencies are recorded in microseconds, from 1 us to 1 hour, 3 significant digits.
HIST_MIN_US = 1
HIST_MAX_US = 3_600_000_000
HIST_DIGITS = 3

# Variant name -> its code in Matches.variant: A and B always (the SPEC's example), others (a
# routing with more variants, `fraudactors models promote`) as they are first seen.
VARIANT_CODES = {"A": 1, "B": 2}
_MAX_VARIANTS = 127  # int8 codes


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


@dataclass
class Matches:
    """Per-transaction outcome arrays for a run of ``total`` transactions."""

    total: int
    counts: np.ndarray = field(init=False)  # decisions read per transaction
    latency_ms: np.ndarray = field(init=False)  # first decision's latency; NaN while undecided
    engine_ms: np.ndarray = field(init=False)  # the engine's own latency_ms in that decision (SPEC §3)
    decided_at_s: np.ndarray = field(init=False)  # when the first decision was read (run clock)
    probability: np.ndarray = field(init=False)
    flagged: np.ndarray = field(init=False)  # decision's is_fraud
    variant: np.ndarray = field(init=False)  # 0 none, else the collector's variant_codes
    degraded: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.total
        self.counts = np.zeros(n, dtype=np.uint16)
        self.latency_ms = np.full(n, np.nan, dtype=np.float64)
        self.engine_ms = np.full(n, np.nan, dtype=np.float64)
        self.decided_at_s = np.full(n, np.nan, dtype=np.float64)
        self.probability = np.full(n, np.nan, dtype=np.float64)
        self.flagged = np.zeros(n, dtype=bool)
        self.variant = np.zeros(n, dtype=np.int8)
        self.degraded = np.zeros(n, dtype=bool)


class DecisionCollector:
    """Feeds decision records into :class:`Matches`; the HDR histogram is built once the run is over.

    The hot path (during the run, sharing the CPU with the engine) only parses and stores: latency
    goes into a numpy array, and :meth:`histogram` records them all afterwards.
    """

    def __init__(self, prefix: str, scheduled_s: np.ndarray, start: float) -> None:
        self.prefix = prefix
        self._plen = len(prefix)
        self.scheduled_s = scheduled_s
        self.start = start  # time.perf_counter() of the run's t=0
        self.matches = Matches(len(scheduled_s))
        self.distinct = 0
        self.records = 0
        self.duplicates = 0
        self.foreign = 0
        self.malformed = 0
        self.variant_codes: dict[str, int] = dict(VARIANT_CODES)
        self.other_variants: dict[str, int] = {}  # decisions whose variant is not a name
        # latencies (s) since the progress display last looked (kept only while someone looks)
        self.track_window = True
        self._window: list[float] = []
        self._histogram: HdrHistogram | None = None

    def feed(self, values: list[bytes | None], now: float | None = None) -> None:
        """Match a batch of decision values read at ``now`` (perf_counter; default: the current time)."""
        if now is None:
            now = time.perf_counter()
        t_read = now - self.start
        m = self.matches
        plen, prefix, sched = self._plen, self.prefix, self.scheduled_s
        counts, latency_ms, decided_at = m.counts, m.latency_ms, m.decided_at_s
        window = self._window if self.track_window else None
        total = m.total
        loads, variant_codes = orjson.loads, self.variant_codes
        for value in values:
            self.records += 1
            try:
                d = loads(value) if value is not None else None
            except orjson.JSONDecodeError:
                d = None
            if not isinstance(d, dict) or "transaction_id" not in d:
                self.malformed += 1
                continue
            tid = d["transaction_id"]
            if not isinstance(tid, str) or not tid.startswith(prefix):
                self.foreign += 1
                continue
            try:
                i = int(tid[plen:])
            except ValueError:
                self.foreign += 1
                continue
            if not 0 <= i < total:
                self.foreign += 1
                continue
            c = counts[i]
            counts[i] = c + 1
            if c:
                self.duplicates += 1
                continue
            self.distinct += 1
            latency_s = t_read - sched[i]
            latency_ms[i] = latency_s * 1000.0
            decided_at[i] = t_read
            if window is not None:
                window.append(latency_s)
            prob = d.get("fraud_probability")
            if isinstance(prob, int | float):
                m.probability[i] = prob
            engine_ms = d.get("latency_ms")
            if isinstance(engine_ms, int | float):
                m.engine_ms[i] = engine_ms
            if d.get("is_fraud") is True:
                m.flagged[i] = True
            variant = d.get("variant")
            code = variant_codes.get(variant, 0) if isinstance(variant, str) else 0
            if not code and isinstance(variant, str) and variant and len(variant_codes) < _MAX_VARIANTS:
                code = variant_codes[variant] = len(variant_codes) + 1
            if code:
                m.variant[i] = code
            else:
                key = str(variant)
                self.other_variants[key] = self.other_variants.get(key, 0) + 1
            if d.get("degraded") is True:
                m.degraded[i] = True
        self._histogram = None

    def window_p99_ms(self) -> float | None:
        """p99 latency of the decisions matched since the last call (for the progress line)."""
        window, self._window = self._window, []
        if not window:
            return None
        return float(np.percentile(np.asarray(window), 99.0)) * 1000.0

    @property
    def histogram(self) -> HdrHistogram:
        """Every first decision's latency in microseconds (HDR, 3 significant digits)."""
        if self._histogram is None:
            h = new_histogram()
            lat = self.matches.latency_ms
            us = np.maximum((lat[np.isfinite(lat)] * 1000.0).astype(np.int64), HIST_MIN_US)
            values, counts = np.unique(us, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                h.record_value(min(value, HIST_MAX_US), count)
            self._histogram = h
        return self._histogram
