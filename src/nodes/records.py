"""A consumer that handles many records at once and commits only what is done: the loop the
orchestrator and the inference node share. Subclasses say what handling one record means
(:meth:`RecordRunner.process`); everything about offsets, retries and stopping is here.

- Up to ``max_in_flight`` records are handled at once; each record is one task.
- One rule for offsets: a record counts as finished only when its handling *returned*: its
  output acknowledged by the broker, or its dead letter acknowledged. A task that ends any
  other way (an exception, cancellation, the node stopping) leaves its record unfinished, and
  an offset is committed only when every record at or below it is finished.
- Output ids are deterministic, so a record handled again after a crash or a failed publish
  publishes the same events again, and their consumers apply them once.
- A broker error is retried per record, with a capped, jittered backoff of the record's own,
  behind a circuit breaker that pauses consumption while open and lets one trial through when
  half-open. An error that sending again cannot fix (a record too large for the broker) is
  final: the record goes to the dead-letter topic instead.
- SIGTERM (``stop`` set): no new records; retrying records give up at once (uncommitted, to be
  redone); the rest get a grace period; every step of the way out is bounded in time, so the
  node stops within 30 s whatever the state of the broker.
- Before partitions move to another member (a rebalance: a member joined or died), their
  records are finished and committed; what cannot finish in time is redone by the new owner.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from stampflow.contracts.events import utc_now
from stampflow.contracts.nodes import NodeContract
from stampflow.nodes.consuming import FetchWait, commit_offsets
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES
from stampflow.nodes.metrics import RETRIES
from stampflow.nodes.offsets import OffsetTracker, PartitionKey
from stampflow.nodes.publishing import FINAL_PUBLISH_ERRORS, DeadLetters, EventPublisher, Stopping
from stampflow.nodes.resilience import BreakerState, CircuitBreaker, bounded, retry, sleep_unless

log = structlog.get_logger("stampflow.records")


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    topics: tuple[str, ...]
    max_in_flight: int
    commit_interval_s: float = 0.2
    # On stop: how long in-flight records may take to finish, then how long each of the
    # broker calls on the way out may take. Together well inside 30 s.
    shutdown_grace_s: float = 12.0
    shutdown_call_s: float = 3.0
    group_id: str = "node"  # the consumer-lag metric's label
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class RecordRunner(ABC):
    """Consume ``config.topics``, handle each record with :meth:`process`, commit what is done."""

    name = "node"

    def __init__(
        self,
        *,
        contract: NodeContract,
        config: RunnerConfig,
        consumer_factory: Callable[[ConsumerRebalanceListener], AIOKafkaConsumer],
        publisher: EventPublisher,
        in_flight_gauge: Gauge | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.contract = contract
        self.runner_config = config
        self._consumer_factory = consumer_factory
        self.publisher = publisher
        self.clock = clock
        self.breaker = CircuitBreaker("broker", contract.io_policy.circuit_breaker)
        self.tracker = OffsetTracker()
        self._tasks: dict[PartitionKey, set[asyncio.Task[None]]] = {}
        self._stop = asyncio.Event()
        self._dead_letters = DeadLetters(
            publisher, node=contract.name, retry=contract.io_policy.retry, stop=self._stop,
            clock=clock, max_message_bytes=config.max_message_bytes)
        self._consumer: AIOKafkaConsumer | None = None
        self._in_flight_gauge = in_flight_gauge
        self.ready = False
        self.processed = 0
        self.peak_in_flight = 0

    @abstractmethod
    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Handle one record. Returns only once its output is acknowledged by the broker (or
        its dead letter is). A :class:`KafkaError` is retried; anything else unexpected sends
        the record to the dead-letter topic."""

    async def dead_letter(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        await self._dead_letters.send(record, reason)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = self._dead_letters.stop = stop
        consumer = self._consumer_factory(_Rebalance(self))
        self._consumer = consumer
        await consumer.start()
        fetch_wait = FetchWait(consumer)
        self.ready = True
        log.info(f"{self.name} started", topics=list(self.runner_config.topics),
                 max_in_flight=self.runner_config.max_in_flight)
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                self._pause_while_broken(consumer)
                free = self._free_slots()
                if free <= 0:
                    # Every slot is held (perhaps by records waiting for the broker): wait for
                    # one, but keep seeing ``stop`` and keep committing what finished.
                    await sleep_unless(stop, 0.05)
                else:
                    batch = await consumer.getmany(timeout_ms=100, max_records=free)
                    await fetch_wait.after_poll(batch)
                    for tp, records in batch.items():
                        for record in records:
                            self._spawn(tp, record)
                if time.monotonic() - last_commit >= self.runner_config.commit_interval_s:
                    await self._commit(consumer)
                    last_commit = time.monotonic()
        finally:
            self.ready = False
            await self._drain(consumer)
            await bounded(consumer.stop(), "consumer stop", self.runner_config.shutdown_call_s,
                          log.warning)
            log.info(f"{self.name} stopped", processed=self.processed)

    def _free_slots(self) -> int:
        return self.runner_config.max_in_flight - self.tracker.in_flight()

    def _pause_while_broken(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        if not assigned:
            return
        if self.breaker.state is BreakerState.OPEN:
            if not consumer.paused():
                log.warning("broker circuit open: pausing consumption", node=self.name)
                consumer.pause(*assigned)
        elif consumer.paused():
            log.info("broker circuit closed: resuming consumption", node=self.name)
            consumer.resume(*assigned)

    async def _drain(self, consumer: AIOKafkaConsumer, keys: set[PartitionKey] | None = None,
                     ) -> None:
        tasks = [
            task for key, group in self._tasks.items() if keys is None or key in keys
            for task in group
        ]
        if tasks:
            log.info("finishing in-flight records", node=self.name, count=len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.runner_config.shutdown_grace_s)
            for task in pending:
                task.cancel()
            if pending:  # let them unwind; a cancelled record stays uncommitted
                await asyncio.wait(pending, timeout=1.0)
        await self._commit(consumer, keys)

    async def _commit(self, consumer: AIOKafkaConsumer,
                      keys: set[PartitionKey] | None = None) -> None:
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        offsets = {
            TopicPartition(*key): offset for key, offset in self.tracker.committable().items()
            if key in assigned and (keys is None or key in keys)
        }
        if offsets:
            await commit_offsets(consumer, offsets, stop=self._stop,
                                 group_id=self.runner_config.group_id,
                                 call_s=self.runner_config.shutdown_call_s)

    # --- one record --------------------------------------------------------------------------

    def _spawn(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        key = (tp.topic, tp.partition)
        self.tracker.started(key, record.offset)
        self.peak_in_flight = max(self.peak_in_flight, self.tracker.in_flight())
        task = asyncio.create_task(self._handle(record))
        group = self._tasks.setdefault(key, set())
        group.add(task)

        def done(t: asyncio.Task[None]) -> None:
            group.discard(t)
            # The one rule: only a handling that returned finishes its record.
            if t.cancelled():
                return
            error = t.exception()
            if error is None:
                self.tracker.finished(key, record.offset)
            elif not isinstance(error, Stopping):
                log.error("record handling ended abnormally; left uncommitted", node=self.name,
                          topic=record.topic, partition=record.partition,
                          offset=record.offset, error=repr(error))

        task.add_done_callback(done)

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Returns only once the record's outcome is acknowledged by the broker: its output,
        or its dead letter. Raises :class:`Stopping` when told to stop first."""
        if self._in_flight_gauge is not None:
            self._in_flight_gauge.inc()

        def retrying(attempt: int, err: BaseException, wait: float) -> None:
            # The whole record runs again. Same ids, so what was already delivered is applied
            # once downstream.
            RETRIES.labels("broker").inc()
            log.warning("publish failed; retrying", node=self.name,
                        error=str(err) or type(err).__name__, wait_s=round(wait, 3),
                        attempt=attempt, topic=record.topic, offset=record.offset,
                        partition=record.partition, throttle=True)

        try:
            await retry(lambda: self.process(record), policy=self.contract.io_policy.retry,
                        transient=(KafkaError,), final=FINAL_PUBLISH_ERRORS,
                        breaker=self.breaker, stop=self._stop, forever=True,
                        on_retry=retrying)
            self.processed += 1
        except FINAL_PUBLISH_ERRORS as err:
            # Sending again cannot help: the record goes aside with the reason, and the
            # partition moves on.
            await self.dead_letter(
                record, f"its output cannot be published: {type(err).__name__}: {err}")
        except Stopping:
            raise  # the record stays unfinished, to be redone
        except Exception as err:  # noqa: BLE001 - a bug must not lose the record
            log.exception("unexpected error; sending the record to the dead-letter topic",
                          node=self.name, topic=record.topic, offset=record.offset,
                          partition=record.partition)
            await self.dead_letter(record, f"internal error: {err!r}")
        finally:
            if self._in_flight_gauge is not None:
                self._in_flight_gauge.dec()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions go to another member: finish their records and commit."""

    def __init__(self, node: RecordRunner) -> None:
        self.node = node

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        consumer = self.node._consumer
        keys = {(tp.topic, tp.partition) for tp in revoked}
        if consumer is not None and keys:
            await self.node._drain(consumer, keys)
        for key in keys:
            self.node.tracker.forget(key)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", node=self.node.name,
                 partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
