"""The run report: SPEC §5 JSON (plus extra keys), a Markdown summary and a terminal table."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadgen.runner import LoadgenError, RunResult

REPORT_KEYS = ("target_tps", "duration_s", "sent", "decided", "lost", "duplicates", "dlq", "achieved_tps",
               "latency_ms", "accuracy", "variants", "degraded")
LATENCY_KEYS = ("p50", "p95", "p99", "p999", "max")
ACCURACY_KEYS = ("detection_rate", "false_positive_rate", "auc")


def auc_score(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None without both classes."""
    truth = truth.astype(bool)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(truth: np.ndarray, flagged: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    truth = truth.astype(bool)
    flagged = flagged.astype(bool)
    pos = int(truth.sum())
    neg = int(truth.size - pos)
    tp = int((truth & flagged).sum())
    fp = int((~truth & flagged).sum())
    finite = np.isfinite(scores)
    auc = auc_score(truth[finite], scores[finite])
    return {
        "detection_rate": round(tp / pos, 6) if pos else 0.0,
        "false_positive_rate": round(fp / neg, 6) if neg else 0.0,
        "auc": round(auc, 6) if auc is not None else 0.0,
        # Extra keys: the counts behind the rates, so 0.0 with no positives reads as "undefined".
        "positives": pos,
        "negatives": neg,
        "true_positives": tp,
        "false_positives": fp,
        "auc_defined": auc is not None,
    }


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def build_report(result: RunResult) -> dict[str, Any]:
    c = result.collector
    m = c.matches
    profile = result.config.profile
    decided_mask = m.counts > 0
    decided = int(decided_mask.sum())
    h = c.histogram
    latency: dict[str, float | None]
    if h.get_total_count():
        latency = {k: _ms(h.get_value_at_percentile(p)) for k, p in
                   (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))}
        latency["max"] = _ms(h.get_max_value())
        latency["mean"] = _ms(h.get_mean_value())
        latency["min"] = _ms(h.get_min_value())
    else:
        # No decision, no latency: null, not a 0.0 that reads as instantaneous.
        latency = {k: None for k in LATENCY_KEYS}
    last_decision = float(np.nanmax(m.decided_at_s)) if decided else 0.0
    achieved = decided / last_decision if last_decision > 0 else 0.0
    send_window = result.send_end_s if result.send_end_s > 0 else profile.duration_s
    variants = {name: int((m.variant[decided_mask] == code).sum())
                for name, code in result.collector.variant_codes.items()}
    truth = result.is_fraud[decided_mask]
    acc = accuracy(truth, m.flagged[decided_mask], m.probability[decided_mask])
    by_variant = _by_variant(result, decided_mask)
    # Decisions made in degraded mode (feature store unreachable, scored by the variants' fallbacks),
    # measured apart: an outage should show its own detection and false-positive rate.
    degraded_mask = decided_mask & m.degraded
    degraded_acc = accuracy(result.is_fraud[degraded_mask], m.flagged[degraded_mask], m.probability[degraded_mask])
    target = profile.peak_rate if profile.name == "constant" else profile.mean_rate
    report: dict[str, Any] = {
        "target_tps": _num(target),
        "duration_s": _num(profile.duration_s),
        "sent": result.sent,
        "decided": decided,
        "lost": result.sent - decided,
        "duplicates": c.duplicates,
        "dlq": result.dlq,
        "achieved_tps": round(achieved, 1),
        "latency_ms": latency,
        "accuracy": acc,
        "variants": variants,
        "degraded": int(m.degraded[decided_mask].sum()),
        # --- extra keys (SPEC §5 allows additions) ---
        # The engine's own part of the latency: each decision's latency_ms (arrival at the
        # ingestor -> handed to the producer), without the broker, the batching waits and the
        # load generator around it.
        "engine_latency_ms": _percentiles(m.engine_ms[decided_mask]),
        "run_id": result.run_id,
        "started_at": result.started_at,
        "profile": {"name": profile.name, "rate_from": _num(profile.segments[0].rate_from),
                    "rate_to": _num(profile.segments[-1].rate_to), "steps": len(profile.segments),
                    "peak_tps": _num(profile.peak_rate), "mean_tps": round(profile.mean_rate, 1)},
        "send_tps": round(result.sent / send_window, 1) if send_window > 0 else 0.0,
        # Sent transactions the broker did not acknowledge (they may still have been delivered).
        "send_errors": result.send_errors,
        "label_send_errors": result.label_send_errors,
        "drained": result.drained,
        "drain_s": round(result.end_s - result.send_end_s, 3),
        "decision_records": c.records,
        "foreign_decisions": c.foreign,
        "malformed_decisions": c.malformed,
        "other_variants": dict(c.other_variants),
        "accuracy_by_variant": by_variant,
        "degraded_accuracy": {**degraded_acc, "by_variant": _by_variant(result, degraded_mask)},
        "fraud_sent": int(result.is_fraud.sum()),
        "fraud_by_scenario": _scenario_counts(result),
        "labels_sent": result.labels_sent,
        "source": result.source_name,
        "warmup": result.warmup,
        "topics": dict(result.topics),
    }
    return report


