"""The load generator when its broker goes away in the middle of a run (SIGKILL): one typed error
naming the broker, within a bounded time, instead of aiokafka's timeouts and a cancelled stop; and
when the broker is there but refuses the producer."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.kafka import create_topics
from fraudactors.settings import Settings
from loadgen.runner import LoadConfig, LoadgenError, run_load
from loadgen.schedule import make_profile


@pytest.mark.timeout(90)
async def test_broker_killed_mid_run_ends_in_one_error_naming_the_broker(settings: Settings) -> None:
    async with EmbeddedBroker() as private:  # killed below: not the session's broker
        settings = settings.replace(kafka={"bootstrap_servers": private.bootstrap_servers})
        await create_topics(settings)
        pid = private.pid
        assert pid is not None
        # Requests time out after 1 s, so the clients notice the loss quickly.
        load_settings = settings.replace(kafka={"request_timeout_ms": 1000})

        def kill() -> None:
            os.kill(pid, signal.SIGKILL)

        config = LoadConfig(profile=make_profile("constant", 200, 1.0), drain_timeout_s=2, progress=False,
                            send_labels=False)
        t0 = time.monotonic()
        with pytest.raises(LoadgenError, match=private.bootstrap_servers) as caught:
            await run_load(load_settings, config, on_clock_start=kill)
    assert "lost the Kafka broker" in str(caught.value)
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(90)
async def test_a_producer_the_broker_refuses_is_not_called_a_failed_connection(settings: Settings) -> None:
    """Tansu grants no producer id: an idempotent producer cannot start on it, though the broker is
    there. The error says so and names the setting, rather than "cannot connect"."""
    config = LoadConfig(profile=make_profile("constant", 10, 1.0), progress=False, send_labels=False)
    with pytest.raises(LoadgenError) as caught:
        await run_load(settings.replace(kafka={"enable_idempotence": True}), config)
    message = str(caught.value)
    assert "producer could not start" in message and "kafka.enable_idempotence = false" in message
    assert "cannot connect" not in message
