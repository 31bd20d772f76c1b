"""Arrival-rate profiles for open-loop load: when is the i-th transaction due?

A profile is a piecewise-linear rate r(t) in transactions per second over ``[0, duration]``.
The number due by time t is the integral N(t); the i-th transaction (0-based) is scheduled at
the time N reaches i, so the schedule is exact and independent of how fast the sender runs.

- ``constant``: one flat segment at ``rate``.
- ``step``: ``steps`` flat segments of equal length, rates evenly spaced from ``rate`` to ``rate_to``.
- ``ramp``: one segment rising linearly from ``rate`` to ``rate_to``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fraudactors.errors import ConfigError

ProfileName = Literal["constant", "step", "ramp"]
PROFILES: tuple[str, ...] = ("constant", "step", "ramp")


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    rate_from: float
    rate_to: float

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    def count(self, dt: float) -> float:
        """Transactions due within the first ``dt`` seconds of this segment."""
        slope = (self.rate_to - self.rate_from) / self.length_s
        return self.rate_from * dt + 0.5 * slope * dt * dt

    def time_of(self, n: float) -> float:
        """Offset in this segment at which ``n`` transactions (0 <= n <= total) are due."""
        slope = (self.rate_to - self.rate_from) / self.length_s
        if abs(slope) < 1e-12:
            return n / self.rate_from if self.rate_from > 0 else self.length_s
        # 0.5*slope*t^2 + r0*t - n = 0, the root in [0, length]
        disc = self.rate_from * self.rate_from + 2.0 * slope * n
        t = (-self.rate_from + math.sqrt(max(disc, 0.0))) / slope
        return min(max(t, 0.0), self.length_s)


@dataclass(frozen=True, slots=True)
class RateProfile:
    name: str
    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        return self.segments[-1].end_s

    @property
    def total(self) -> int:
        """How many transactions the whole run sends."""
        return math.floor(self.due_by(self.duration_s) + 1e-9)

    @property
    def peak_rate(self) -> float:
        return max(max(s.rate_from, s.rate_to) for s in self.segments)

    @property
    def mean_rate(self) -> float:
        return self.due_by(self.duration_s) / self.duration_s

    def rate_at(self, t: float) -> float:
        if t < 0 or t > self.duration_s:
            return 0.0
        for seg in self.segments:
            if t <= seg.end_s:
                frac = (t - seg.start_s) / seg.length_s
                return seg.rate_from + (seg.rate_to - seg.rate_from) * frac
        return 0.0  # pragma: no cover - unreachable

    def due_by(self, t: float) -> float:
        """Transactions due by ``t`` seconds after the start (fractional)."""
        if t <= 0:
            return 0.0
        done = 0.0
        for seg in self.segments:
            if t >= seg.end_s:
                done += seg.count(seg.length_s)
            else:
                return done + seg.count(t - seg.start_s)
        return done

    def count_due(self, t: float) -> int:
        """Whole transactions whose scheduled time is <= ``t`` (the i-th is due once N(t) >= i)."""
        if t < 0:
            return 0
        return min(math.floor(self.due_by(t) + 1e-9) + 1, self.total)

    def scheduled_time(self, i: int) -> float:
        """Seconds after the start at which transaction ``i`` (0-based) is due."""
        n = float(i)
        done = 0.0
        for seg in self.segments:
            in_seg = seg.count(seg.length_s)
            if n <= done + in_seg + 1e-9:
                return seg.start_s + seg.time_of(n - done)
            done += in_seg
        return self.duration_s


def make_profile(
    name: str, rate: float, duration_s: float, rate_to: float | None = None, steps: int = 4
) -> RateProfile:
    """Build a validated profile. ``rate_to`` defaults to ``rate`` (constant)."""
    if name not in PROFILES:
        raise ConfigError("loadgen.profile", f"must be one of {', '.join(PROFILES)}, got {name!r}")
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError("loadgen.rate", f"must be > 0, got {rate!r}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError("loadgen.duration", f"must be > 0, got {duration_s!r}")
    target = rate if rate_to is None else rate_to
    if not (math.isfinite(target) and target > 0):
        raise ConfigError("loadgen.rate_to", f"must be > 0, got {target!r}")
    segments: tuple[Segment, ...]
    if name == "constant":
        segments = (Segment(0.0, duration_s, rate, rate),)
    elif name == "ramp":
        segments = (Segment(0.0, duration_s, rate, target),)
    else:
        if steps < 1:
            raise ConfigError("loadgen.steps", f"must be >= 1, got {steps}")
        width = duration_s / steps
        rates = [rate + (target - rate) * (k / (steps - 1) if steps > 1 else 0.0) for k in range(steps)]
        segments = tuple(
            Segment(k * width, duration_s if k == steps - 1 else (k + 1) * width, r, r)
            for k, r in enumerate(rates)
        )
    profile = RateProfile(name, segments)
    if profile.total == 0:
        raise ConfigError("loadgen.rate", f"{rate:g}/s for {duration_s:g} s schedules no transaction: "
                                          "give a rate and duration that make at least one")
    return profile


def scheduled_times(profile: RateProfile) -> np.ndarray:
    """Every transaction's scheduled offset in seconds (float64, ascending), vectorized per segment."""
    total = profile.total
    out = np.empty(total, dtype=np.float64)
    done = 0.0
    for seg in profile.segments:
        in_seg = seg.count(seg.length_s)
        lo = math.ceil(done - 1e-9)
        hi = min(math.floor(done + in_seg + 1e-9), total - 1)
        if hi >= lo:
            n = np.arange(lo, hi + 1, dtype=np.float64) - done
            slope = (seg.rate_to - seg.rate_from) / seg.length_s
            if abs(slope) < 1e-12:
                t = n / seg.rate_from
            else:
                t = (-seg.rate_from + np.sqrt(np.maximum(seg.rate_from**2 + 2.0 * slope * n, 0.0))) / slope
            out[lo:hi + 1] = seg.start_s + np.clip(t, 0.0, seg.length_s)
        done += in_seg
    return out