def _by_variant(result: RunResult, mask: np.ndarray) -> dict[str, dict[str, Any]]:
    m = result.collector.matches
    return {name: accuracy(result.is_fraud[mask & (m.variant == code)], m.flagged[mask & (m.variant == code)],
                           m.probability[mask & (m.variant == code)])
            for name, code in result.collector.variant_codes.items()}


def _percentiles(values_ms: np.ndarray) -> dict[str, float]:
    values = values_ms[np.isfinite(values_ms)]
    if not len(values):
        return {}
    q = np.percentile(values, [50.0, 95.0, 99.0, 99.9])
    return {"p50": round(float(q[0]), 3), "p95": round(float(q[1]), 3), "p99": round(float(q[2]), 3),
            "p999": round(float(q[3]), 3), "max": round(float(values.max()), 3),
            "mean": round(float(values.mean()), 3)}


def _scenario_counts(result: RunResult) -> dict[str, dict[str, int]]:
    """Per fraud scenario: how many were sent and how many the engine flagged."""
    m = result.collector.matches
    out: dict[str, dict[str, int]] = {}
    for i, scenario in enumerate(result.scenarios):
        if result.is_fraud[i]:
            row = out.setdefault(scenario, {"sent": 0, "flagged": 0})
            row["sent"] += 1
            row["flagged"] += int(m.flagged[i])
    return out


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 3)


def check_report(report: dict[str, Any]) -> None:
    """Raise ValueError unless ``report`` has every SPEC §5 key with the right shape and arithmetic
    (its latencies are null only in a run that decided nothing)."""
    for key in REPORT_KEYS:
        if key not in report:
            raise ValueError(f"report misses {key!r}")
    for key in ACCURACY_KEYS:
        value = report["accuracy"].get(key)
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"report accuracy.{key} must be in [0, 1], got {value!r}")
    for key in ("A", "B"):
        if not isinstance(report["variants"].get(key), int):
            raise ValueError(f"report variants misses {key!r}")
    if report["lost"] != report["sent"] - report["decided"]:
        raise ValueError("report lost != sent - decided")
    if report["lost"] < 0:
        raise ValueError(f"report lost is negative ({report['lost']}): more transactions decided than sent")
    for key in LATENCY_KEYS:
        value = report["latency_ms"].get(key, ...)
        if not isinstance(value, int | float) and not (value is None and report["decided"] == 0):
            raise ValueError(f"report latency_ms misses {key!r} (null only when nothing was decided)")


