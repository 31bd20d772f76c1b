"""PNG charts of a run (matplotlib, Agg backend): latency over time, throughput, latency distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loadgen.runner import RunResult


def per_second(result: RunResult) -> dict[str, np.ndarray]:
    """Per-second series on the run clock: sent, decided (first decisions), latency p50/p99/max."""
    m = result.collector.matches
    end = max(result.end_s, result.config.profile.duration_s)
    n = int(np.ceil(end)) + 1
    seconds = np.arange(n)
    sent_t = result.sent_at_s[np.isfinite(result.sent_at_s)]
    sent = np.bincount(np.clip(sent_t.astype(np.int64), 0, n - 1), minlength=n)
    done = np.isfinite(m.decided_at_s)
    dec_sec = np.clip(m.decided_at_s[done].astype(np.int64), 0, n - 1)
    lat = m.latency_ms[done]
    decided = np.bincount(dec_sec, minlength=n)
    p50 = np.full(n, np.nan)
    p99 = np.full(n, np.nan)
    mx = np.full(n, np.nan)
    if lat.size:
        order = np.argsort(dec_sec, kind="stable")
        sec_sorted, lat_sorted = dec_sec[order], lat[order]
        bounds = np.searchsorted(sec_sorted, seconds, side="left")
        bounds = np.append(bounds, sec_sorted.size)
        for s in range(n):
            chunk = lat_sorted[bounds[s]:bounds[s + 1]]
            if chunk.size:
                p50[s], p99[s] = np.percentile(chunk, [50, 99])
                mx[s] = chunk.max()
    return {"second": seconds, "sent": sent, "decided": decided, "p50": p50, "p99": p99, "max": mx}


def write_charts(result: RunResult, base: Path) -> dict[str, str]:
    """Write three PNGs next to ``base`` (``<stem>-latency.png`` ...); returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = per_second(result)
    stem = base.with_suffix("")
    out: dict[str, str] = {}
    x = series["second"]

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(x, series["p50"], label="p50")
    ax.plot(x, series["p99"], label="p99")
    ax.plot(x, series["max"], label="max", alpha=0.5)
    ax.set_xlabel("run time (s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency per second (from scheduled send to decision read)")
    if np.isfinite(series["max"]).any() and np.nanmax(series["max"]) > 20 * max(np.nanmedian(series["p50"]), 1e-3):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out["Latency percentiles over time"] = _save(plt, fig, stem, "latency")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(x, series["sent"], label="sent / s", drawstyle="steps-post")
    ax.plot(x, series["decided"], label="decided / s", drawstyle="steps-post")
    rates = [result.config.profile.rate_at(float(t) + 0.5) for t in x]
    ax.plot(x, rates, label="target / s", linestyle="--", alpha=0.6, drawstyle="steps-post")
    ax.set_xlabel("run time (s)")
    ax.set_ylabel("transactions per second")
    ax.set_title("Throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out["Throughput over time"] = _save(plt, fig, stem, "throughput")

    m = result.collector.matches
    lat = m.latency_ms[np.isfinite(m.latency_ms)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if lat.size:
        lo, hi = max(float(lat.min()), 0.01), max(float(lat.max()), 0.02)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 60).tolist()
        ax.hist(lat, bins=bins)
        ax.set_xscale("log")
        for q, style in ((50, ":"), (99, "--"), (99.9, "-.")):
            v = float(np.percentile(lat, q))
            ax.axvline(v, linestyle=style, color="black", alpha=0.7, label=f"p{q:g} {v:.1f} ms")
        ax.legend()
    ax.set_xlabel("end-to-end latency (ms, log scale)")
    ax.set_ylabel("decisions")
    ax.set_title("Latency distribution")
    out["Latency distribution"] = _save(plt, fig, stem, "distribution")
    return out


def _save(plt: Any, fig: Any, stem: str | Path, kind: str) -> str:
    """Write ``<stem>-<kind>.png``, close the figure, return the file's name."""
    path = Path(f"{stem}-{kind}.png")
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path.name
