"""The orchestrator's thin async runner: Kafka in, the pure core, effects, Kafka out.

Two topics come in, in one consumer group: requests (a workflow starts: admission, the FSM
core, stamping in process) and the inference node's results (a waiting generation workflow
resumes). A generation is handed over as a job on the inference-jobs topic once the
workflow's events so far are acknowledged, and the request is then done: no orchestrator
holds a workflow while the inference node works, and any orchestrator can take its result.

Offsets, retries, the breaker, rebalances and stopping are :class:`~stampflow.nodes.records.
RecordRunner`'s: a record counts as finished only once what it produced is acknowledged.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener

from stampflow.contracts.events import Envelope, utc_now
from stampflow.contracts.nodes import NodeContract
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES
from stampflow.nodes.fsm import Workflow
from stampflow.nodes.metrics import (
    TRANSITION_SECONDS,
    TRANSITIONS,
    WORKFLOW_LATENCY,
    WORKFLOWS,
    WORKFLOWS_IN_FLIGHT,
)
from stampflow.nodes.orchestrator.admission import (
    DEFAULT_MAX_RECORD_BYTES,
    Admitted,
    Refused,
    Unreadable,
    admit,
    admit_result,
)
from stampflow.nodes.orchestrator.core import (
    CallStamping,
    Command,
    DispatchInference,
    Emit,
    Finished,
    OrchestratorCore,
    Unusable,
)
from stampflow.nodes.orchestrator.effects import Effects
from stampflow.nodes.publishing import EventPublisher
from stampflow.nodes.records import RecordRunner, RunnerConfig
from stampflow.nodes.stamping import StampingNode

log = structlog.get_logger("stampflow.orchestrator")

__all__ = ["EventPublisher", "Orchestrator", "OrchestratorConfig"]


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    requests_topic: str
    events_topic: str
    max_in_flight: int
    # Generations go out as jobs here, and their results come back there.
    jobs_topic: str = "stampflow.inference-jobs.v1"
    results_topic: str = "stampflow.inference-results.v1"
    commit_interval_s: float = 0.2
    shutdown_grace_s: float = 12.0
    shutdown_call_s: float = 3.0
    group_id: str = "orchestrator"  # the consumer-lag metric's label
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def runner(self) -> RunnerConfig:
        return RunnerConfig(
            topics=(self.requests_topic, self.results_topic), max_in_flight=self.max_in_flight,
            commit_interval_s=self.commit_interval_s, shutdown_grace_s=self.shutdown_grace_s,
            shutdown_call_s=self.shutdown_call_s, group_id=self.group_id,
            max_message_bytes=self.max_message_bytes)


class Orchestrator(RecordRunner):
    name = "orchestrator"

    def __init__(
        self,
        *,
        contract: NodeContract,
        core: OrchestratorCore,
        config: OrchestratorConfig,
        consumer_factory: Callable[[ConsumerRebalanceListener], AIOKafkaConsumer],
        publisher: EventPublisher,
        stamping: StampingNode,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(contract=contract, config=config.runner(),
                         consumer_factory=consumer_factory, publisher=publisher,
                         in_flight_gauge=WORKFLOWS_IN_FLIGHT, clock=clock)
        self.core = core
        self.config = config
        self.stamping = stamping
        self.effects = Effects(stamping, timeout_s=contract.io_policy.timeout_ms / 1000.0,
                               clock=clock)
        # Seconds the pure core spent per transition (start and each step), last 10,000.
        self.transition_seconds: deque[float] = deque(maxlen=10_000)
        self.dispatched = 0
        self.resumed = 0

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.topic == self.config.results_topic:
            await self._resume(record)
        else:
            await self._start(record)

    async def _start(self, record: ConsumerRecord[bytes, bytes]) -> None:
        match admit(record.value or b"", self.config.max_record_bytes):
            case Unreadable(reason=reason):
                await self.dead_letter(record, reason)
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
                await self.dead_letter(record, "; ".join(
                    c.reason for c in commands if isinstance(c, Unusable)))
                return
            await self._execute(workflow, commands, request.occurred_at)
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "namespace")

    async def _resume(self, record: ConsumerRecord[bytes, bytes]) -> None:
        match admit_result(record.value or b"", self.config.max_message_bytes):
            case Unreadable(reason=reason):
                await self.dead_letter(record, reason)
                return
            case Envelope() as result:
                pass
        structlog.contextvars.bind_contextvars(correlation_id=str(result.correlation_id),
                                               namespace=result.namespace)
        try:
            t0 = time.perf_counter()
            workflow, commands = self.core.resume(result, self.clock())
            self._timed(t0, commands)
            if workflow is None or any(isinstance(c, Unusable) for c in commands):
                await self.dead_letter(record, "; ".join(
                    c.reason for c in commands if isinstance(c, Unusable)))
                return
            await self._execute(workflow, commands, workflow.context.started_at)
            self.resumed += 1
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "namespace")

    async def _execute(self, workflow: Workflow, commands: list[Command],
                       started: datetime) -> None:
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
                    outcome = await self.effects.stamp(stamp_request,
                                                       workflow.context.namespace)
                    t0 = time.perf_counter()
                    workflow, more = self.core.step(workflow, outcome)
                    self._timed(t0, more)
                    queue[:0] = more
                case DispatchInference(job=job):
                    # The job goes out only after the events before it: its result then
                    # always follows them on the workflow's partition of the events topic.
                    await self._flush(pending)
                    await self.publisher.send_many(self.config.jobs_topic,
                                                   [(job.key(), job.to_bytes())])
                    self.dispatched += 1
                case Finished(state=state):
                    finished.append(state)
        await self._flush(pending)
        for state in finished:  # only once its events are acknowledged
            WORKFLOWS.labels(workflow.kind, state).inc()
            WORKFLOW_LATENCY.labels(workflow.kind).observe(
                max(0.0, (self.clock() - started).total_seconds()))
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