def lost_line(report: dict[str, Any]) -> str:
    """One line on the transactions without a decision, for the exit message of a run that lost some."""
    line = f"{report['lost']:,} of {report['sent']:,} transactions got no decision within the drain timeout"
    if report.get("send_errors"):
        line += f" ({report['send_errors']:,} of the sends were not acknowledged by the broker)"
    return line


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    lat = report["latency_ms"]
    acc = report["accuracy"]
    var = report["variants"]
    return [
        ("target TPS", f"{report['target_tps']:,}"),
        ("duration", f"{report['duration_s']} s"),
        ("sent", f"{report['sent']:,}"),
        ("decided", f"{report['decided']:,}"),
        ("lost", f"{report['lost']:,}"),
        ("duplicates", f"{report['duplicates']:,}"),
        ("DLQ", f"{report['dlq']:,}"),
        ("achieved TPS", f"{report['achieved_tps']:,.1f}"),
        ("latency p50 / p95 / p99", f"{_ms_text(lat['p50'])} / {_ms_text(lat['p95'])} / {_ms_text(lat['p99'])} ms"),
        ("latency p99.9 / max", f"{_ms_text(lat['p999'])} / {_ms_text(lat['max'])} ms"),
        *_engine_row(report),
        ("detection rate", f"{acc['detection_rate']:.3f}"),
        ("false positive rate", f"{acc['false_positive_rate']:.4f}"),
        ("AUC", f"{acc['auc']:.3f}"),
        (f"variants {' / '.join(var)}", " / ".join(f"{count:,}" for count in var.values())),
        ("degraded", f"{report['degraded']:,}"),
        *_degraded_row(report),
    ]


def _ms_text(value: float | None) -> str:
    """A latency for the table: one decimal, or "-" for none (nothing was decided)."""
    return "-" if value is None else f"{value:.1f}"


def _degraded_row(report: dict[str, Any]) -> list[tuple[str, str]]:
    acc = report.get("degraded_accuracy") or {}
    if not report["degraded"] or not acc:
        return []
    return [("degraded: detection / FPR", f"{acc['detection_rate']:.3f} / {acc['false_positive_rate']:.4f}")]


def _engine_row(report: dict[str, Any]) -> list[tuple[str, str]]:
    eng = report.get("engine_latency_ms") or {}
    if not eng:
        return []
    return [("engine latency p50 / p99", f"{eng['p50']:.1f} / {eng['p99']:.1f} ms")]


def format_table(report: dict[str, Any]) -> str:
    rows = summary_rows(report)
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = f"+{'-' * (width + 2)}+{'-' * (vwidth + 2)}+"
    out = [line] + [f"| {k.ljust(width)} | {v.rjust(vwidth)} |" for k, v in rows] + [line]
    return "\n".join(out)


