"""The inference node's runner: generation jobs in, results out (``stampflow run inference``).

Workers share one consumer group on the inference-jobs topic, so GPU capacity grows by adding
workers, independently of the orchestrators. A worker takes up to ``max_in_flight`` jobs at
once, of whatever namespace, and hands them all to :class:`InferenceEffectNode`, whose dynamic
batcher groups the compatible ones into one pipeline call.

A job's offset is committed only once its result is acknowledged by the broker
(:class:`~stampflow.nodes.records.RecordRunner`). A worker killed mid-batch leaves its jobs
uncommitted; after the rebalance another worker runs them again. The seed is in the job, so
the image, its hash and its artifact key are the same; the result has the same id, and the
orchestrator's events from it have the same ids, so the reducer counts the generation once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from stampflow.contracts.events import (
    Envelope,
    InferenceJob,
    InferenceResult,
    decode,
    derive_id,
    envelope_for,
    storable,
    utc_now,
)
from stampflow.contracts.nodes import NodeContract
from stampflow.inference.effect import InferenceEffectNode, JobOwner
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES, one_line
from stampflow.nodes.orchestrator.commands import EffectFailed, GenerationSucceeded, Outcome
from stampflow.nodes.publishing import EventPublisher
from stampflow.nodes.records import RecordRunner, RunnerConfig

log = structlog.get_logger("stampflow.inference")

SOURCE = "inference"
JOBS = Counter("stampflow_inference_jobs_total", "Generation jobs finished by this worker",
               ["outcome"])
JOBS_IN_FLIGHT = Gauge("stampflow_inference_jobs_in_flight", "Jobs this worker holds")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    jobs_topic: str
    results_topic: str
    max_in_flight: int = 32
    group_id: str = "inference"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace_s: float = 12.0
    shutdown_call_s: float = 3.0

    def runner(self) -> RunnerConfig:
        return RunnerConfig(
            topics=(self.jobs_topic,), max_in_flight=self.max_in_flight,
            group_id=self.group_id, max_message_bytes=self.max_message_bytes,
            shutdown_grace_s=self.shutdown_grace_s, shutdown_call_s=self.shutdown_call_s)


def read_job(raw: bytes, max_bytes: int) -> Envelope | str:
    """The job in a record, or why there is none (one line). Never raises."""
    if len(raw) > max_bytes:
        return f"record of {len(raw)} bytes exceeds the limit of {max_bytes} bytes"
    try:
        envelope = decode(raw)
    except ValidationError as err:
        return one_line(err)
    if not isinstance(envelope.payload, InferenceJob):
        return f"{envelope.event_type} is not an inference.job"
    return envelope


def result_for(job: Envelope, outcome: Outcome, at: datetime) -> Envelope:
    """The ``inference.result`` event for ``job``: one id per job, whoever runs it."""
    payload = job.payload
    assert isinstance(payload, InferenceJob)  # read_job vouched for it
    common = {"workflow_id": payload.workflow_id, "state": payload.state, "seq": payload.seq,
              "started_at": payload.started_at}
    if isinstance(outcome, GenerationSucceeded):
        result = InferenceResult(**common, completed=outcome.result)
    else:
        failed = outcome if isinstance(outcome, EffectFailed) else EffectFailed(
            "invalid_outcome", f"unexpected outcome {type(outcome).__name__}", at)
        result = InferenceResult(
            **common, error_code=storable(failed.error_code, 200) or "inference_failed",
            reason=storable(failed.reason, 2000))
    return envelope_for(
        result, namespace=job.namespace,
        event_id=derive_id(payload.workflow_id, f"result{payload.seq}"),
        correlation_id=job.correlation_id, causation_id=job.event_id, source=SOURCE,
        occurred_at=at)


class InferenceWorker(RecordRunner):
    name = "inference"

    def __init__(
        self,
        *,
        contract: NodeContract,
        config: WorkerConfig,
        consumer_factory: Callable[[ConsumerRebalanceListener], AIOKafkaConsumer],
        publisher: EventPublisher,
        node: InferenceEffectNode,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(contract=contract, config=config.runner(),
                         consumer_factory=consumer_factory, publisher=publisher,
                         in_flight_gauge=JOBS_IN_FLIGHT, clock=clock)
        self.config = config
        self.node = node
        # Results generated but not yet acknowledged, by record: a failed publish is retried
        # without generating the image again.
        self._unsent: dict[tuple[str, int, int], Envelope] = {}

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        key = (record.topic, record.partition, record.offset)
        result = self._unsent.get(key)
        if result is None:
            job = read_job(record.value or b"", self.config.max_message_bytes)
            if isinstance(job, str):
                await self.dead_letter(record, job)
                return
            payload = job.payload
            assert isinstance(payload, InferenceJob)
            outcome = await self.node.generate(
                payload.request, payload.seed, JobOwner(payload.workflow_id, job.namespace))
            result = result_for(job, outcome, self.clock())
            self._unsent[key] = result
            outcome_label = "completed" if isinstance(outcome, GenerationSucceeded) else "failed"
            JOBS.labels(outcome_label).inc()
            log.info("job done", workflow_id=str(payload.workflow_id),
                     namespace=job.namespace, outcome=outcome_label,
                     error_code=getattr(outcome, "error_code", None))
        await self.publisher.send_many(self.config.results_topic,
                                       [(result.key(), result.to_bytes())])
        self._unsent.pop(key, None)
