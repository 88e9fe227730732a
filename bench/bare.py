"""The bare pipeline: what stampflow's stamp path does, with only the libraries it stands on.

Stage 1 (stampflow's orchestrator): a raw ``AIOKafkaConsumer`` reads stamp requests,
``json.loads`` + ``base64`` get the inline content, ``blake3`` hashes it, and a raw
``AIOKafkaProducer`` sends six events per request to the events topic (the same event types,
keys and byte lengths as stampflow's: its own encoded events, used as templates with the ids,
namespace, time and hash filled in). The acknowledgements of a fetched batch are awaited
together, then its offsets are committed.

Stage 2 (stampflow's reducer): a second raw consumer reads the events back, ``json.loads``
each, and writes what stampflow's reducer writes per workflow (one ``workflows`` row, four
``workflow_transitions`` rows, one ``stamps`` row) with asyncpg ``COPY``, one transaction per
fetched batch, into scratch tables created ``LIKE`` the real ones (same columns, constraints
and indexes; no triggers, no row-level security). Then it commits its offsets.

No FSM, no pydantic, no dedup (no ``processed_events``), no aggregates, no retries, no
dead letters, no metrics or logs. Both stages run in this process, on one event loop, as
stampflow's two nodes do in the bench. The consumers and the producer get stampflow's own
client settings (``acks="all"``, 2 ms linger, 50 ms fetch wait, 500 records a poll) so the
broker sees the same traffic shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from blake3 import blake3

from stampflow.bus import FETCH_MAX_WAIT_MS, HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS
from stampflow.contracts.events import new_event_id

# (scratch table, the table whose shape it copies)
SCRATCH = (("bare_workflows", "workflows"), ("bare_transitions", "workflow_transitions"),
           ("bare_stamps", "stamps"))

TRANSITION_COLUMNS = ["workflow_id", "seq", "namespace", "from_state", "to_state", "trigger",
                      "reason", "event_id", "occurred_at"]
WORKFLOW_COLUMNS = ["workflow_id", "namespace", "kind", "state", "seq", "request_id",
                    "created_at", "updated_at", "outcome", "hash", "duration_ms"]
STAMP_COLUMNS = ["namespace", "hash", "algorithm", "size", "content_type", "source",
                 "first_workflow_id", "stamped_at"]


async def create_scratch_tables(url: str) -> None:
    """``bare_*`` tables shaped like the reducer's (the schema must be migrated already)."""
    conn = await asyncpg.connect(url)
    try:
        for scratch, like in SCRATCH:
            await conn.execute(f"DROP TABLE IF EXISTS {scratch}")
            await conn.execute(f"CREATE TABLE {scratch} (LIKE {like} INCLUDING ALL)")
    finally:
        await conn.close()


async def row_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t, _ in SCRATCH}
    finally:
        await conn.close()


async def finished(url: str) -> int:
    """Workflows whose rows are in PostgreSQL (polled like stampflow's aggregates)."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM bare_workflows"))
    finally:
        await conn.close()


def event_templates() -> list[tuple[str, str]]:
    """(event_type, str.format template) for the six events of a completed stamp workflow,
    made from stampflow's own encoding of one, so that lengths and shapes are the same."""
    from stampflow.contracts.events import StampRequested, envelope_for
    from stampflow.contracts.nodes import builtin_contract
    from stampflow.nodes.orchestrator.core import (
        Emit,
        Limits,
        OrchestratorCore,
        StampSucceeded,
    )

    core = OrchestratorCore(builtin_contract("orchestrator"), Limits(1 << 20))
    now = datetime.now(UTC)
    rid = new_event_id()
    digest = blake3(rid.bytes).hexdigest()
    req = envelope_for(StampRequested(content=b"eA=="), namespace="nsz", event_id=rid,
                       correlation_id=rid, causation_id=None, source="bench", occurred_at=now)
    wf, cmds = core.start(req, now)
    assert wf is not None
    _, more = core.step(wf, StampSucceeded(digest, 1024, "application/octet-stream", now, now))
    out = []
    for c in [*cmds, *more]:
        if not isinstance(c, Emit):
            continue
        e = c.envelope
        text = e.to_bytes().decode().replace("{", "{{").replace("}", "}}")
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert stamp in text, (stamp, text)
        for old, new in ((str(e.event_id), "{eid}"), (str(rid), "{rid}"),
                         (str(wf.workflow_id), "{wf}"), (digest, "{digest}"), (stamp, "{ts}"),
                         ('"namespace":"nsz"', '"namespace":"{ns}"')):
            text = text.replace(old, new)
        out.append((e.event_type, text))
    assert [t for t, _ in out].count("workflow.completed") == 1
    return out


def consumer(bootstrap: str, topic: str, group: str, **overrides: Any) -> AIOKafkaConsumer:
    """A raw aiokafka group consumer with the settings stampflow's nodes use."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "group_id": group, "enable_auto_commit": False,
        "auto_offset_reset": "earliest", "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS, "max_poll_records": 500,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "max_partition_fetch_bytes": 4 * 1024 * 1024}
    config.update(overrides)
    return AIOKafkaConsumer(topic, **config)


def producer(bootstrap: str) -> AIOKafkaProducer:
    """A raw aiokafka producer with the settings stampflow's nodes use."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                            compression_type=None, enable_idempotence=False,
                            request_timeout_ms=15_000, max_batch_size=256 * 1024)


