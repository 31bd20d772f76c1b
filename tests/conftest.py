"""Shared fixtures: one real broker and one real Redis per test session, private names per test.

- ``broker`` (session): embedded Tansu; ``broker.bootstrap_servers`` -> "127.0.0.1:PORT".
- ``redis_server`` (session): embedded valkey/redis; ``redis_server.url`` -> "redis://127.0.0.1:PORT/0".
- ``settings`` (function): Settings pointing at both, with unique topic names, kafka.group_id and
  redis.key_prefix, ``enable_idempotence=False``, ``http.port=0``, ``session_timeout_ms=3000`` and
  ``heartbeat_interval_ms=500`` (faster group joins on Tansu); the four topics exist with
  ``topics.partitions`` partitions (deleted again after the test). Need a variation? Use
  ``settings.replace(engine={...})``; topics made with another partition count:
  ``await create_topics(s)`` yourself.
- ``fresh_redis`` (function): a private Redis server for fault tests. ``fresh_redis.url``,
  ``fresh_redis.stop()`` and ``fresh_redis.start()`` (same port). Both block until done, so they
  work from sync tests, and may also be awaited (``await fresh_redis.stop()``) from async ones.
  Point settings at it with ``settings.replace(redis={"url": fresh_redis.url})``.
- ``run_sync(coro)``: run a coroutine to completion in a helper thread (for sync fixtures).
- ``models_dir`` (session): the committed ``models/``, loaded as the engine loads them; a test that
  needs them fails with the reason when they do not load (nothing is trained in their place).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import functools
import inspect
import os
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from committed_models import committed_models

from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.kafka import create_topics, delete_topics, topic_names
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.services.redis_cluster import EmbeddedRedisCluster
from fraudactors.settings import Settings, load_settings

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop on a helper thread (safe whether or not a loop runs here)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conftest") as pool:
        return pool.submit(asyncio.run, coro).result(timeout=timeout_s)


# A stuck test must fail with the place it waited, clean up after itself and leave the run going.
# Three layers, innermost first:
# 1. An async test runs under an asyncio deadline that ends before pytest-timeout's: it is
#    cancelled inside its loop, so its ``finally`` blocks run (engines stopped, topics deleted), and
#    the failure's traceback shows the await it was stuck on.
# 2. pytest-timeout (signal method) fails a sync test, or an async one stuck outside an await. Its
#    exception lands wherever the main thread is, which may be inside the event loop: the test's
#    cleanup then never runs, and what it started (engines, process pools) is abandoned.
# 3. A watchdog thread ends the worker when a test (setup, call and teardown) or the interpreter's
#    exit outlives every limit: a wait that never returns to Python bytecode, or a teardown stuck
#    on what layer 2 abandoned. It dumps every thread's stack to stderr first; xdist reports the
#    test as crashed and carries on with a new worker. Without it, one hang stalls the whole run
#    until CI's own limit, with no word of where.
TEARDOWN_RESERVE_S = 15.0  # of the test's timeout, kept for its teardown after layer 1 fires
WATCHDOG_GRACE_S = 180.0  # layer 3 fires this long after the test's timeout
EXIT_GRACE_S = 120.0  # and this long after the session ended, if the process has not exited
_started_at = pytest.StashKey[float]()  # when the test's setup began


def _timeout_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    given = item.config.getoption("timeout", None)  # pytest-timeout's --timeout, over the ini value
    return float(given if given is not None else item.config.getini("timeout") or 0)


def _dump_and_exit(config: pytest.Config, reason: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)  # to the real stderr: the captured one dies with us
    sys.stderr.write(f"\n{reason}: every thread's stack, then this process exits\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(70)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    limit = _timeout_s(item) + WATCHDOG_GRACE_S
    item.stash[_started_at] = time.monotonic()
    watchdog = threading.Timer(limit, _dump_and_exit,
                               (item.config, f"{item.nodeid} still running after {limit:.0f} s"))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    test = getattr(item, "obj", None)
    timeout = _timeout_s(item)
    if not (isinstance(item, pytest.Function) and inspect.iscoroutinefunction(test) and timeout > 0):
        yield
        return
    used = time.monotonic() - item.stash.get(_started_at, time.monotonic())
    budget = timeout - used - TEARDOWN_RESERVE_S
    if budget <= 0:
        yield
        return

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(budget)
        try:
            async with deadline:
                return await test(*args, **kwargs)
        except TimeoutError as e:
            if deadline.expired():
                raise pytest.fail.Exception(
                    f"still running {budget:.0f} s into its call ({timeout:.0f} s timeout, {used:.0f} s of "
                    f"setup): cancelled; the traceback above ends where it waited") from e
            raise

    item.obj = bounded
    try:
        yield
    finally:
        item.obj = test


def pytest_unconfigure(config: pytest.Config) -> None:
    watchdog = threading.Timer(EXIT_GRACE_S, _dump_and_exit, (
        config, f"the test process has not exited {EXIT_GRACE_S:.0f} s after its session ended"))
    watchdog.daemon = True
    watchdog.start()


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A command run in-process (``cli.main``) configures logging onto this test's captured
    stdout, which pytest closes afterwards, and may quiet loggers: restore the configuration, or
    every later test that logs would write into a closed file (or miss what it listens for)."""
    import logging

    import structlog

    saved = structlog.get_config()
    handlers, level = logging.root.handlers[:], logging.root.level
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}  # e.g. a command that quiets aiokafka
    yield
    structlog.configure(**saved)
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    service = EmbeddedBroker()
    service.start_sync()
    try:
        yield service
    finally:
        service.stop_sync()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    service = EmbeddedRedis()
    service.start_sync()
    try:
        yield service
    finally:
        service.stop_sync()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return committed_models()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    """A real 3-master Redis Cluster (cluster-enabled Valkey, slots assigned from Python)."""
    cluster = EmbeddedRedisCluster(3).start_sync()
    try:
        yield cluster
    finally:
        cluster.stop_sync()


