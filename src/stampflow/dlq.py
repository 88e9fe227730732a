"""Dead-letter topics for operators: list the poison messages, re-drive them after a fix."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from nodes.deadletter import dlq_topic, parse_dead_letter
from stampflow.bus import make_consumer, make_producer


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dlq_offset: int
    dlq_partition: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    error: str
    failed_at: str
    node: str


async def read_dead_letters(bootstrap: str, topic: str, *, idle_s: float = 1.5,
                            limit: int = 10_000) -> list[DeadLetter]:
    """Every record of ``<topic>.dlq``, oldest first, without committing anything.

    The embedded broker's end offsets are unreliable, so reading stops after ``idle_s``
    seconds without a new record.
    """
    consumer = make_consumer(bootstrap, [dlq_topic(topic)], f"dlq-reader-{uuid.uuid4().hex}")
    await consumer.start()
    out: list[DeadLetter] = []
    try:
        quiet_since = time.monotonic()
        while len(out) < limit and time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    out.append(_parse(r.partition, r.offset, r.value or b""))
                    quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return sorted(out, key=lambda d: (d.dlq_partition, d.dlq_offset))[:limit]


def _parse(partition: int, offset: int, raw: bytes) -> DeadLetter:
    try:
        doc: dict[str, Any] = parse_dead_letter(raw)
        return DeadLetter(offset, partition, str(doc["topic"]), int(doc["partition"]),
                          int(doc["offset"]), doc.get("key"), doc["value"],
                          str(doc.get("error", "")), str(doc.get("failed_at", "")),
                          str(doc.get("node", "")))
    except (ValueError, KeyError, TypeError) as err:
        return DeadLetter(offset, partition, "?", -1, -1, None, raw,
                          f"unreadable dead-letter record: {err}", "", "")


async def replay(bootstrap: str, letters: list[DeadLetter]) -> int:
    """Publish each letter's original bytes to its original topic, with its original key."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        sent = [await producer.send(d.topic, value=d.value, key=d.key)
                for d in letters if d.topic != "?"]
        for delivery in sent:
            await delivery
        return len(sent)
    finally:
        await producer.stop()
