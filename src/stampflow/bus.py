"""Kafka wiring shared by every node: topics, producers and consumers.

Everything here works on the embedded broker (Tansu) as well as on Kafka, so it stays
inside what Tansu supports:
- no idempotent producer and no transactions: correctness comes from idempotent consumers;
- consumers start from committed offsets, falling back to the *earliest* offset, never
  "latest" (Tansu answers ListOffsets "latest" wrongly), and never seek to the end;
- topics are created with their final partition count (no create_partitions, alter_configs
  or delete_records);
- joining a group takes about half the session timeout on Tansu, hence 6 s sessions;
- Tansu numbers a group's first generation 0, for which aiokafka never sends LeaveGroup, so
  the next member waited for the departed one's session to expire (join took ~11 s, not ~3 s):
  ``GroupConsumer.stop`` leaves the group in that case too.
Callers may override any setting for a real Kafka cluster.

Every client built here takes ``kafka`` (:class:`stampflow.connections.KafkaOptions`: TLS and
SASL, from settings for external brokers; plaintext when omitted). The generation-0 LeaveGroup
workaround is Tansu's alone: it applies only while ``kafka.tansu`` is true (the embedded
broker's options; external endpoints turn it off).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from stampflow.connections import PLAINTEXT, KafkaOptions
from stampflow.errors import ServiceUnavailable, StampflowError

log = structlog.get_logger("stampflow.bus")

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 500
MAX_POLL_RECORDS = 500
FETCH_MAX_WAIT_MS = 50
_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(bootstrap: str, topics: Sequence[str], partitions: int,
                        *, replication_factor: int = 1, kafka: KafkaOptions | None = None,
                        timeout: float = 10.0) -> list[str]:
    """Create the topics that are missing, with ``partitions`` partitions and
    ``replication_factor`` replicas each, and return their names. Safe when several nodes do
    it at once; an existing topic keeps its partition count and replicas."""
    if partitions < 1:
        raise StampflowError(f"topics need at least 1 partition, not {partitions}")
    if replication_factor < 1:
        raise StampflowError(f"topics need at least 1 replica, not {replication_factor}")
    options = kafka or PLAINTEXT
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout * 1000),
                                **options.client_kwargs())
    try:
        try:
            await admin.start()
            existing = set(await admin.list_topics())
        except (TimeoutError, KafkaConnectionError, OSError) as err:
            if options.uses_ssl and (why := await tls_problem(bootstrap, options)):
                # Not an outage: waiting would not make the certificate trusted.
                raise StampflowError(f"Kafka broker at {bootstrap}: TLS failed: {why} (check "
                                     "STAMPFLOW_KAFKA_SSL_CAFILE and the broker's "
                                     "certificate)") from None
            raise ServiceUnavailable("Kafka broker", bootstrap,
                                     " ".join(str(err).split()) or type(err).__name__) from None
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(t, partitions, replication_factor) for t in missing])
            for name, code, message in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise StampflowError(f"topic {name} on the Kafka broker at {bootstrap} "
                                         f"could not be created: {message or f'error {code}'}")
        return missing
    except KafkaError as err:
        raise StampflowError(f"topics on the Kafka broker at {bootstrap} could not be "
                             f"created: {err}") from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def topic_retention_ms(bootstrap: str, topic: str, *, kafka: KafkaOptions | None = None,
                             timeout: float = 5.0) -> int | None:
    """The topic's ``retention.ms`` as the broker reports it (-1: kept forever), or None when
    the broker reports no such entry (Tansu reports none)."""
    options = kafka or PLAINTEXT
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout * 1000),
                                **options.client_kwargs())
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"retention.ms": None})])
        for response in responses:
            for resource in response.resources:
                for entry in resource[4]:  # (name, value, read_only, ...) per config entry
                    if entry[0] == "retention.ms" and entry[1] is not None:
                        return int(entry[1])
        return None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def tls_problem(bootstrap: str, kafka: KafkaOptions, timeout: float = 5.0) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails with ``kafka``'s TLS
    settings (a certificate that does not verify, a name that does not match), or None when it
    succeeds or the server cannot be reached at all (that is an outage, not a TLS problem)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]") or "localhost"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, int(port), ssl=kafka.ssl_context(), server_hostname=host), timeout)
    except ssl.SSLCertVerificationError as err:
        return " ".join((err.verify_message or str(err)).split())
    except ssl.SSLError as err:
        return " ".join((err.reason or str(err)).split())
    except (OSError, TimeoutError, ValueError):
        return None
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return None


async def started_producer(bootstrap: str, *, kafka: KafkaOptions | None = None,
                           **overrides: Any) -> AIOKafkaProducer:
    """:func:`make_producer`, started; stopped again (briefly) if it cannot start."""
    producer = make_producer(bootstrap, kafka=kafka, **overrides)
    try:
        await producer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 3.0)
        raise
    return producer


def _sender_died(producer: AIOKafkaProducer) -> BaseException | None:
    """What ended the producer's background sender, if it ended. aiokafka ends it on an error
    it did not expect (aio-libs/aiokafka#907); every send fails from then on, for good."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if task is None or not task.done():
        return None
    return task.exception() if not task.cancelled() else asyncio.CancelledError()


class KafkaPublisher:
    """:class:`nodes.publishing.EventPublisher` over an aiokafka producer. A producer whose
    sender has died is replaced by a fresh one from ``start_producer`` (without it, every
    record would be retried against a dead producer for ever); the replacement's own failure
    to start is a :class:`KafkaConnectionError`, retried by the caller like any other."""

    def __init__(self, producer: AIOKafkaProducer,
                 start_producer: Callable[[], Awaitable[AIOKafkaProducer]] | None = None,
                 ) -> None:
        self._producer = producer
        self._start = start_producer
        self._lock = asyncio.Lock()
        self._retired: set[asyncio.Task[None]] = set()
        self.replaced = 0

    async def _live(self) -> AIOKafkaProducer:
        producer = self._producer
        if self._start is None or (cause := _sender_died(producer)) is None:
            return producer
        async with self._lock:
            if self._producer is producer:  # not replaced by another caller meanwhile
                log.error("the Kafka producer's sender stopped; starting a new producer",
                          cause=repr(cause))
                try:
                    self._producer = await self._start()
                except KafkaError:
                    raise
                except (OSError, TimeoutError) as err:
                    raise KafkaConnectionError(f"a new producer could not start: {err!r}"
                                               ) from err
                self.replaced += 1
                retire = asyncio.create_task(_stop_quietly(producer))
                self._retired.add(retire)
                retire.add_done_callback(self._retired.discard)
        return self._producer

    async def send(self, topic: str, value: bytes, key: bytes | None) -> None:
        producer = await self._live()
        delivery = await producer.send(topic, value=value, key=key)
        await delivery

    async def send_many(self, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
        """Sent in order, awaited together: one partition keeps the order they were sent in.
        If one cannot even be queued (too large), the ones queued before it are still awaited,
        then that error is raised; otherwise the first delivery error is."""
        producer = await self._live()
        deliveries: list[asyncio.Future[Any]] = []
        refused: KafkaError | None = None
        for key, value in messages:
            try:
                deliveries.append(await producer.send(topic, value=value, key=key))
            except KafkaError as err:
                refused = err
                break
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        if refused is not None:
            raise refused
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self, timeout: float = 3.0) -> None:
        """Stop the producer (what it holds is flushed, for at most ``timeout``)."""
        await _stop_quietly(self._producer, timeout)
        if self._retired:
            await asyncio.wait(self._retired, timeout=timeout)


async def _stop_quietly(producer: AIOKafkaProducer, timeout: float = 3.0) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout)
    except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - on the way out
        log.warning("producer stop did not finish", error=repr(err))