def render_markdown(report: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    rows = summary_rows(report)
    profile = report.get("profile", {})
    lines = [
        f"# Load report {report.get('run_id', '')}".rstrip(),
        "",
        f"Started {report.get('started_at', '?')}, profile `{profile.get('name', 'constant')}` "
        f"({profile.get('rate_from', report['target_tps'])} -> {profile.get('rate_to', report['target_tps'])} TPS), "
        f"source `{report.get('source', '?')}`. Latency is end to end, from each transaction's "
        "*scheduled* send time to reading its decision (open loop, no coordinated omission).",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Drained: {'yes' if report.get('drained') else 'no'} "
              f"(drain took {report.get('drain_s', 0)} s); send rate achieved {report.get('send_tps', 0):,} TPS."]
    by_variant = report.get("accuracy_by_variant") or {}
    if by_variant:
        lines += ["", "| variant | decided | detection rate | false positive rate | AUC |", "|---|---:|---:|---:|---:|"]
        for name, acc in by_variant.items():
            n = acc["positives"] + acc["negatives"]
            lines.append(f"| {name} | {n:,} | {acc['detection_rate']:.3f} | {acc['false_positive_rate']:.4f} | "
                         f"{acc['auc']:.3f} |")
    degraded = report.get("degraded_accuracy") or {}
    if report["degraded"] and degraded:
        lines += ["", "Degraded decisions (feature store unreachable; scored by each variant's fallback model, "
                  "`decision.degraded_policy`):", "",
                  "| variant | degraded decisions | detection rate | false positive rate |", "|---|---:|---:|---:|"]
        for name, acc in [*degraded.get("by_variant", {}).items(), ("all", degraded)]:
            n = acc["positives"] + acc["negatives"]
            if n:
                lines.append(f"| {name} | {n:,} | {acc['detection_rate']:.3f} | {acc['false_positive_rate']:.4f} |")
    if charts:
        lines += [""]
        for title, name in charts.items():
            lines += [f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"



CHART_KINDS = ("latency", "throughput", "distribution")


def report_files(path: str | Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """Every file a run writes for the report ``path``: the JSON, the Markdown (``.md``), the charts
    (``<stem>-latency.png`` ...) and one ``<stem><suffix>`` per ``extra`` suffix (the demo's
    ``-engine.log``)."""
    path = Path(path)
    stem = path.with_suffix("")
    return [path, path.with_suffix(".md"), *(Path(f"{stem}-{kind}.png") for kind in CHART_KINDS),
            *(Path(f"{stem}{suffix}") for suffix in extra)]


def ensure_report_dir(path: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Create the directory ``path`` goes in and check the report's files can be written there (see
    :func:`report_files`), before a run rather than after it: a bad ``--report`` fails fast with one
    clear line (``LoadgenError``), not a traceback at the end. Writable means a file can be created
    there, tried for real: ``os.access`` says yes to root even where nothing can be written (/proc)."""
    if Path(path).is_dir():
        raise LoadgenError(f"the report {str(path)!r} is a directory: give a file name (its .md and charts go beside it)")
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoadgenError(f"cannot create the report directory {str(parent)!r}: {exc.strerror or exc}") from exc
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise LoadgenError(f"no file can be created in the report directory {str(parent)!r}: "
                           f"{exc.strerror or exc}") from exc
    for file in report_files(path, extra):
        if file.is_dir():
            raise LoadgenError(f"the report's {file.name!r} cannot be written: {str(file)!r} is a directory")
        if file.is_symlink() or (file.exists() and not file.is_file()):
            # a device, a FIFO, a link: not something a report run may replace (or remove first)
            raise LoadgenError(f"the report's {file.name!r} cannot be written: {str(file)!r} is not a regular file")


def remove_old_report(path: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Remove the files an earlier run left at ``path`` (only those this run writes, see
    :func:`report_files`), so a run that ends without a report leaves none that looks current.
    Regular files only (``ensure_report_dir`` refuses anything else at those paths)."""
    for file in report_files(path, extra):
        if file.is_symlink() or not file.is_file():
            continue
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            raise LoadgenError(f"cannot remove the earlier report file {str(file)!r}: {exc.strerror or exc}") from exc


def write_outputs(result: RunResult, path: str | Path) -> dict[str, Any]:
    """Build the report and write its files (:func:`write_report_files`). Returns the report."""
    report = build_report(result)
    write_report_files(result, report, path)
    return report


def write_report_files(result: RunResult, report: dict[str, Any], path: str | Path) -> None:
    """Write the report JSON at ``path``, the Markdown at ``path`` with ``.md``, and the PNG charts
    next to it (``<stem>-latency.png``, ``-throughput.png``, ``-distribution.png``); adds their
    names to ``report`` (``charts``, ``markdown``). A file that cannot be written is a
    ``LoadgenError`` naming it."""
    from loadgen.charts import write_charts

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        charts = write_charts(result, path)
        report["charts"] = [str(path.parent / name) for name in charts.values()]
        report["markdown"] = str(path.with_suffix(".md"))
        write_json(report, path)
        path.with_suffix(".md").write_text(render_markdown(report, charts), encoding="utf-8")
    except OSError as exc:
        raise write_error(exc) from exc


def write_error(exc: OSError) -> LoadgenError:
    """The one line for a report file that could not be written."""
    return LoadgenError(f"cannot write the report: {exc}")
