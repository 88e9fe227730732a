"""The reducer's thin async runner: batches from Kafka, one PostgreSQL transaction each.

A batch is flushed when it holds ``max_batch_size`` events or ``max_batch_wait_ms`` passed
since its first event. Offsets are committed only after the batch's transaction committed;
a crash between the two re-delivers the batch, and the exactly-once bookkeeping in the
transaction makes the second delivery a no-op.

- PostgreSQL unreachable, or a lock conflict (transient): the batch in hand is retried with a
  capped, jittered backoff behind a circuit breaker, and nothing new is fetched, so nothing is
  dropped and the consumer lag simply grows until the database is back.
- PostgreSQL refuses the data (not transient: a value it cannot store, a constraint): the batch
  is bisected. Each half is applied in a transaction of its own with the same bookkeeping;
  an event that fails alone is dead-lettered with the reason and its origin, its id is
  claimed and an anomaly row says what happened. The rest of the batch is applied.
- SIGTERM: a batch not yet committed is abandoned (re-delivered later); every call on the way
  out is bounded in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from stampflow.contracts.events import Envelope, decode, utc_now
from stampflow.contracts.nodes import NodeContract
from stampflow.nodes import pgerrors
from stampflow.nodes.consuming import FetchWait, commit_offsets
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES, one_line
from stampflow.nodes.metrics import (
    REDUCER_BATCH,
    REDUCER_EVENTS,
    RETRIES,
)
from stampflow.nodes.pgerrors import DATA_ERRORS
from stampflow.nodes.publishing import DeadLetters, EventPublisher
from stampflow.nodes.reducer.store import BatchResult, ReducerStore
from stampflow.nodes.resilience import (
    CircuitBreaker,
    Stopping,
    bounded,
    retry,
    unless_stopped,
)

log = structlog.get_logger("stampflow.reducer")
T = TypeVar("T")

@dataclass(frozen=True, slots=True)
class ReducerConfig:
    events_topic: str
    group_id: str
    max_batch_size: int
    max_batch_wait_ms: int
    shutdown_call_s: float = 3.0
    apply_timeout_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Retention of the history tables (stampflow.nodes.reducer.retention): days kept (0 keeps
    # everything), day partitions made ahead, seconds between maintenance runs (0: none).
    retention_days: int = 0
    partitions_ahead: int = 3
    maintenance_interval_s: float = 0.0
    maintenance_timeout_s: float = 60.0  # one run at most; a hung database ends it there


class Reducer:
    def __init__(
        self,
        *,
        contract: NodeContract,
        config: ReducerConfig,
        consumer: AIOKafkaConsumer,
        store: ReducerStore,
        publisher: EventPublisher,
    ) -> None:
        self.contract = contract
        self.config = config
        self.consumer = consumer
        self.store = store
        self.publisher = publisher
        self.breaker = CircuitBreaker("postgresql", contract.io_policy.circuit_breaker)
        self._stop = asyncio.Event()
        self._dead_letters = DeadLetters(
            publisher, node=contract.name, retry=contract.io_policy.retry, stop=self._stop,
            clock=utc_now, max_message_bytes=config.max_message_bytes)
        self.ready = False
        self._fetch_wait: FetchWait | None = None
        self.batches: list[int] = []  # sizes of the last batches, for tests and the bench
        self.applied = 0
        self.duplicates = 0
        self.unstorable = 0

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = self._dead_letters.stop = stop
        await self.consumer.start()
        self._fetch_wait = FetchWait(self.consumer)
        self.ready = True
        log.info("reducer started", topic=self.config.events_topic)
        maintenance = (asyncio.create_task(self._maintain(stop))
                       if self.config.maintenance_interval_s > 0 else None)
        try:
            while not stop.is_set():
                records = await self._collect(stop)
                if records:
                    try:
                        await self._flush(records, stop)
                    except Stopping:
                        break  # nothing of this batch committed: re-delivered later
        finally:
            self.ready = False
            if maintenance is not None:
                maintenance.cancel()  # a hung database must not hold the way out either
                await bounded(asyncio.gather(maintenance, return_exceptions=True),
                              "history maintenance", self.config.shutdown_call_s, log.warning)
            await bounded(self.consumer.stop(), "consumer stop", self.config.shutdown_call_s,
                          log.warning)
            log.info("reducer stopped", applied=self.applied, duplicates=self.duplicates)

    async def _maintain(self, stop: asyncio.Event) -> None:
        """Retention, now and then every ``maintenance_interval_s``: day partitions made ahead,
        expired ones dropped. A failure (the database away, a busy table) is logged and tried
        again at the next run; it never stops the reducer."""
        while not stop.is_set():
            try:
                report = await asyncio.wait_for(
                    self.store.maintain(keep_days=self.config.retention_days,
                                        ahead_days=self.config.partitions_ahead),
                    timeout=self.config.maintenance_timeout_s)
                if report.created or report.dropped:
                    log.info("history partitions maintained", created=len(report.created),
                             dropped=list(report.dropped), moved_rows=report.moved)
            except Exception as err:  # noqa: BLE001 - logged, retried at the next run
                log.warning("history maintenance failed; trying again later",
                            error=_describe(err), throttle=True)
            try:
                await asyncio.wait_for(stop.wait(), self.config.maintenance_interval_s)
            except TimeoutError:
                pass

    async def _collect(self, stop: asyncio.Event) -> list[ConsumerRecord[bytes, bytes]]:
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline: float | None = None
        limit = self.config.max_batch_size
        while len(records) < limit and not stop.is_set():
            if deadline is None:
                timeout_ms = 200
            else:
                timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                if timeout_ms == 0:
                    break
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms,
                                                  max_records=limit - len(records))
            if self._fetch_wait is not None:
                await self._fetch_wait.after_poll(fetched)
            for batch in fetched.values():
                records.extend(batch)
            if records and deadline is None:
                deadline = time.monotonic() + self.config.max_batch_wait_ms / 1000.0
            if not fetched and deadline is None:
                return records
        return records

    async def _flush(self, records: list[ConsumerRecord[bytes, bytes]],
                     stop: asyncio.Event) -> None:
        """Apply one batch and commit its offsets. Raises :class:`Stopping` (nothing committed)
        when told to stop before the batch is durable."""
        events: list[tuple[Envelope, ConsumerRecord[bytes, bytes]]] = []
        for record in records:
            try:
                events.append((decode(record.value or b""), record))
            except ValidationError as err:
                await self._dead_letters.send(record, one_line(err))
        if events:
            result = await self._apply_all(events)
            self.applied += result.applied
            self.duplicates += result.duplicates
            REDUCER_EVENTS.labels("applied").inc(result.applied)
            REDUCER_EVENTS.labels("duplicate").inc(result.duplicates)
            REDUCER_EVENTS.labels("anomaly").inc(result.anomalies)
            log.info("batch applied", size=len(events), applied=result.applied,
                     duplicates=result.duplicates, anomalies=result.anomalies)
        REDUCER_BATCH.observe(len(records))
        self.batches.append(len(records))
        del self.batches[:-1000]
        await self._commit(records)

    async def _apply_all(
        self, events: list[tuple[Envelope, ConsumerRecord[bytes, bytes]]],
    ) -> BatchResult:
        """Apply ``events``; on a data error, bisect down to the events at fault."""
        try:
            return await self._apply([e for e, _ in events], _sources(r for _, r in events))
        except DATA_ERRORS as err:
            if len(events) == 1:
                return await self._set_aside(*events[0], err)
            log.warning("batch refused by the database; bisecting", size=len(events),
                        error=_describe(err))
        half = len(events) // 2
        first = await self._apply_all(events[:half])
        second = await self._apply_all(events[half:])
        return BatchResult(first.received + second.received, first.applied + second.applied,
                           first.duplicates + second.duplicates,
                           first.anomalies + second.anomalies)

    async def _set_aside(self, envelope: Envelope, record: ConsumerRecord[bytes, bytes],
                         err: BaseException) -> BatchResult:
        """One event PostgreSQL will not take: its dead letter first (a crash before the claim
        below only sends it twice), then its id claimed and an anomaly row, in one
        transaction, so a re-delivery skips it."""
        reason = f"the database refused this event: {_describe(err)}"
        await self._dead_letters.send(record, reason)
        claimed = await self._with_retries(
            lambda: self.store.set_aside(envelope, reason, _sources([record])))
        self.unstorable += 1
        REDUCER_EVENTS.labels("unstorable").inc()
        return BatchResult(1, 0, 0 if claimed else 1, 1 if claimed else 0)

    async def _apply(self, events: list[Envelope],
                     sources: set[tuple[str, int]]) -> BatchResult:
        return await self._with_retries(lambda: self.store.apply(events, sources))

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` until it succeeds, retrying what is not the data's fault; raises
        :class:`Stopping` when told to stop first, and the data errors as they are. While
        it waits, heartbeats keep the group membership, and no new records pile up."""

        def retrying(attempt: int, err: BaseException, wait: float) -> None:
            RETRIES.labels("postgresql").inc()
            log.warning("database write failed; retrying", error=_describe(err),
                        attempt=attempt, wait_s=round(wait, 3), throttle=True)

        return await retry(
            lambda: unless_stopped(self._stop, call, timeout=self.config.apply_timeout_s,
                                   unwind_s=self.config.shutdown_call_s),
            policy=self.contract.io_policy.retry,
            transient=(*pgerrors.TRANSIENT, asyncpg.PostgresError), final=DATA_ERRORS,
            breaker=self.breaker, stop=self._stop, forever=True, on_retry=retrying)

    async def _commit(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        # The batch is durable already: an uncommitted one is re-delivered and skipped.
        await commit_offsets(self.consumer, offsets, stop=self._stop,
                             group_id=self.config.group_id, call_s=self.config.shutdown_call_s)


def _sources(records: Iterable[ConsumerRecord[bytes, bytes]]) -> set[tuple[str, int]]:
    """The (topic, partition) pairs ``records`` came from: the store's locks."""
    return {(r.topic, r.partition) for r in records}


def _describe(err: BaseException) -> str:
    """One line: the error's class and its first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
