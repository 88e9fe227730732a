"""The publisher under aiokafka's own failures, against the real broker.

aiokafka's producer runs one background sender task; an error it did not expect ends that
task (aio-libs/aiokafka#907), and from then on every send of that producer fails. A node that
kept it would retry every record for ever while looking alive: the publisher must replace it.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stampflow.bus import KafkaPublisher, ensure_topics, started_producer
from stampflow.testing.stack import read_topic

pytestmark = pytest.mark.integration


def _break_sender(producer: AIOKafkaProducer) -> None:
    """Make the sender's next round raise what aiokafka does not expect (fault injection into
    the library, the way #907 ends it)."""
    accumulator: Any = producer._sender._message_accumulator

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: the sender meets an error it does not expect")

    accumulator.drain_by_nodes = boom


async def test_a_producer_whose_sender_died_is_replaced(services: Any, topic_prefix: str,
                                                        ) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    topic = f"{topic_prefix}.events"
    await ensure_topics(bootstrap, [topic], 1)

    def start() -> Any:
        return started_producer(bootstrap)

    first = await start()
    publisher = KafkaPublisher(first, start)
    try:
        await publisher.send(topic, b"before", b"k")
        _break_sender(first)
        with pytest.raises(KafkaError):  # what was in flight fails; the caller retries it
            await publisher.send_many(topic, [(b"k", b"lost-1"), (b"k", b"lost-2")])
        # The retry goes through a fresh producer, and so does everything after it.
        await publisher.send_many(topic, [(b"k", b"again-1"), (b"k", b"again-2")])
        await publisher.send(topic, b"after", b"k")
        assert publisher.replaced == 1
    finally:
        await publisher.close()
    values = [r.value for r in await read_topic(bootstrap, topic, 4)]
    assert values == [b"before", b"again-1", b"again-2", b"after"]


async def test_without_a_way_to_start_another_the_dead_producer_keeps_failing(
    services: Any, topic_prefix: str,
) -> None:
    """The failure the replacement exists for: the same producer never sends again."""
    bootstrap = services.endpoints.bootstrap_servers
    topic = f"{topic_prefix}.events"
    await ensure_topics(bootstrap, [topic], 1)
    producer = await started_producer(bootstrap)
    publisher = KafkaPublisher(producer)
    try:
        _break_sender(producer)
        for _ in range(3):
            with pytest.raises(KafkaError):
                await publisher.send(topic, b"x", b"k")
    finally:
        await publisher.close()