def make_producer(bootstrap: str, *, kafka: KafkaOptions | None = None,
                  **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for every replica (``acks="all"``), batches for 2 ms and does
    not compress. Idempotence stays off: Tansu does not support it."""
    config: dict[str, Any] = {
        **(kafka or PLAINTEXT).client_kwargs(),
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 2,
        "compression_type": None,
        "enable_idempotence": False,
        "request_timeout_ms": 15_000,
        "max_batch_size": 256 * 1024,
    }
    config.update(overrides)
    return AIOKafkaProducer(**config)


class GroupConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """An AIOKafkaConsumer that, with ``tansu=True``, leaves its group on stop() even in
    generation 0 (Tansu numbers a group's first generation 0). This reaches into aiokafka's
    coordinator (0.13 and later), so it stays off for any other broker."""

    def __init__(self, *topics: str, tansu: bool = False, **config: Any) -> None:
        super().__init__(*topics, **config)
        self.tansu = tansu

    async def stop(self) -> None:
        coordinator = getattr(self, "_coordinator", None)
        leave = getattr(coordinator, "_maybe_leave_group", None)
        if self.tansu and isinstance(coordinator, GroupCoordinator) and leave is not None:

            async def leave_even_generation_zero() -> None:
                member = coordinator.member_id
                if (coordinator.generation == 0 and member  # "" is "no member id"
                        and coordinator._group_instance_id is None):
                    with contextlib.suppress(KafkaError):
                        await coordinator._send_req(
                            LeaveGroupRequest(coordinator.group_id, member))
                    coordinator.reset_generation()
                else:
                    await leave()

            coordinator._maybe_leave_group = leave_even_generation_zero
        await super().stop()


def make_consumer(bootstrap: str, topics: Sequence[str], group_id: str, *,
                  max_poll_records: int = MAX_POLL_RECORDS,
                  session_timeout_ms: int = SESSION_TIMEOUT_MS,
                  heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
                  kafka: KafkaOptions | None = None,
                  **overrides: Any) -> GroupConsumer:
    """A group consumer that commits by hand (``await consumer.commit()`` after the work is
    durable) and starts from the committed offset, else the earliest one. ``kafka``: how to
    reach the broker (plaintext, and Tansu's workaround, when omitted)."""
    options = kafka or PLAINTEXT
    config: dict[str, Any] = {
        **options.client_kwargs(),
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": heartbeat_interval_ms,
        "max_poll_records": max_poll_records,
        "max_poll_interval_ms": 300_000,
        "isolation_level": "read_uncommitted",
        # Tansu holds a fetch for this long before answering, data or not: it sets the
        # latency floor per hop. Measured at 100/300/500 req/s end to end (p99): 100 ms gave
        # 102/168/307 ms, 50 ms 56/117/147 ms, 20 ms 42/148/497 ms (fetches spin under load).
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    config.update(overrides)
    return GroupConsumer(*topics, tansu=options.tansu, **config)


__all__ = [
    "HEARTBEAT_INTERVAL_MS",
    "GroupConsumer",
    "SESSION_TIMEOUT_MS",
    "KafkaError",
    "KafkaPublisher",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "started_producer",
]
