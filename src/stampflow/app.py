"""Wiring: build the nodes from settings and endpoints, and run them until told to stop."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from stampflow.bus import (
    KafkaPublisher,
    ensure_topics,
    make_consumer,
    started_producer,
    topic_retention_ms,
)
from stampflow.connections import connect_options, pool_options
from stampflow.contracts.nodes import IoPolicy, NodeContract, RetryPolicy, load_contracts
from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.migrate import check_current, migrate
from stampflow.nodes import pgerrors
from stampflow.nodes.orchestrator.core import Limits, OrchestratorCore
from stampflow.nodes.orchestrator.runner import Orchestrator, OrchestratorConfig
from stampflow.nodes.reducer.retention import topic_retention_problem
from stampflow.nodes.reducer.runner import Reducer, ReducerConfig
from stampflow.nodes.reducer.store import ReducerStore
from stampflow.nodes.resilience import Stopping, bounded, retry
from stampflow.nodes.stamping import StampingNode
from stampflow.observability import HealthServer, redact
from stampflow.services import Endpoints
from stampflow.settings import Settings

if TYPE_CHECKING:  # the inference node imports torch and diffusers when it runs, and only then
    from stampflow.inference.artifacts import ArtifactStore
    from stampflow.inference.effect import InferenceEffectNode
    from stampflow.inference.worker import InferenceWorker

log = structlog.get_logger("stampflow.app")

# `stampflow run <node>` for each; `stampflow up` and the demo run all three in one process
# (the same code path: the inference node still takes its jobs from the broker).
NODE_NAMES = ("orchestrator", "reducer", "inference")
T = TypeVar("T")


@dataclass
class RunningNodes:
    orchestrators: list[Orchestrator] = field(default_factory=list)
    reducers: list[Reducer] = field(default_factory=list)
    workers: list[InferenceWorker] = field(default_factory=list)
    health: HealthServer | None = None
    console_url: str | None = None  # the operator console's address, when it runs here

    def ready(self) -> bool:
        nodes: Iterable[Orchestrator | Reducer | InferenceWorker] = [
            *self.orchestrators, *self.reducers, *self.workers]
        return all(node.ready for node in nodes) and bool(
            self.orchestrators or self.reducers or self.workers)


async def prepare(settings: Settings, endpoints: Endpoints) -> None:
    """Topics and schema: idempotent, safe for several nodes starting together. With
    ``migrate_on_start`` off, the schema is only checked: a node waits (logging) until
    `stampflow migrate` has run, so its role needs no DDL rights."""
    await ensure_topics(endpoints.bootstrap_servers, settings.topics, settings.topic_partitions,
                        replication_factor=settings.topic_replication_factor,
                        kafka=endpoints.kafka)
    if settings.migrate_on_start:
        await migrate(endpoints.database_url, lock_timeout=settings.migrate_lock_timeout,
                      **connect_options(settings))
    else:
        await check_current(endpoints.database_url, **connect_options(settings))


# A service that cannot be reached *yet*: a node started during an outage (or restarted in
# one) waits for it instead of exiting.
UNREACHABLE: tuple[type[BaseException], ...] = (
    ServiceUnavailable, KafkaError, *pgerrors.UNREACHABLE)
START_RETRY = RetryPolicy(initial_backoff_ms=250, max_backoff_ms=5000, multiplier=2.0)


async def until_ready(what: str, call: Callable[[], Awaitable[T]],
                      stop: asyncio.Event) -> T | None:
    """``call()`` until it succeeds, waiting with a jittered backoff while its service is
    unreachable; None if ``stop`` is set first. Other errors (a bad contract, a migration
    that does not apply) are raised: waiting would not fix them."""

    def waiting(attempt: int, err: BaseException, wait: float) -> None:
        log.warning(f"{what}: a service is unreachable; waiting",
                    error=redact(str(err)) or type(err).__name__, wait_s=round(wait, 2),
                    throttle=True)

    if stop.is_set():
        return None
    try:
        return await retry(call, policy=START_RETRY, transient=UNREACHABLE, stop=stop,
                           forever=True, on_retry=waiting)
    except Stopping:
        return None


def exit_deadline(seconds: float) -> None:
    """The last net under a stopping process: exit after ``seconds`` whatever is still
    running. A daemon thread, so it fires even if the event loop is stuck."""

    def fire() -> None:
        log.error("still running after the stop deadline; exiting now", deadline_s=seconds)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


# The young generation is collected every GC_THRESHOLD container allocations. A node holds
# batches of thousands of envelopes (each a dozen objects), so Python's default of 700 makes the
# collector re-scan the same live batch many times over: bench/README.md, "Garbage collection".
GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """Move everything allocated so far (modules, contracts, clients) out of the collector's
    sight and collect the young generation less often. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def run_nodes(
    settings: Settings,
    endpoints: Endpoints,
    nodes: Sequence[str],
    stop: asyncio.Event,
    *,
    contracts: dict[str, NodeContract] | None = None,
    started: asyncio.Event | None = None,
    running: RunningNodes | None = None,
    console: bool = False,
) -> RunningNodes:
    """Run the named nodes in this process until ``stop`` is set; return when all stopped.
    ``console``: serve the operator console beside them (`stampflow up`, the demo)."""
    unknown = set(nodes) - set(NODE_NAMES)
    if unknown:
        raise ValueError(f"unknown node(s) {sorted(unknown)}; known: {', '.join(NODE_NAMES)}")
    contracts = contracts or load_contracts(settings.contracts_dir)
    running = running or RunningNodes()

    async def prepared() -> bool:
        await prepare(settings, endpoints)
        return True

    if not await until_ready("start-up", prepared, stop):
        return running
    async with AsyncExitStack() as stack:
        def start_producer() -> Awaitable[AIOKafkaProducer]:
            return started_producer(endpoints.bootstrap_servers, kafka=endpoints.kafka,
                                    max_request_size=settings.max_message_bytes)

        producer = await until_ready("producer", start_producer, stop)
        if producer is None:
            return running
        publisher = KafkaPublisher(producer, start_producer)
        stack.push_async_callback(publisher.close)
        tasks: list[asyncio.Task[None]] = []
        if "inference" in nodes:
            inference = build_inference(settings, contracts)
            # Work in progress stops between denoising steps once its job is cancelled.
            stack.push_async_callback(bounded, inference.aclose(), "inference close", 5.0,
                                      log.warning)
            worker = build_worker(settings, endpoints, contracts, publisher, inference)
            running.workers.append(worker)
            tasks.append(asyncio.create_task(worker.run(stop), name="inference"))
        if "orchestrator" in nodes:
            orchestrator = build_orchestrator(settings, endpoints, contracts, publisher)
            running.orchestrators.append(orchestrator)
            tasks.append(asyncio.create_task(orchestrator.run(stop), name="orchestrator"))
        if "reducer" in nodes:
            timeout_s = contracts["reducer"].io_policy.timeout_ms / 1000.0
            pool = await until_ready("database pool", lambda: asyncpg.create_pool(
                endpoints.database_url,
                **pool_options(settings, timeout=10.0, command_timeout=timeout_s)), stop)
            if pool is None:
                return running
            stack.push_async_callback(_close_pool, pool)
            await warn_on_topic_retention(settings, endpoints)
            reducer = build_reducer(settings, endpoints, contracts, publisher, pool)
            running.reducers.append(reducer)
            tasks.append(asyncio.create_task(reducer.run(stop), name="reducer"))
        health = await start_health(running, settings)
        running.health = health
        stack.push_async_callback(bounded, health.stop(), "health server stop", 3.0,
                                  log.warning)
        if console:
            from stampflow.console import start_console

            server = await start_console(settings, endpoints)
            running.console_url = server.url
            stack.push_async_callback(bounded, server.stop(), "console stop", 6.0, log.warning)
        if settings.gc_tuning:
            tune_gc()
        log.info("nodes running", nodes=list(nodes), health_host=settings.http_host,
                 health_port=health.port)
        if started is not None:
            started.set()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return running