@dataclass
class BarePipeline:
    """Both stages; ``async with`` starts the clients, :meth:`joined` waits for the groups."""

    bootstrap: str
    database_url: str
    requests_topic: str
    events_topic: str
    group: str
    requests: int = 0  # requests consumed (stage 1)
    events: int = 0  # events produced (stage 1)
    events_read: int = 0  # events read back (stage 2)
    batches: list[int] = field(default_factory=list)  # stage 2 batch sizes
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> BarePipeline:
        self.templates = event_templates()
        self.pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=1)
        self.producer = producer(self.bootstrap)
        await self.producer.start()
        self.c1 = consumer(self.bootstrap, self.requests_topic, f"{self.group}-orch")
        self.c2 = consumer(self.bootstrap, self.events_topic, f"{self.group}-red")
        await self.c1.start()
        await self.c2.start()
        self._tasks = [asyncio.create_task(self._stage1()), asyncio.create_task(self._stage2())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in (self.c1, self.c2, self.producer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 10)
        await self.pool.close()

    async def joined(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.c1.assignment() and self.c2.assignment()):
            if time.monotonic() > deadline:
                raise TimeoutError("the bare pipeline's consumers did not join their groups")
            for task in self._tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.01)

    def check(self) -> None:
        """Raise what ended a stage, if one ended."""
        for task in self._tasks:
            if task.done():
                task.result()
                raise RuntimeError("a bare pipeline stage returned")

    async def _stage1(self) -> None:
        send, topic, templates = self.producer.send, self.events_topic, self.templates
        while True:
            fetched = await self.c1.getmany(timeout_ms=100)
            deliveries = []
            for records in fetched.values():
                for r in records:
                    req = json.loads(r.value)
                    content = base64.b64decode(req["payload"]["content"])
                    digest = blake3(content).hexdigest()
                    rid, ns = req["event_id"], req["namespace"]
                    wf = str(new_event_id())
                    key = wf.encode()
                    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    for _, template in templates:
                        value = template.format(eid=new_event_id(), rid=rid, wf=wf, digest=digest,
                                                ts=ts, ns=ns).encode()
                        deliveries.append(await send(topic, value=value, key=key))
                    self.requests += 1
            if deliveries:
                await asyncio.gather(*deliveries)
                self.events += len(deliveries)
                await self.c1.commit()

    async def _stage2(self) -> None:
        partial: dict[str, list[Any]] = {}  # workflow id -> [created_at, hash, size]
        while True:
            fetched = await self.c2.getmany(timeout_ms=100, max_records=5000)
            trans, stamps, wfs = [], [], []
            for records in fetched.values():
                for r in records:
                    e = json.loads(r.value)
                    p = e["payload"]
                    kind = p["type"]
                    if kind == "workflow.transitioned":
                        at = datetime.fromisoformat(e["occurred_at"])
                        trans.append((p["workflow_id"], p["seq"], e["namespace"],
                                      p["from_state"], p["to_state"], p["trigger"], None,
                                      e["event_id"], at))
                        if p["seq"] == 1:
                            partial[p["workflow_id"]] = [at, None, p["seq"]]
                        else:
                            partial[p["workflow_id"]][2] = p["seq"]
                    elif kind == "stamp.created":
                        stamps.append((e["namespace"], p["hash"], p["algorithm"], p["size"],
                                       p["content_type"], p["source"], p["workflow_id"],
                                       datetime.fromisoformat(p["stamped_at"])))
                        partial[p["workflow_id"]][1] = p["hash"]
                    elif kind == "workflow.completed":
                        created, digest, seq = partial.pop(p["workflow_id"])
                        wfs.append((p["workflow_id"], e["namespace"], p["workflow_kind"],
                                    "completed", seq, e["correlation_id"], created,
                                    datetime.fromisoformat(e["occurred_at"]), "stamped", digest,
                                    p["duration_ms"]))
                    self.events_read += 1
            if not (trans or stamps or wfs):
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                if trans:
                    await conn.copy_records_to_table("bare_transitions", records=trans,
                                                     columns=TRANSITION_COLUMNS)
                if stamps:
                    await conn.copy_records_to_table("bare_stamps", records=stamps,
                                                     columns=STAMP_COLUMNS)
                if wfs:
                    await conn.copy_records_to_table("bare_workflows", records=wfs,
                                                     columns=WORKFLOW_COLUMNS)
            self.batches.append(len(trans) + len(stamps) + len(wfs))
            await self.c2.commit()


async def drain(bootstrap: str, database_url: str, requests_topic: str, events_topic: str,
                group: str, n: int, *, timeout: float = 600.0,
                profile: Any = None,
                on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Start the bare pipeline on ``n`` waiting requests; the clock runs from the moment both
    consumers joined until PostgreSQL holds every workflow's rows (polled every 50 ms, as
    stampflow's drain is). ``database_url`` must hold the migrated schema. ``profile``: a
    ``cProfile.Profile`` enabled for the drain only; ``on_start`` is called as the clock
    starts."""
    await create_scratch_tables(database_url)
    async with BarePipeline(bootstrap, database_url, requests_topic, events_topic,
                            group) as pipeline:
        await pipeline.joined()
        head_start = pipeline.requests  # taken before stage 2 joined too
        if on_start is not None:
            on_start()
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        stage1 = None  # when stage 1 had every request's events acknowledged
        while await finished(database_url) < n:
            if stage1 is None and pipeline.requests >= n and pipeline.events >= 6 * n:
                stage1 = time.perf_counter() - t0
            pipeline.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bare pipeline finished {await finished(database_url)}"
                                   f" of {n} workflows in {timeout:.0f} s")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        result: dict[str, Any] = {
            "requests": n, "seconds": elapsed, "stamps_per_s": n / elapsed,
            "consumed_before_clock": head_start,
            "first_stage_done_s": stage1 if stage1 is not None else elapsed,
            "consumed": pipeline.requests, "events_produced": pipeline.events,
            "events_read": pipeline.events_read,
            "copy_batch_p50": sorted(pipeline.batches)[len(pipeline.batches) // 2]}
    result["rows"] = await row_counts(database_url)
    return result
