"""The reducer's thin async runner: batches from Kafka, one PostgreSQL transaction each.

A batch is flushed when it holds ``max_batch_size`` events or ``max_batch_wait_ms`` passed
since its first event. Offsets are committed only after the batch's transaction committed;
a crash between the two re-delivers the batch, and the exactly-once bookkeeping in the
transaction makes the second delivery a no-op. While PostgreSQL is down the runner stops
fetching (the batch in hand is retried with backoff behind a circuit breaker), so nothing is
dropped and the consumer lag simply grows until the database is back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from contracts.events import Envelope, decode
from contracts.nodes import NodeContract
from nodes.deadletter import dead_letter, dlq_topic, one_line
from nodes.orchestrator.runner import EventPublisher
from nodes.reducer.store import BatchResult, ReducerStore
from stampflow.observability import (
    CONSUMER_LAG,
    DLQ_RECORDS,
    REDUCER_BATCH,
    REDUCER_EVENTS,
    RETRIES,
)
from stampflow.resilience import CircuitBreaker, CircuitOpen

log = structlog.get_logger("stampflow.reducer")

# PostgreSQL errors worth retrying: the server went away, or a lock conflict.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class ReducerConfig:
    events_topic: str
    group_id: str
    max_batch_size: int
    max_batch_wait_ms: int


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
        self.ready = False
        self.batches: list[int] = []  # sizes of the last batches, for tests and the bench
        self.applied = 0
        self.duplicates = 0

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.start()
        self.ready = True
        log.info("reducer started", topic=self.config.events_topic)
        try:
            while not stop.is_set():
                records = await self._collect(stop)
                if records:
                    await self._flush(records, stop)
        finally:
            self.ready = False
            await self.consumer.stop()
            log.info("reducer stopped", applied=self.applied, duplicates=self.duplicates)

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
            for batch in fetched.values():
                records.extend(batch)
            if records and deadline is None:
                deadline = time.monotonic() + self.config.max_batch_wait_ms / 1000.0
            if not fetched and deadline is None:
                return records
        return records

    async def _flush(self, records: list[ConsumerRecord[bytes, bytes]],
                     stop: asyncio.Event) -> None:
        events: list[Envelope] = []
        for record in records:
            try:
                events.append(decode(record.value or b""))
            except ValidationError as err:
                await self._dead_letter(record, one_line(err))
        if events:
            result = await self._apply(events, stop)
            if result is None:
                return  # stopping while the database is down: nothing committed, re-delivered
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

    async def _apply(self, events: list[Envelope], stop: asyncio.Event) -> BatchResult | None:
        policy = self.contract.io_policy.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                self.breaker.check()
                result = await self.store.apply(events)
                self.breaker.success()
                return result
            except CircuitOpen as err:
                wait = err.retry_in_s
            except TRANSIENT_DB_ERRORS as err:
                self.breaker.failure()
                RETRIES.labels("postgresql").inc()
                wait = policy.backoff_ms(min(attempt, 16)) / 1000.0
                log.warning("database write failed; retrying", error=str(err) or type(err).__name__,
                            attempt=attempt, wait_s=round(wait, 3))
            if stop.is_set():
                return None
            # Keep the group membership alive while waiting: heartbeats run in the background,
            # and not calling getmany means no new records pile up in memory.
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.01, wait))
            except TimeoutError:
                pass

    async def _commit(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as err:
            log.warning("offset commit refused by the group; batch will be re-delivered "
                        "and skipped as already applied", error=str(err))
        except KafkaError as err:
            log.warning("offset commit failed", error=str(err))
        for tp, offset in offsets.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                CONSUMER_LAG.labels(self.config.group_id, tp.topic, str(tp.partition)).set(
                    max(0, high - offset))

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        dlq = dlq_topic(record.topic)
        doc = dead_letter(topic=record.topic, partition=record.partition, offset=record.offset,
                          key=record.key, value=record.value, error=reason,
                          node=self.contract.name, at=datetime.now(UTC))
        await self.publisher.send(dlq, doc, record.key)
        DLQ_RECORDS.labels(record.topic).inc()
        log.warning("record sent to dead-letter topic", dlq=dlq, partition=record.partition,
                    offset=record.offset, error=reason)
