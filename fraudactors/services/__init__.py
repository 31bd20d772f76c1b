"""Embedded services (Tansu broker, Valkey/Redis server) as child processes, and Kafka helpers."""

from fraudactors.services.binaries import resolve_redis, resolve_tansu
from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.process import stop_all
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.services.stack import EmbeddedStack

__all__ = ["EmbeddedBroker", "EmbeddedRedis", "EmbeddedStack", "resolve_redis", "resolve_tansu", "stop_all"]
