"""aiokafka clients and topics, built from :class:`Settings` (never from loose keyword arguments).

``make_producer`` / ``make_consumer`` map the ``[kafka]`` section onto aiokafka; keyword
``overrides`` win (e.g. ``group_id=None`` for an assign-only reader). Consumers never auto-commit:
the engine commits what it has finished. Every client the engine and the load generator build
(these, ``make_admin`` and the publisher's producer) takes its TLS/SASL arguments from
:func:`security_config`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from fraudactors.errors import ConfigError, ServiceError
from fraudactors.redact import redact_url
from fraudactors.settings import KafkaSettings, Settings


def topic_names(settings: Settings) -> tuple[str, str, str, str]:
    t = settings.topics
    return (t.transactions, t.predictions, t.labels, t.dlq)


def _acks(value: str) -> int | str:
    return "all" if value == "all" else int(value)


def security_config(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for ``kafka.security_protocol`` and its SASL / TLS settings.

    SSL and SASL_SSL get an ``ssl_context`` that verifies the broker's certificate and host name
    (against ``kafka.ssl_cafile``, else the system's CAs) and presents ``kafka.ssl_certfile`` when
    set. A TLS file that cannot be read is a :class:`ConfigError` naming its key.
    """
    k = settings.kafka
    config: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_context"] = _ssl_context(k)
    if k.security_protocol.startswith("SASL_"):
        # aiokafka takes the user name and password of SCRAM from the sasl_plain_* arguments too.
        config.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                      sasl_plain_password=k.sasl_password)
    return config


def _ssl_context(k: KafkaSettings) -> ssl.SSLContext:
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(k, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"kafka.{key}", f"cannot read {path}")
    try:
        context = create_ssl_context(cafile=k.ssl_cafile or None)
    except ssl.SSLError as exc:
        raise ConfigError("kafka.ssl_cafile", f"no usable PEM CA certificate in {k.ssl_cafile}: {exc}") from None
    if k.ssl_certfile:
        try:
            # An encrypted key is refused rather than prompted for on a terminal.
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile or None, password=lambda: b"")
        except ssl.SSLError as exc:
            raise ConfigError("kafka.ssl_certfile", "no usable PEM certificate and matching key in "
                              f"{k.ssl_certfile}{' + ' + k.ssl_keyfile if k.ssl_keyfile else ''}: {exc}") from None
    return context


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    k = settings.kafka
    config: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "acks": _acks(k.acks),
        "linger_ms": k.linger_ms,
        "max_batch_size": k.max_batch_size,
        "enable_idempotence": k.enable_idempotence,
        "request_timeout_ms": k.request_timeout_ms,
        **security_config(settings),
    }
    config.update(overrides)
    return config


def consumer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    k = settings.kafka
    config: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "group_id": k.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": k.auto_offset_reset,
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "max_poll_records": k.fetch_max_records,
        "fetch_max_wait_ms": k.fetch_max_wait_ms,
        "request_timeout_ms": max(k.request_timeout_ms, k.session_timeout_ms + 5000),
        **security_config(settings),
    }
    if k.group_instance_id:
        config["group_instance_id"] = k.group_instance_id
    config.update(overrides)
    return config


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An unstarted producer; the caller ``await``s ``start()`` and ``stop()``."""
    return AIOKafkaProducer(**producer_config(settings, **overrides))


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An unstarted consumer subscribed to ``topics`` (none: the caller assigns or subscribes)."""
    return AIOKafkaConsumer(*topics, **consumer_config(settings, **overrides))


def make_admin(settings: Settings, bootstrap_servers: str | None = None) -> AIOKafkaAdminClient:
    k = settings.kafka
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers or k.bootstrap_servers,
                               client_id=f"{k.client_id}-admin", request_timeout_ms=k.request_timeout_ms,
                               **security_config(settings))


async def create_topics(settings: Settings, bootstrap_servers: str | None = None,
                        names: Sequence[str] | None = None) -> list[str]:
    """Create the four topics (``settings.topics.partitions`` each); existing ones are left alone.

    Returns the names that were newly created.
    """
    t = settings.topics
    wanted = list(names) if names is not None else list(topic_names(settings))
    admin = make_admin(settings, bootstrap_servers)
    try:
        await admin.start()
    except Exception as exc:
        where = redact_url(bootstrap_servers or settings.kafka.bootstrap_servers)
        raise ServiceError(f"cannot reach Kafka at {where} to create topics: {redact_url(repr(exc))}") from exc
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            response = await admin.create_topics([
                NewTopic(name, num_partitions=t.partitions, replication_factor=t.replication_factor)
                for name in missing])
            for name, code, *message in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:  # another replica got there first: fine
                    detail = message[0] if message and message[0] else f"error code {code}"
                    raise ServiceError(f"cannot create topic {name!r}: {detail}")
    finally:
        await admin.close()
    return created


async def delete_topics(settings: Settings, names: Sequence[str] | None = None,
                        bootstrap_servers: str | None = None) -> None:
    admin = make_admin(settings, bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics(list(names) if names is not None else list(topic_names(settings)))
    finally:
        await admin.close()