async def start_health(running: RunningNodes, settings: Settings) -> HealthServer:
    """/healthz, /readyz and /metrics on ``http_host:http_port``. Several nodes on one
    machine (`stampflow run` each) cannot all have the default port: a node left on the
    default takes any free one and says which; a port set on purpose that is taken is an
    error."""
    health = HealthServer(running.ready, host=settings.http_host, port=settings.http_port)
    try:
        await health.start()
    except OSError as err:
        if "http_port" in settings.model_fields_set or settings.http_port == 0:
            raise StampflowError(f"STAMPFLOW_HTTP_PORT={settings.http_port}: cannot listen on "
                                 f"{settings.http_host}:{settings.http_port}: "
                                 f"{err.strerror or err}") from None
        health = HealthServer(running.ready, host=settings.http_host, port=0)
        await health.start()
        log.warning("the default health port is taken (another node on this machine?); "
                    "listening on another", default=settings.http_port, port=health.port)
    return health


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 3.0)
    except Exception:  # noqa: BLE001 - a database that hangs: drop the connections
        pool.terminate()


def stamping_node(settings: Settings, contracts: dict[str, NodeContract]) -> StampingNode:
    declared = contracts["stamping"].io_policy.max_content_bytes or settings.max_content_bytes
    return StampingNode(settings.content_root,
                        max_bytes=min(settings.max_content_bytes, declared),
                        content_objects=settings.content_objects, s3=settings.s3_options())


