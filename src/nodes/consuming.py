"""What both runners do with their consumer besides fetching: commit offsets, bounded in time
and abandoned on stop, report the lag behind each partition's end, and keep the broker-side
fetch wait long enough for the broker to read (:class:`FetchWait`).

A commit that fails is never fatal. The work is durable (the orchestrator's events are
acknowledged, the reducer's batch is committed in PostgreSQL), so records whose commit was
lost are re-delivered and, their ids being deterministic, counted once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sized

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from stampflow.nodes.metrics import CONSUMER_LAG
from stampflow.nodes.resilience import Stopping, unless_stopped

log = structlog.get_logger("stampflow.consuming")

# The fetch wait's ceiling: past it a fetch that still brings nothing is not the wait's fault.
FETCH_WAIT_CEILING_MS = 2000

COMMIT_TIMEOUT_S = 10.0


async def commit_offsets(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int], *,
                         stop: asyncio.Event, group_id: str, call_s: float) -> bool:
    """Commit ``offsets`` (the next offset to read, per partition) and report the lag; True
    when the group has them. With the coordinator unreachable a commit would wait for it
    indefinitely, so it is bounded: 10 s while running, abandoned as soon as a stop comes, and
    one try of ``call_s`` once stopping (the way out commits what finished)."""
    committed = False
    try:
        if stop.is_set():
            await asyncio.wait_for(consumer.commit(dict(offsets)), call_s)
        else:
            await unless_stopped(stop, lambda: consumer.commit(dict(offsets)),
                                 timeout=COMMIT_TIMEOUT_S, unwind_s=call_s)
        committed = True
    except Stopping:
        return False
    except CommitFailedError as err:
        # The group moved on (a rebalance): the new owner re-runs these records.
        log.warning("offset commit refused by the group; its records will be re-delivered",
                    error=str(err), throttle=True)
    except (KafkaError, TimeoutError) as err:
        log.warning("offset commit failed; the next one will carry it",
                    error=str(err) or type(err).__name__, throttle=True)
    report_lag(consumer, offsets, group_id)
    return committed


def report_lag(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int],
               group_id: str) -> None:
    """``stampflow_consumer_lag``: records between each committed offset and the partition's
    end as last fetched (unknown until something was fetched from it)."""
    for tp, offset in offsets.items():
        high = consumer.highwater(tp)
        if high is not None:
            CONSUMER_LAG.labels(group_id, tp.topic, str(tp.partition)).set(max(0, high - offset))


class FetchWaitPolicy:
    """Pure: the broker-side fetch wait (``fetch_max_wait_ms``) to use after a poll.

    The embedded broker (Tansu) holds every fetch for the whole wait, data or not, and answers
    with what it has read by then; its memory storage reads slower as a partition grows, so a
    wait tuned for latency on a small partition (50 ms) returns next to nothing once the
    partition holds a few hundred thousand records: the consumer is behind, its fetches come
    back empty, and the node stalls while looking healthy (the 1,000,000-request soak did, at
    about 550,000 requests). So: when nothing has arrived for two whole waits while a
    partition has records past the position, the wait doubles (up to the ceiling); a run of
    polls that bring records lets it back down by a tenth towards the floor, but not below
    twice a wait that starved, until the consumer has caught up (coming down into the starved
    range and doubling again, over and over, read 140,000 of 200,000 records in 20 s where
    holding the level read them all). On Kafka, which
    answers as soon as it has data, a consumer that is behind is never starved, and the wait
    stays at the floor."""

    def __init__(self, floor_ms: int, ceiling_ms: int = FETCH_WAIT_CEILING_MS,
                 settle_after: int = 20, now: float = 0.0) -> None:
        self.floor_ms = max(1, floor_ms)
        self.ceiling_ms = max(self.floor_ms, ceiling_ms)
        self.settle_after = settle_after
        self.ms = self.floor_ms
        self._full = 0
        self._since = now  # when records last came (or the wait last changed)
        self._starved_ms = 0  # the longest wait that starved since the consumer last caught up

    @property
    def lowest_ms(self) -> int:
        """How far records flowing may bring the wait down now."""
        return min(self.ceiling_ms, max(self.floor_ms, 2 * self._starved_ms))

    def after_poll(self, records: int, behind: bool, now: float) -> int:
        if records:
            self._since = now
            self._full += 1
            if self._full >= self.settle_after and self.ms > self.lowest_ms:
                self.ms = max(self.lowest_ms, self.ms - max(1, self.ms // 10))
                self._full = 0
        else:
            self._full = 0
            if not behind:
                self._since = now  # idle, not starved: caught up
                self._starved_ms = 0
            elif now - self._since >= 2 * self.ms / 1000.0 and self.ms < self.ceiling_ms:
                self._starved_ms = max(self._starved_ms, self.ms)
                self.ms = min(self.ceiling_ms, self.ms * 2)
                self._since = now
        return self.ms


class FetchWait:
    """:class:`FetchWaitPolicy` applied to a started aiokafka consumer after each poll."""

    def __init__(self, consumer: AIOKafkaConsumer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.clock = clock
        fetcher = getattr(consumer, "_fetcher", None)
        floor = int(getattr(fetcher, "_fetch_max_wait_ms", 500))
        self.policy = FetchWaitPolicy(floor, now=clock())

    async def after_poll(self, fetched: Mapping[TopicPartition, Sized]) -> None:
        records = sum(len(batch) for batch in fetched.values())
        behind = records == 0 and await self._behind()
        before = self.policy.ms
        after = self.policy.after_poll(records, behind, self.clock())
        if after != before:
            _set_fetch_wait(self.consumer, after)
            if after > before:
                log.info("polls come back empty while records wait; lengthening the "
                         "broker's fetch wait", fetch_max_wait_ms=after, throttle=True)

    async def _behind(self) -> bool:
        """Whether an assigned, unpaused partition has records past the position (as far as
        the last fetch response said)."""
        try:
            paused = self.consumer.paused()
            for tp in self.consumer.assignment():
                high = self.consumer.highwater(tp)
                if high is not None and tp not in paused and \
                        high > await self.consumer.position(tp):
                    return True
        except (KafkaError, AssertionError, ValueError):  # a rebalance under way: not now
            return False
        return False


def _set_fetch_wait(consumer: AIOKafkaConsumer, ms: int) -> None:
    # aiokafka reads its fetcher's wait each time it builds a FetchRequest; there is no public
    # setter. Without the attribute (another aiokafka) the wait simply stays as configured.
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
        fetcher._fetch_max_wait_ms = ms
