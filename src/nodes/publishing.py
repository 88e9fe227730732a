"""Publishing as the runners need it: the port they publish through, which broker errors are
final, and dead letters that are retried until the broker has them.

A *final* error is one that the same record will meet again however often it is sent (it is
too large, or its topic name is invalid): retrying it would freeze the partition's commit
point for good, so the caller dead-letters the record instead. Every other broker error is
transient and retried, with a per-record backoff, until the node is told to stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog
from aiokafka import ConsumerRecord
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from stampflow.contracts.nodes import RetryPolicy
from stampflow.nodes.deadletter import (
    DEFAULT_MAX_MESSAGE_BYTES,
    dead_letter,
    dead_letter_key,
    dlq_topic,
)
from stampflow.nodes.metrics import DLQ_RECORDS, RETRIES
from stampflow.nodes.resilience import Stopping, retry

log = structlog.get_logger("stampflow.publishing")

__all__ = ["FINAL_PUBLISH_ERRORS", "DeadLetters", "EventPublisher", "Stopping"]

FINAL_PUBLISH_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
)


class EventPublisher(Protocol):
    """Where a node's records go. Both calls return once the broker has every record, and
    raise :class:`aiokafka.errors.KafkaError` otherwise."""

    async def send(self, topic: str, value: bytes, key: bytes | None) -> None: ...

    async def send_many(self, topic: str, messages: list[tuple[bytes, bytes]]) -> None: ...


class DeadLetters:
    """Sends unusable records to ``<topic>.dlq``, bounded in size, until the broker has them."""

    def __init__(self, publisher: EventPublisher, *, node: str, retry: RetryPolicy,
                 stop: asyncio.Event, clock: Callable[[], datetime],
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.publisher = publisher
        self.node = node
        self.retry = retry
        self.stop = stop
        self.clock = clock
        self.max_message_bytes = max_message_bytes

    async def send(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        """Returns once the letter is acknowledged; raises :class:`Stopping` if the node stops
        first. A final error for the letter itself (it is bounded, so only a misconfigured
        dead-letter topic) is retried like a transient one: the record is never dropped."""
        dlq = dlq_topic(record.topic)
        doc = dead_letter(topic=record.topic, partition=record.partition, offset=record.offset,
                          key=record.key, value=record.value, error=reason, node=self.node,
                          at=self.clock(), max_bytes=self.max_message_bytes)

        def retrying(attempt: int, err: BaseException, wait: float) -> None:
            RETRIES.labels("broker").inc()
            log.warning("dead-letter publish failed; retrying", dlq=dlq,
                        error=str(err) or type(err).__name__, wait_s=round(wait, 3),
                        throttle=True)

        await retry(lambda: self.publisher.send(dlq, doc, dead_letter_key(record.key) or None),
                    policy=self.retry, transient=(KafkaError,), stop=self.stop, forever=True,
                    on_retry=retrying)
        DLQ_RECORDS.labels(record.topic).inc()
        log.warning("record sent to dead-letter topic", dlq=dlq, partition=record.partition,
                    offset=record.offset, size=len(record.value or b""), error=reason)