def artifact_store(settings: Settings) -> ArtifactStore:
    """Where generated images go: ``artifact_uri`` (file:// or s3://), else ``artifact_root``."""
    from stampflow.inference.artifacts import ArtifactStore

    if settings.artifact_uri is not None:
        return ArtifactStore.from_uri(settings.artifact_uri, s3=settings.s3_options())
    return ArtifactStore(settings.artifact_root)


def build_inference(settings: Settings, contracts: dict[str, NodeContract]) -> InferenceEffectNode:
    """The inference effect node's engine. torch and the model load on first use."""
    from stampflow.inference import InferenceEffectNode, ModelRegistry
    from stampflow.inference.registry import runtime_device

    policy = contracts["inference"].io_policy
    updates: dict[str, object] = {}
    if settings.inference_device is not None:
        updates["device"] = settings.inference_device
    if settings.inference_dtype is not None:
        updates["dtype"] = settings.inference_dtype
    if updates:
        policy = IoPolicy.model_validate({**policy.model_dump(), **updates})
    if policy.device in (None, "auto") and runtime_device(policy.device) == "cpu":
        # Not silent: a GPU worker that lost its GPU would otherwise just be very slow.
        log.warning("no CUDA device: this inference node generates on the CPU in float32; "
                    "set STAMPFLOW_INFERENCE_DEVICE=cpu if that is meant")
    return InferenceEffectNode(
        registry=ModelRegistry(settings.models, device=policy.device, dtype=policy.dtype),
        artifacts=artifact_store(settings),
        stamping=stamping_node(settings, contracts),
        io_policy=policy,
    )


