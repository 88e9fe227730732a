"""Dead-letter topics for operators: list the poison messages, re-drive them after a fix.

A replay publishes to the topic the operator names, never to one named inside the letter (a
dead letter's fields are whatever its writer put there), and records each letter it replayed
in ``dlq_replays``: a letter is replayed once, so letters that still fail and come back as new
dead letters are not sent again with them (``force`` does).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from stampflow.bus import make_consumer, make_producer
from stampflow.connections import KafkaOptions
from stampflow.errors import StampflowError
from stampflow.nodes.deadletter import dlq_topic, parse_dead_letter
from stampflow.queries import connect
from stampflow.services import database_address


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
                            limit: int = 10_000,
                            kafka: KafkaOptions | None = None) -> list[DeadLetter]:
    """Every record of ``<topic>.dlq``, oldest first, without committing anything.

    The embedded broker's end offsets are unreliable, so reading stops after ``idle_s``
    seconds without a new record.
    """
    consumer = make_consumer(bootstrap, [dlq_topic(topic)], f"dlq-reader-{uuid.uuid4().hex}",
                             kafka=kafka)
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


@dataclass(frozen=True, slots=True)
class Skipped:
    letter: DeadLetter
    reason: str


@dataclass(slots=True)
class Replayed:
    sent: list[DeadLetter] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


_CLAIM = """
INSERT INTO dlq_replays (dlq_topic, partition, "offset", replayed_to)
SELECT $1, p, o, $2 FROM unnest($3::integer[], $4::bigint[]) AS t(p, o)
ON CONFLICT (dlq_topic, partition, "offset") DO {}
RETURNING partition, "offset"
"""
_AGAIN = ("UPDATE SET replayed_to = EXCLUDED.replayed_to, replayed_at = now(), "
          "by_role = current_user, times = dlq_replays.times + 1")
_EARLIER = """
SELECT partition, "offset", replayed_to, replayed_at, by_role FROM dlq_replays
WHERE dlq_topic = $1 AND (partition, "offset") IN (
    SELECT * FROM unnest($2::integer[], $3::bigint[]))
"""


async def replay(bootstrap: str, database_url: str, dead_letter_topic: str,
                 letters: list[DeadLetter], to_topic: str, *, force: bool = False,
                 kafka: KafkaOptions | None = None) -> Replayed:
    """Publish each letter's original bytes, with its original key, to ``to_topic``, once.

    In one transaction: the letters are claimed in ``dlq_replays`` (those replayed before are
    skipped unless ``force``), published, and the claim commits once the broker acknowledged
    every record. A failure on the way rolls the claim back (some may have been sent: replay
    is at least once). Concurrent replays of the same letters send each once.
    """
    result = Replayed()
    readable = []
    for d in letters:
        if d.topic == "?":
            result.skipped.append(Skipped(d, d.error))
        else:
            readable.append(d)
    if not readable:
        return result
    address = database_address(database_url)
    conn = await connect(database_url)
    try:
        async with conn.transaction():
            keys = ([d.dlq_partition for d in readable], [d.dlq_offset for d in readable])
            claimed = {(r[0], r[1]) for r in await conn.fetch(
                _CLAIM.format(_AGAIN if force else "NOTHING"), dead_letter_topic, to_topic,
                *keys)}
            earlier = {(r[0], r[1]): r for r in await conn.fetch(
                _EARLIER, dead_letter_topic, *keys)} if len(claimed) < len(readable) else {}
            for d in readable:
                where = (d.dlq_partition, d.dlq_offset)
                if where in claimed:
                    result.sent.append(d)
                else:
                    row = earlier.get(where)
                    result.skipped.append(Skipped(d, _earlier(row) if row else "replayed before"))
            await _publish(bootstrap, to_topic, result.sent, kafka)
    except asyncpg.UndefinedTableError:
        raise StampflowError(f"PostgreSQL at {address}: no table dlq_replays; run `stampflow "
                             "migrate` first") from None
    except asyncpg.PostgresError as err:
        raise StampflowError(f"PostgreSQL at {address}: cannot record the replay: "
                             f"{' '.join(str(err).split())}") from None
    finally:
        await conn.close()
    return result


def _earlier(row: Any) -> str:
    at: datetime = row["replayed_at"]
    return (f"replayed before to {row['replayed_to']} at {at.isoformat(timespec='seconds')} "
            f"by {row['by_role']}")


async def _publish(bootstrap: str, topic: str, letters: list[DeadLetter],
                   kafka: KafkaOptions | None = None) -> None:
    if not letters:
        return
    producer = make_producer(bootstrap, kafka=kafka)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=d.value, key=d.key) for d in letters]
        for delivery in sent:
            await delivery
    finally:
        await producer.stop()
