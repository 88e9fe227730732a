"""The reducer's PostgreSQL side: one transaction per batch, one statement per table.

Exactly once: every workflow row carries the ids of the events applied to it
(``workflows.applied_events``), and ``processed_events`` holds the few events that belong to no
workflow. The batch reads both, in the same transaction as every write, and the core skips what
was applied before. A batch delivered again (after a crash between the commit here and the
Kafka offset commit) finds its ids remembered and writes nothing. The bookkeeping is bounded:
it lives in the workflow's row and goes when retention drops the row's partition.

Records are keyed by workflow, so all of a workflow's events lie in one partition of the events
topic. Two reducers see the same records only while a rebalance moves a partition, and then a
transaction lock per (topic, partition), taken first and in a fixed order, makes the second
wait for the first's commit and see its ids. The workflow rows are then locked FOR UPDATE,
which also orders two reducers that meet on an existing workflow by any other path. Not
covered: the same first event of a workflow on two partitions at once, which only a producer
that ignores the key (or a change of the partition count while records are re-delivered)
could cause.

The aggregates are added to, never overwritten; what two reducers could both decide alone is
whether a stamp is new in its namespace: a transaction lock per (namespace, hash), taken in a
fixed order after the partition locks and before the stamps are read, makes the second wait
for the first's commit and see its stamp as a duplicate.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from uuid import UUID

import asyncpg
import blake3

from stampflow.contracts.events import Envelope, storable
from stampflow.contracts.nodes import FsmSpec
from stampflow.nodes.reducer import retention
from stampflow.nodes.reducer.core import ReducerState, WorkflowRow, Writes, reduce, touched


@dataclass(frozen=True, slots=True)
class BatchResult:
    received: int
    applied: int  # new events reduced
    duplicates: int  # events applied before (re-deliveries)
    anomalies: int


class ReducerStore:
    """Persists reduced batches. ``pool`` is an asyncpg pool owned by the caller."""

    def __init__(self, pool: asyncpg.Pool, fsms: Mapping[str, FsmSpec]) -> None:
        self._pool = pool
        self._fsms = fsms

    async def apply(self, events: Sequence[Envelope],
                    sources: Collection[tuple[str, int]] = ()) -> BatchResult:
        """Apply ``events`` once each. ``sources`` are the (topic, partition) pairs they were
        read from: the locks that keep two reducers apart. Without them one lock covers
        everything (correct, but two callers then take turns)."""
        unique: dict[UUID, Envelope] = {}
        for envelope in events:
            unique.setdefault(envelope.event_id, envelope)
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_sources(conn, sources)
            state = await _load_state(conn, list(unique.values()))
            _, writes = reduce(state, unique.values(), self._fsms)
            await _write(conn, writes)
        applied = len(unique) - writes.duplicates
        return BatchResult(len(events), applied, len(events) - applied, len(writes.anomalies))

    async def maintain(self, *, keep_days: int, ahead_days: int) -> retention.Report:
        """One retention run (see :mod:`stampflow.nodes.reducer.retention`)."""
        async with self._pool.acquire() as conn:
            return await retention.maintain(conn, keep_days=keep_days, ahead_days=ahead_days)

    async def set_aside(self, envelope: Envelope, reason: str,
                        sources: Collection[tuple[str, int]] = ()) -> bool:
        """Record that ``envelope`` cannot be stored: its id remembered as an orphan (a
        re-delivery skips it) and an anomaly row with ``reason``, counted in its namespace's
        aggregates. False when it was applied before (nothing written)."""
        workflow_id = getattr(envelope.payload, "workflow_id", None)
        if not isinstance(workflow_id, UUID):
            workflow_id = None
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_sources(conn, sources)
            if await conn.fetchval(
                """
                SELECT EXISTS (SELECT 1 FROM processed_events WHERE event_id = $1)
                    OR EXISTS (SELECT 1 FROM workflows
                               WHERE workflow_id = $2 AND $1 = ANY(applied_events))
                """,
                envelope.event_id, workflow_id,
            ):
                return False
            await conn.execute(
                "INSERT INTO processed_events (event_id, namespace) VALUES ($1, $2)",
                envelope.event_id, envelope.namespace)
            await conn.execute(
                "INSERT INTO anomalies (namespace, workflow_id, event_id, kind, detail) "
                "VALUES ($1, $2, $3, 'unstorable', $4)",
                envelope.namespace, workflow_id,
                envelope.event_id, storable(reason, 2000),
            )
            await conn.execute(
                """
                INSERT INTO namespace_aggregates AS a (namespace, anomalies, first_activity,
                                                       last_activity)
                VALUES ($1, 1, now(), now())
                ON CONFLICT (namespace) DO UPDATE SET anomalies = a.anomalies + 1,
                    first_activity = LEAST(a.first_activity, EXCLUDED.first_activity),
                    last_activity = GREATEST(a.last_activity, EXCLUDED.last_activity)
                """,
                envelope.namespace,  # not the event's own time: it may be what was refused
            )
        return True


# UUIDs in PostgreSQL's order (their bytes, big-endian): a quarter of the cost of sorting by
# UUID.__lt__, which a batch of 5,000 events paid some 80 times per workflow.
_uuid_order = attrgetter("int")

# The first key of the per-source transaction locks. "SG" in ASCII.
SOURCE_LOCK_SPACE = 0x5347


def source_lock(topic: str, partition: int) -> int:
    """The second key of the lock on one (topic, partition): 32 bits of its BLAKE3."""
    raw = blake3.blake3(f"{topic}\x00{partition}".encode()).digest(4)
    return int.from_bytes(raw, "big", signed=True)


async def lock_sources(conn: asyncpg.Connection, sources: Collection[tuple[str, int]]) -> None:
    """Hold, until the transaction ends, the lock of each source (one lock for all when none
    is named), in a fixed order so that two holders never wait for each other in a cycle."""
    keys = sorted({source_lock(t, p) for t, p in sources}) if sources else [0]
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1::int, k) FROM unnest($2::int[]) AS k",
        SOURCE_LOCK_SPACE, keys)


async def _load_state(conn: asyncpg.Connection, events: Sequence[Envelope]) -> ReducerState:
    workflow_ids, hashes = touched(events)
    workflows: dict[UUID, WorkflowRow] = {}
    if workflow_ids:
        rows = await conn.fetch(
            """
            SELECT workflow_id, namespace, kind, state, seq, request_id, created_at, updated_at,
                   outcome, hash, error_code, reason, duration_ms, applied_events, recorded_at
            FROM workflows WHERE workflow_id = ANY($1::uuid[])
            ORDER BY workflow_id FOR UPDATE
            """,
            sorted(workflow_ids, key=_uuid_order),
        )
        for row in rows:
            fields = dict(row)
            fields["applied"] = tuple(fields.pop("applied_events"))
            workflows[row["workflow_id"]] = WorkflowRow(**fields)
    seen_rows = await conn.fetch(
        "SELECT event_id FROM processed_events WHERE event_id = ANY($1::uuid[])",
        [e.event_id for e in events])
    seen = frozenset(row["event_id"] for row in seen_rows)
    known: frozenset[tuple[str, str]] = frozenset()
    if hashes:
        pairs = sorted(hashes)
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1::int, k) FROM unnest($2::int[]) AS k",
            STAMP_LOCK_SPACE, sorted({stamp_lock(ns, digest) for ns, digest in pairs}))
        rows = await conn.fetch(
            """
            SELECT s.namespace, s.hash FROM stamps s
            JOIN unnest($1::text[], $2::text[]) AS k(namespace, hash)
              ON s.namespace = k.namespace AND s.hash = k.hash
            """,
            [p[0] for p in pairs], [p[1] for p in pairs],
        )
        known = frozenset((row["namespace"], row["hash"]) for row in rows)
    return ReducerState(workflows=workflows, known_stamps=known, seen=seen)


# The first key of the stamps' transaction locks (two-int advisory locks: a space of their
# own, apart from the migration's one-bigint lock). "SF" in ASCII.
STAMP_LOCK_SPACE = 0x5346


def stamp_lock(namespace: str, digest: str) -> int:
    """The second key of the lock on one (namespace, hash): 32 bits of its BLAKE3. Two pairs
    sharing a key only wait for each other."""
    raw = blake3.blake3(f"{namespace}\x00{digest}".encode()).digest(4)
    return int.from_bytes(raw, "big", signed=True)


_WORKFLOW_COLUMNS = ("workflow_id", "namespace", "kind", "state", "seq", "request_id",
                     "created_at", "updated_at", "outcome", "hash", "error_code", "reason",
                     "duration_ms", "applied_events", "recorded_at")
_TRANSITION_COLUMNS = ("workflow_id", "seq", "namespace", "from_state", "to_state", "trigger",
                       "reason", "event_id", "occurred_at")


async def _stage(conn: asyncpg.Connection, table: str, columns: Sequence[str],
                 records: list[tuple[object, ...]]) -> str:
    """COPY ``records`` into a temporary table shaped like ``table``'s ``columns`` that lives
    until the transaction ends (safe behind PgBouncer's transaction pooling); its name."""
    staged = f"stampflow_staged_{table}"
    await conn.execute(
        f"CREATE TEMP TABLE {staged} ON COMMIT DROP AS "  # noqa: S608 - fixed names only
        f"SELECT {', '.join(columns)} FROM {table} WITH NO DATA")
    await conn.copy_records_to_table(staged, records=records, columns=list(columns))
    return staged


async def _write(conn: asyncpg.Connection, writes: Writes) -> None:
    if writes.stamps:
        s = sorted(writes.stamps, key=lambda r: (r.namespace, r.hash))
        await conn.execute(
            """
            INSERT INTO stamps (namespace, hash, algorithm, size, content_type, source,
                                first_workflow_id, stamped_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                 $6::text[], $7::uuid[], $8::timestamptz[])
            ON CONFLICT (namespace, hash) DO NOTHING
            """,
            [r.namespace for r in s], [r.hash for r in s], [r.algorithm for r in s],
            [r.size for r in s], [r.content_type for r in s], [r.source for r in s],
            [r.first_workflow_id for r in s], [r.stamped_at for r in s],
        )
    if writes.workflows:
        # COPY into a temporary table, then one INSERT ... SELECT: about 0.75x the time of
        # unnest() arrays for these rows, and the applied ids travel as real arrays. A stored
        # row keeps its partition key (recorded_at); a new one takes the database's clock.
        w = [writes.workflows[k] for k in sorted(writes.workflows, key=_uuid_order)]
        staged = await _stage(conn, "workflows", _WORKFLOW_COLUMNS, [
            (r.workflow_id, r.namespace, r.kind, r.state, r.seq, r.request_id, r.created_at,
             r.updated_at, r.outcome, r.hash, r.error_code, r.reason, r.duration_ms,
             list(r.applied), r.recorded_at) for r in w])
        await conn.execute(
            f"""
            INSERT INTO workflows ({", ".join(_WORKFLOW_COLUMNS)})
            SELECT workflow_id, namespace, kind, state, seq, request_id, created_at, updated_at,
                   outcome, hash, error_code, reason, duration_ms, applied_events,
                   coalesce(recorded_at, now())
            FROM {staged}
            ON CONFLICT (workflow_id, recorded_at) DO UPDATE SET
                state = EXCLUDED.state, seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at,
                outcome = EXCLUDED.outcome, hash = EXCLUDED.hash,
                error_code = EXCLUDED.error_code, reason = EXCLUDED.reason,
                duration_ms = EXCLUDED.duration_ms, applied_events = EXCLUDED.applied_events
            """  # noqa: S608 - fixed names only
        )
    if writes.orphans:
        o = sorted(writes.orphans, key=lambda pair: pair[0].int)
        await conn.execute(
            """
            INSERT INTO processed_events (event_id, namespace)
            SELECT * FROM unnest($1::uuid[], $2::text[])
            ON CONFLICT DO NOTHING
            """,
            [e for e, _ in o], [ns for _, ns in o],
        )
    if writes.generations:
        g = writes.generations
        await conn.execute(
            """
            INSERT INTO generations (workflow_id, namespace, artifact_uri, hash, size, seed,
                width, height, steps, model, device, batch_size, compute_seconds,
                prompt_tokens, truncated_tokens, negative_prompt_ignored, created_at,
                prompt, negative_prompt)
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                 $6::bigint[], $7::int[], $8::int[], $9::int[], $10::text[],
                                 $11::text[], $12::int[], $13::float8[], $14::int[],
                                 $15::int[], $16::bool[], $17::timestamptz[], $18::text[],
                                 $19::text[])
            ON CONFLICT DO NOTHING
            """,
            [r.workflow_id for r in g], [r.namespace for r in g], [r.artifact_uri for r in g],
            [r.hash for r in g], [r.size for r in g], [r.seed for r in g], [r.width for r in g],
            [r.height for r in g], [r.steps for r in g], [r.model for r in g],
            [r.device for r in g], [r.batch_size for r in g], [r.compute_seconds for r in g],
            [r.prompt_tokens for r in g], [r.truncated_tokens for r in g],
            [r.negative_prompt_ignored for r in g], [r.created_at for r in g],
            [r.prompt for r in g], [r.negative_prompt for r in g],
        )
    if writes.transitions:
        # COPY and INSERT ... SELECT: about half the time of unnest() for the most numerous
        # rows. No ON CONFLICT: the applied ids decide what is new, and a collision here would
        # be a bug to see (the batch is bisected and the event set aside), not to hide.
        staged = await _stage(conn, "workflow_transitions", _TRANSITION_COLUMNS, [
            (r.workflow_id, r.seq, r.namespace, r.from_state, r.to_state, r.trigger, r.reason,
             r.event_id, r.occurred_at) for r in writes.transitions])
        columns = ", ".join(_TRANSITION_COLUMNS)
        await conn.execute(
            f"INSERT INTO workflow_transitions ({columns}) SELECT {columns} FROM {staged}")  # noqa: S608
    if writes.anomalies:
        a = writes.anomalies
        await conn.execute(
            """
            INSERT INTO anomalies (namespace, workflow_id, event_id, kind, detail)
            SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
            """,
            [r.namespace for r in a], [r.workflow_id for r in a], [r.event_id for r in a],
            [r.kind for r in a], [r.detail for r in a],
        )
    if writes.state_counts:
        keys = sorted(k for k, v in writes.state_counts.items() if v != 0)
        if keys:
            await conn.execute(
                """
                INSERT INTO namespace_state_counts AS c (namespace, kind, state, count)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                ON CONFLICT (namespace, kind, state) DO UPDATE SET count = c.count + EXCLUDED.count
                """,
                [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                [writes.state_counts[k] for k in keys],
            )
    if writes.aggregates:
        names = sorted(writes.aggregates)
        d = [writes.aggregates[n] for n in names]
        await conn.execute(
            """
            INSERT INTO namespace_aggregates AS a (namespace, workflows, completed, failed,
                duplicates, stamps, total_bytes, generations, total_pixels, compute_seconds,
                anomalies, first_activity, last_activity)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
                                 $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[],
                                 $9::bigint[], $10::float8[], $11::bigint[],
                                 $12::timestamptz[], $13::timestamptz[])
            ON CONFLICT (namespace) DO UPDATE SET
                workflows = a.workflows + EXCLUDED.workflows,
                completed = a.completed + EXCLUDED.completed,
                failed = a.failed + EXCLUDED.failed,
                duplicates = a.duplicates + EXCLUDED.duplicates,
                stamps = a.stamps + EXCLUDED.stamps,
                total_bytes = a.total_bytes + EXCLUDED.total_bytes,
                generations = a.generations + EXCLUDED.generations,
                total_pixels = a.total_pixels + EXCLUDED.total_pixels,
                compute_seconds = a.compute_seconds + EXCLUDED.compute_seconds,
                anomalies = a.anomalies + EXCLUDED.anomalies,
                first_activity = LEAST(a.first_activity, EXCLUDED.first_activity),
                last_activity = GREATEST(a.last_activity, EXCLUDED.last_activity)
            """,
            names, [x.workflows for x in d], [x.completed for x in d], [x.failed for x in d],
            [x.duplicates for x in d], [x.stamps for x in d], [x.total_bytes for x in d],
            [x.generations for x in d], [x.total_pixels for x in d],
            [x.compute_seconds for x in d], [x.anomalies for x in d],
            [x.first_activity for x in d], [x.last_activity for x in d],
        )
