"""Kafka wiring shared by every node: topics, producers and consumers.

Correctness never depends on Kafka transactions or the idempotent producer (the embedded
broker supports neither); they stay off unless a caller asks for them on a real Kafka.
Consumers always start from committed offsets, falling back to the earliest, never "latest".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stampflow.errors import ServiceUnavailable

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 500


async def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    """Create the topics that are missing. Safe when several nodes do it at once."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        try:
            await admin.start()
            existing = set(await admin.list_topics())
        except (TimeoutError, KafkaConnectionError, OSError) as err:
            raise ServiceUnavailable("Kafka broker", bootstrap, str(err) or type(err).__name__
                                     ) from None
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        for topic in missing:
            try:
                await admin.create_topics([NewTopic(topic, partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def make_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 2,
        "enable_idempotence": False,
        "request_timeout_ms": 15_000,
        "max_batch_size": 256 * 1024,
    }
    config.update(overrides)
    return AIOKafkaProducer(**config)


def make_consumer(bootstrap: str, topics: Sequence[str], group_id: str,
                  **overrides: Any) -> AIOKafkaConsumer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "max_poll_interval_ms": 300_000,
        "isolation_level": "read_uncommitted",
        "fetch_max_wait_ms": 100,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    config.update(overrides)
    return AIOKafkaConsumer(*topics, **config)


__all__ = ["KafkaError", "ensure_topics", "make_consumer", "make_producer"]
