"""The orchestrator's thin async runner: Kafka in, the pure core, effects, Kafka out.

- Up to ``max_in_flight`` workflows run at once; each record is one task.
- One rule for offsets: a record counts as finished only when its handling *returned*: its
  events acknowledged by the broker, or its dead letter acknowledged. A task that ends any
  other way (an exception, cancellation, the node stopping) leaves its record unfinished, and
  an offset is committed only when every record at or below it is finished.
- Ids are deterministic, so a record run again after a crash or a failed publish publishes the
  same events again and the reducer applies them once.
- A broker error is retried per record, with a capped, jittered backoff of the record's own,
  behind a circuit breaker that pauses consumption while open and lets one trial through when
  half-open. An error that sending again cannot fix (a record too large for the broker) is
  final: the request goes to the dead-letter topic instead.
- SIGTERM (``stop`` set): no new records; retrying records give up at once (uncommitted, to be
  redone); the rest get a grace period; every step of the way out is bounded in time, so the
  node stops within 30 s whatever the state of the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from stampflow.contracts.events import (
    Envelope,
    utc_now,
)
from stampflow.contracts.nodes import NodeContract
from stampflow.nodes.consuming import FetchWait, commit_offsets
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES
from stampflow.nodes.fsm import Workflow
from stampflow.nodes.metrics import (
    RETRIES,
    TRANSITION_SECONDS,
    TRANSITIONS,
    WORKFLOW_LATENCY,
    WORKFLOWS,
    WORKFLOWS_IN_FLIGHT,
)
from stampflow.nodes.offsets import OffsetTracker, PartitionKey
from stampflow.nodes.orchestrator.admission import (
    DEFAULT_MAX_RECORD_BYTES,
    Admitted,
    Refused,
    Unreadable,
    admit,
)
from stampflow.nodes.orchestrator.core import (
    CallInference,
    CallStamping,
    Command,
    Emit,
    Finished,
    OrchestratorCore,
    Unusable,
)
from stampflow.nodes.orchestrator.effects import Effects, InferenceEffect
from stampflow.nodes.publishing import FINAL_PUBLISH_ERRORS, DeadLetters, EventPublisher, Stopping
from stampflow.nodes.resilience import (
    BreakerState,
    CircuitBreaker,
    bounded,
    retry,
    sleep_unless,
)
from stampflow.nodes.stamping import StampingNode

log = structlog.get_logger("stampflow.orchestrator")

__all__ = ["EventPublisher", "InferenceEffect", "Orchestrator", "OrchestratorConfig"]



@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    requests_topic: str
    events_topic: str
    max_in_flight: int
    commit_interval_s: float = 0.2
    # On stop: how long in-flight workflows may take to finish, then how long each of the
    # broker calls on the way out may take. Together well inside 30 s.
    shutdown_grace_s: float = 12.0
    shutdown_call_s: float = 3.0
    group_id: str = "orchestrator"  # the consumer-lag metric's label
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class Orchestrator:
    def __init__(
        self,
        *,
        contract: NodeContract,
        core: OrchestratorCore,
        config: OrchestratorConfig,
        consumer_factory: Callable[[ConsumerRebalanceListener], AIOKafkaConsumer],
        publisher: EventPublisher,
        stamping: StampingNode,
        inference: InferenceEffect | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.contract = contract
        self.core = core
        self.config = config
        self._consumer_factory = consumer_factory
        self.publisher = publisher
        self.stamping = stamping
        self.inference = inference
        self.effects = Effects(stamping, inference,
                               timeout_s=contract.io_policy.timeout_ms / 1000.0, clock=clock)
        self.clock = clock
        self.breaker = CircuitBreaker("broker", contract.io_policy.circuit_breaker)
        self.tracker = OffsetTracker()
        self._tasks: dict[PartitionKey, set[asyncio.Task[None]]] = {}
        self._stop = asyncio.Event()
        self._dead_letters = DeadLetters(
            publisher, node=contract.name, retry=contract.io_policy.retry, stop=self._stop,
            clock=clock, max_message_bytes=config.max_message_bytes)
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = False
        self.processed = 0
        self.peak_in_flight = 0
        # Seconds the pure core spent per transition (start and each step), last 10,000.
        self.transition_seconds: deque[float] = deque(maxlen=10_000)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = self._dead_letters.stop = stop
        consumer = self._consumer_factory(_Rebalance(self))
        self._consumer = consumer
        await consumer.start()
        fetch_wait = FetchWait(consumer)
        self.ready = True
        log.info("orchestrator started", topic=self.config.requests_topic,
                 max_in_flight=self.config.max_in_flight)
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
                if time.monotonic() - last_commit >= self.config.commit_interval_s:
                    await self._commit(consumer)
                    last_commit = time.monotonic()
        finally:
            self.ready = False
            await self._drain(consumer)
            await bounded(consumer.stop(), "consumer stop", self.config.shutdown_call_s,
                          log.warning)
            log.info("orchestrator stopped", processed=self.processed)

    def _free_slots(self) -> int:
        return self.config.max_in_flight - self.tracker.in_flight()

    def _pause_while_broken(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        if not assigned:
            return
        if self.breaker.state is BreakerState.OPEN:
            if not consumer.paused():
                log.warning("broker circuit open: pausing consumption")
                consumer.pause(*assigned)
        elif consumer.paused():
            log.info("broker circuit closed: resuming consumption")
            consumer.resume(*assigned)

    async def _drain(self, consumer: AIOKafkaConsumer, keys: set[PartitionKey] | None = None,
                     ) -> None:
        tasks = [
            task for key, group in self._tasks.items() if keys is None or key in keys
            for task in group
        ]
        if tasks:
            log.info("finishing in-flight workflows", count=len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
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
                                 group_id=self.config.group_id,
                                 call_s=self.config.shutdown_call_s)

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
                log.error("record handling ended abnormally; left uncommitted",
                          partition=record.partition, offset=record.offset, error=repr(error))

        task.add_done_callback(done)

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Returns only once the record's outcome is acknowledged by the broker: its events,
        or its dead letter. Raises :class:`Stopping` when told to stop first."""
        WORKFLOWS_IN_FLIGHT.inc()

        def retrying(attempt: int, err: BaseException, wait: float) -> None:
            # The whole record runs again. Same ids, so the events already delivered are
            # applied once by the reducer.
            RETRIES.labels("broker").inc()
            log.warning("publish failed; retrying", error=str(err) or type(err).__name__,
                        wait_s=round(wait, 3), attempt=attempt, offset=record.offset,
                        partition=record.partition, throttle=True)

        try:
            await retry(lambda: self._process(record), policy=self.contract.io_policy.retry,
                        transient=(KafkaError,), final=FINAL_PUBLISH_ERRORS,
                        breaker=self.breaker, stop=self._stop, forever=True,
                        on_retry=retrying)
            self.processed += 1
        except FINAL_PUBLISH_ERRORS as err:
            # Sending again cannot help: the request goes aside with the reason, and the
            # partition moves on.
            await self._dead_letters.send(
                record, f"its events cannot be published: {type(err).__name__}: {err}")
        except Stopping:
            raise  # the record stays unfinished, to be redone
        except Exception as err:  # noqa: BLE001 - a bug must not lose the record
            log.exception("unexpected error; sending the record to the dead-letter topic",
                          offset=record.offset, partition=record.partition)
            await self._dead_letters.send(record, f"internal error: {err!r}")
        finally:
            WORKFLOWS_IN_FLIGHT.dec()

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        match admit(record.value or b"", self.config.max_record_bytes):
            case Unreadable(reason=reason):
                await self._dead_letters.send(record, reason)
                return
            case Refused() as refused:
                await self._reject(refused)
                return
            case Admitted(request=request):
                pass
        structlog.contextvars.bind_contextvars(correlation_id=str(request.event_id),
                                               namespace=request.namespace)
        try:
            t0 = time.perf_counter()
            workflow, commands = self.core.start(request, self.clock())
            self._timed(t0, commands)
            if workflow is None:  # no workflow can exist for it (not a request): aside it goes
                await self._dead_letters.send(record, "; ".join(
                    c.reason for c in commands if isinstance(c, Unusable)))
                return
            await self._execute(workflow, commands, request)
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "namespace")

    async def _execute(self, workflow: Workflow, commands: list[Command],
                       request: Envelope) -> None:
        pending: list[tuple[bytes, bytes]] = []
        finished: list[str] = []
        queue = list(commands)
        while queue:
            command = queue.pop(0)
            match command:
                case Emit(envelope=envelope):
                    pending.append((envelope.key(), envelope.to_bytes()))
                    payload = envelope.payload
                    if payload.type == "workflow.transitioned":
                        TRANSITIONS.labels(workflow.kind, getattr(payload, "to_state", "")).inc()
                        log.debug("transition", workflow_id=str(workflow.workflow_id),
                                  to_state=getattr(payload, "to_state", None))
                case CallStamping(request=stamp_request):
                    # Stamping is quick: its events go out with the result, in one flush.
                    outcome = await self.effects.stamp(stamp_request, request.namespace)
                    t0 = time.perf_counter()
                    workflow, more = self.core.step(workflow, outcome)
                    self._timed(t0, more)
                    queue[:0] = more
                case CallInference(request=gen_request, seed=seed):
                    # Generation takes long: publish what happened so far first.
                    await self._flush(pending)
                    outcome = await self.effects.generate(gen_request, seed, workflow)
                    t0 = time.perf_counter()
                    workflow, more = self.core.step(workflow, outcome)
                    self._timed(t0, more)
                    queue[:0] = more
                case Finished(state=state):
                    finished.append(state)
        await self._flush(pending)
        for state in finished:  # only once its events are acknowledged
            WORKFLOWS.labels(workflow.kind, state).inc()
            WORKFLOW_LATENCY.labels(workflow.kind).observe(
                max(0.0, (self.clock() - request.occurred_at).total_seconds()))
            log.info("workflow finished", workflow_id=str(workflow.workflow_id),
                     kind=workflow.kind, state=state)

    def _timed(self, t0: float, commands: list[Command]) -> None:
        elapsed = time.perf_counter() - t0
        taken = sum(1 for c in commands if isinstance(c, Emit)
                    and c.envelope.event_type == "workflow.transitioned")
        if taken:
            per = elapsed / taken
            self.transition_seconds.extend([per] * taken)
            TRANSITION_SECONDS.observe(per)

    async def _flush(self, pending: list[tuple[bytes, bytes]]) -> None:
        if pending:
            await self.publisher.send_many(self.config.events_topic, pending)
            pending.clear()

    # --- bad input ---------------------------------------------------------------------------

    async def _reject(self, refused: Refused) -> None:
        workflow, commands = self.core.reject(refused.namespace, refused.request_id,
                                              refused.kind, refused.code, refused.reason,
                                              self.clock())
        if workflow is None:  # admission vouched for its namespace and kind: a bug if reached,
            # and _handle dead-letters the record with this reason
            raise RuntimeError("; ".join(c.reason for c in commands if isinstance(c, Unusable)))
        log.warning("rejected request", namespace=refused.namespace,
                    request_id=str(refused.request_id), code=refused.code,
                    reason=refused.reason)
        await self._execute_plain(commands)

    async def _execute_plain(self, commands: list[Command]) -> None:
        pending = [(c.envelope.key(), c.envelope.to_bytes()) for c in commands
                   if isinstance(c, Emit)]
        for c in commands:
            if isinstance(c, Finished):
                WORKFLOWS.labels("invalid", c.state).inc()
        await self._flush(pending)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions go to another member: finish their workflows and commit."""

    def __init__(self, node: Orchestrator) -> None:
        self.node = node

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        consumer = self.node._consumer
        keys = {(tp.topic, tp.partition) for tp in revoked}
        if consumer is not None and keys:
            await self.node._drain(consumer, keys)
        for key in keys:
            self.node.tracker.forget(key)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))
