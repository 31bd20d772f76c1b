"""The load generator's counts when the broker freezes (SIGSTOP) past the producer's request timeout.

A produce request already written to the socket when the broker froze times out in the client and
its batch fails, yet the broker appends it once it runs again (SIGCONT) and those transactions get
decisions. A failed send is therefore "not acknowledged", not "not delivered".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.kafka import create_topics
from fraudactors.settings import Settings
from loadgen.report import build_report, check_report
from loadgen.runner import LoadConfig, run_load
from loadgen.schedule import make_profile


class _OnProduceError(logging.Handler):
    """Sets ``event`` when aiokafka's sender logs a failed produce request."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "produce response" in record.getMessage():
            self.event.set()


async def test_broker_frozen_past_the_request_timeout_never_makes_lost_negative(settings: Settings, responder) -> None:
    async with EmbeddedBroker() as private:  # frozen below: not the session's broker
        settings = settings.replace(kafka={"bootstrap_servers": private.bootstrap_servers})
        await create_topics(settings)
        pid = private.pid
        assert pid is not None
        # The load generator's requests time out after 1 s; the responder keeps the defaults.
        load_settings = settings.replace(kafka={"request_timeout_ms": 1000})
        failed = asyncio.Event()
        handler = _OnProduceError(failed)
        sender_log = logging.getLogger("aiokafka.producer.sender")
        sender_log.addHandler(handler)
        frozen = False

        def freeze() -> None:
            nonlocal frozen
            os.kill(pid, signal.SIGSTOP)
            frozen = True

        async def thaw_after_a_failed_send() -> None:
            try:
                await asyncio.wait_for(failed.wait(), 30)
            finally:
                os.kill(pid, signal.SIGCONT)

        # The warm-up opens the producer's connection to the broker, so the freeze at the clock start
        # catches a produce request written to an open connection.
        config = LoadConfig(profile=make_profile("constant", 200, 2.0), drain_timeout_s=30, progress=False,
                            send_labels=False, warmup=20)
        try:
            async with responder(settings):
                thaw = asyncio.create_task(thaw_after_a_failed_send())
                try:
                    result = await run_load(load_settings, config, on_clock_start=freeze)
                finally:
                    thaw.cancel()
                    await asyncio.gather(thaw, return_exceptions=True)
                    os.kill(pid, signal.SIGCONT)
        finally:
            sender_log.removeHandler(handler)
    assert frozen and failed.is_set(), "the freeze made no send fail: this run tested nothing"
    report = build_report(result)
    check_report(report)
    assert report["lost"] >= 0, report
    assert report["send_errors"] > 0
    # Every transaction was handed to the producer exactly once: that is what "sent" counts, and
    # the drain waited for all of them, the unacknowledged ones included.
    assert report["sent"] == 400
    assert report["lost"] == report["sent"] - report["decided"]