def make_test_settings(bootstrap_servers: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings for one test: unique names, embedded services, environment ignored."""
    suffix = uuid.uuid4().hex[:12]
    data: dict[str, Any] = {
        # Tansu holds a group's first JoinGroup for about session_timeout_ms / 2 (at least 1 s):
        # 3 s keeps joins and rebalances near 1.5 s instead of 5 s (docs/tansu.md).
        "kafka": {"bootstrap_servers": bootstrap_servers, "group_id": f"fa-test-{suffix}",
                  "client_id": f"fa-test-{suffix}", "enable_idempotence": False,
                  "session_timeout_ms": 3000, "heartbeat_interval_ms": 500},
        "topics": {"transactions": f"transactions-{suffix}", "predictions": f"predictions-{suffix}",
                   "labels": f"labels-{suffix}", "dlq": f"transactions.dlq-{suffix}",
                   "control": f"control-{suffix}"},
        "redis": {"url": redis_url, "key_prefix": f"fa-test-{suffix}:"},
        "http": {"port": 0},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return load_settings(env={}, overrides=data)


@pytest.fixture
def settings(broker: EmbeddedBroker, redis_server: EmbeddedRedis) -> Iterator[Settings]:
    value = make_test_settings(broker.bootstrap_servers, redis_server.url)
    run_sync(create_topics(value))
    yield value
    if broker.running:
        try:
            run_sync(delete_topics(value, [*topic_names(value), value.topics.control]), timeout_s=15.0)
        except Exception:  # best effort: a broken broker fails the next test loudly anyway
            pass


class _Done:
    """An already-finished awaitable, so a blocking call may also be written with ``await``."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


class FreshRedis:
    """A private Redis server on a fixed port that a test may stop and start again."""

    def __init__(self) -> None:
        # Once started, an embedded service restarts on the same port: the URL stays valid.
        self._service = EmbeddedRedis(stop_grace_s=2.0)
        self._service.start_sync()
        self.port = self._service.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._service.pid

    @property
    def running(self) -> bool:
        return self._service.running

    def stop(self) -> _Done:
        self._service.stop_sync()
        return _Done()

    def start(self) -> _Done:
        if not self._service.running:
            self._service.start_sync()
        return _Done()


@pytest.fixture
def fresh_redis() -> Iterator[FreshRedis]:
    server = FreshRedis()
    try:
        yield server
    finally:
        server.stop()
