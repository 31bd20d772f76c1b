"""The A/B reporter: every ``ab.refresh_s`` it reads the ledger's window and sets the
``fraudactors_ab_*`` gauges, the figures of ``fraudactors ab report`` as metrics.

Every replica reads the same shared ledger, so every replica exports the same figures: dashboards
and alerts take ``max`` over replicas, never ``sum``. A read that fails leaves the last figures up
and is retried at the next refresh (the evidence is days deep: a missed refresh changes nothing).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fraudactors.ab.ledger import LedgerKeys, read_window
from fraudactors.ab.report import build_report
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

_GAUGES = ("ab_decisions", "ab_flagged_rate", "ab_frauds", "ab_detection_rate", "ab_detection_rate_ci",
           "ab_precision", "ab_label_maturity", "ab_p_value")


async def ledger_report(client: Any, settings: Settings) -> dict[str, Any]:
    """The A/B report of the ledger behind ``client`` (also what ``fraudactors ab report`` prints)."""
    ab = settings.ab
    window = await read_window(client, LedgerKeys(settings.redis.key_prefix), ab.bucket_s, ab.window_s)
    return build_report(window, window_s=ab.window_s, label_delay_s=ab.label_delay_s, alpha=ab.alpha,
                        power=ab.power, min_effect=ab.min_effect)


class ABReporter:
    """Supervised child: the ledger's window -> the ``fraudactors_ab_*`` gauges."""

    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._log = get_logger(actor="ab_reporter")
        self.refreshes = 0

    async def run(self, task_status: Any) -> None:
        from fraudactors.features.redis_client import CLIENT_ERRORS, make_client

        timeout = max(self._settings.redis.socket_timeout_ms / 1000.0, 1.0)
        client = make_client(self._settings, timeout, retry=True)
        errors: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, ConnectionError, OSError, TimeoutError)
        task_status.started()
        failing: str | None = None  # the error of the refreshes failing now
        try:
            while True:
                try:
                    self.publish(await ledger_report(client, self._settings))
                    self.refreshes += 1
                    failing = None
                except errors as exc:
                    # Evidence days deep: a missed refresh changes nothing, and a reporter that
                    # crashed on every cluster hiccup would spend the engine's restart budget.
                    self._log.debug("ab_refresh_failed", error=repr(exc))
                except Exception as exc:
                    # A report it cannot make (a bug, a ledger it cannot read) must not stop the
                    # engine: every replica reads the same ledger, so a crash here would restart
                    # all of them until the window moved on. The last figures stay up; the
                    # traceback is logged once per new error, not at every refresh.
                    if repr(exc) != failing:
                        self._log.exception("ab_report_failed")
                    failing = repr(exc)
                    self._metrics.ab_report_failures.inc()
                await asyncio.sleep(self._settings.ab.refresh_s)
        finally:
            await asyncio.shield(client.aclose())

    def publish(self, report: dict[str, Any]) -> None:
        m = self._metrics
        for name in _GAUGES:
            getattr(m, name).clear()  # models that left the window leave the metrics too
        for row in report["variants"]:
            labels = (row["variant"], row["model_version"], row["role"])
            m.ab_decisions.labels(*labels).set(row["decisions"])
            m.ab_frauds.labels(*labels, "caught").set(row["frauds_caught"])
            m.ab_frauds.labels(*labels, "missed").set(row["frauds_missed"])
            for gauge, key in ((m.ab_flagged_rate, "flagged_rate"), (m.ab_detection_rate, "detection_rate"),
                               (m.ab_precision, "precision"), (m.ab_label_maturity, "label_maturity")):
                if row[key] is not None:
                    gauge.labels(*labels).set(row[key])
            if row["detection_ci"] is not None:
                low, high = row["detection_ci"]
                m.ab_detection_rate_ci.labels(*labels, "low").set(low)
                m.ab_detection_rate_ci.labels(*labels, "high").set(high)
        for c in report["comparisons"]:
            if c["p_value"] is not None:
                m.ab_p_value.labels(c["challenger"], c["champion"], c["traffic"]).set(c["p_value"])