def build_worker(
    settings: Settings, endpoints: Endpoints, contracts: dict[str, NodeContract],
    publisher: KafkaPublisher, inference: InferenceEffectNode,
) -> InferenceWorker:
    """An inference worker: one member of the consumer group of the inference-jobs topic."""
    from stampflow.inference.worker import InferenceWorker, WorkerConfig

    group = f"{settings.consumer_group_prefix}-inference"

    def consumer_factory(listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
        # Generation is slow: a worker holding a full batch must not be thought dead.
        consumer = make_consumer(endpoints.bootstrap_servers, [], group, kafka=endpoints.kafka,
                                 max_poll_interval_ms=600_000)
        consumer.subscribe([settings.jobs_topic], listener=listener)
        return consumer

    return InferenceWorker(
        contract=contracts["inference"],
        config=WorkerConfig(jobs_topic=settings.jobs_topic,
                            results_topic=settings.results_topic,
                            max_in_flight=settings.inference_max_in_flight, group_id=group,
                            max_message_bytes=settings.max_message_bytes),
        consumer_factory=consumer_factory,
        publisher=publisher,
        node=inference,
    )


def build_orchestrator(
    settings: Settings, endpoints: Endpoints, contracts: dict[str, NodeContract],
    publisher: KafkaPublisher,
) -> Orchestrator:
    contract = contracts["orchestrator"]
    stamping = stamping_node(settings, contracts)
    core = OrchestratorCore(contract, Limits.from_contracts(contracts, stamping.max_bytes))
    group = f"{settings.consumer_group_prefix}-orchestrator"

    def consumer_factory(listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
        consumer = make_consumer(endpoints.bootstrap_servers, [], group, kafka=endpoints.kafka)
        consumer.subscribe([settings.requests_topic, settings.results_topic],
                           listener=listener)
        return consumer

    return Orchestrator(
        contract=contract,
        core=core,
        config=OrchestratorConfig(
            requests_topic=settings.requests_topic, events_topic=settings.events_topic,
            jobs_topic=settings.jobs_topic, results_topic=settings.results_topic,
            max_in_flight=settings.max_in_flight, group_id=group,
            # Inline content at its limit, in base64, plus the envelope: anything larger is
            # not a request this node would accept, so it is not parsed at all.
            max_record_bytes=stamping.max_bytes * 4 // 3 + 64 * 1024,
            max_message_bytes=settings.max_message_bytes,
        ),
        consumer_factory=consumer_factory,
        publisher=publisher,
        stamping=stamping,
    )


async def warn_on_topic_retention(settings: Settings, endpoints: Endpoints) -> None:
    """Warn when the events topic may keep a record longer than the history keeps the ids
    that make its re-delivery a no-op. Never stops the node."""
    try:
        retention_ms = await topic_retention_ms(endpoints.bootstrap_servers,
                                                settings.events_topic, kafka=endpoints.kafka)
    except Exception as err:  # noqa: BLE001 - a warning's input; the node goes on
        log.info("could not read the events topic's retention", error=str(err))
        return
    problem = topic_retention_problem(retention_ms, settings.history_retention_days)
    if problem is not None:
        # Not reported (Tansu reports no topic configs): said once, quietly.
        (log.info if retention_ms is None else log.warning)(problem)


def build_reducer(
    settings: Settings, endpoints: Endpoints, contracts: dict[str, NodeContract],
    publisher: KafkaPublisher, pool: asyncpg.Pool,
) -> Reducer:
    contract = contracts["reducer"]
    fsms = {spec.name: spec for spec in contracts["orchestrator"].fsm}
    group = f"{settings.consumer_group_prefix}-reducer"
    batching = contract.io_policy.batching
    consumer = make_consumer(
        endpoints.bootstrap_servers, [settings.events_topic], group,
        max_poll_records=settings.reducer_batch_max, kafka=endpoints.kafka,
    )
    return Reducer(
        contract=contract,
        config=ReducerConfig(
            events_topic=settings.events_topic, group_id=group,
            max_batch_size=settings.reducer_batch_max or batching.max_batch_size,
            max_batch_wait_ms=settings.reducer_batch_wait_ms or batching.max_batch_wait_ms,
            apply_timeout_s=contract.io_policy.timeout_ms / 1000.0,
            max_message_bytes=settings.max_message_bytes,
            retention_days=settings.history_retention_days,
            partitions_ahead=settings.history_partitions_ahead,
            maintenance_interval_s=settings.history_maintenance_interval_s,
        ),
        consumer=consumer,
        store=ReducerStore(pool, fsms),
        publisher=publisher,
    )
