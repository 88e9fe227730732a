"""A consumer behind a large partition keeps reading (the 1,000,000-request soak's stall).

The embedded broker (Tansu, memory storage) holds every fetch for the whole
``fetch_max_wait_ms`` and answers with what it has read by then; it reads slower as a partition
grows. With 200,000 records of one record per batch (how the nodes publish under load), a
50 ms wait brings nothing at all: the soak's nodes sat idle and healthy with hundreds of
thousands of requests waiting. :class:`stampflow.nodes.consuming.FetchWait` lengthens the
wait while polls come back empty with records waiting, and lets it back down once they flow.
"""

from __future__ import annotations

import time

import pytest

from stampflow.bus import ensure_topics, make_consumer, started_producer
from stampflow.nodes.consuming import FetchWait
from stampflow.settings import ServiceSource
from stampflow.testing.pytest_plugin import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 200_000
READ_S = 20.0


async def _fill(bootstrap: str, topic: str) -> None:
    """RECORDS records, one per batch: each delivery awaited before the next send (about
    45 s on two cores)."""
    producer = await started_producer(bootstrap, linger_ms=0)
    try:
        value = b"r" * 300
        for _ in range(RECORDS):
            await (await producer.send(topic, value, key=b"k"))
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, group: str, *, adapt: bool,
                seconds: float) -> tuple[int, int]:
    """Records read within ``seconds`` by a node-configured consumer (50 ms fetch wait), and
    the fetch wait it ended with."""
    consumer = make_consumer(bootstrap, [topic], group)
    await consumer.start()
    wait = FetchWait(consumer) if adapt else None
    read = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and read < RECORDS:
            fetched = await consumer.getmany(timeout_ms=100, max_records=500)
            read += sum(len(batch) for batch in fetched.values())
            if wait is not None:
                await wait.after_poll(fetched)
    finally:
        await consumer.stop()
    return read, (wait.policy.ms if wait is not None else 0)


async def test_a_consumer_behind_a_large_partition_keeps_reading(
    services: Services, topic_prefix: str,
) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    topic = f"{topic_prefix}.large"
    await ensure_topics(bootstrap, [topic], 1)
    await _fill(bootstrap, topic)

    read, wait_ms = await _read(bootstrap, topic, f"{topic_prefix}-adaptive", adapt=True,
                                seconds=READ_S)
    assert read == RECORDS, (f"{read} of {RECORDS} records read in {READ_S:g}s; the fetch "
                             f"wait ended at {wait_ms} ms")

    if services.source is ServiceSource.EMBEDDED:
        # What the wait fixes, on the broker that needs it: the fixed 50 ms wait reads
        # (almost) nothing in the same time.
        fixed, _ = await _read(bootstrap, topic, f"{topic_prefix}-fixed", adapt=False,
                               seconds=5.0)
        assert fixed < RECORDS // 10, f"the fixed 50 ms wait read {fixed}: no starvation here"
