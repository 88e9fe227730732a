"""Every query the console runs. Each takes the *operator's* connection
(stampflow.console.access): row-level security filters every row by namespace, so nothing
here filters for access itself, and a row another role may not see is simply not found.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from stampflow.console.filters import Cursor, WorkflowFilter

Row = dict[str, Any]

_WORKFLOW_COLUMNS = ("workflow_id, namespace, kind, state, outcome, hash, error_code, reason, "
                     "seq, created_at, updated_at, duration_ms")


def _rows(records: list[asyncpg.Record]) -> list[Row]:
    return [dict(r) for r in records]


async def namespaces(conn: asyncpg.Connection) -> list[str]:
    """The namespaces this role sees (for the filters' choices)."""
    return [r[0] for r in await conn.fetch(
        "SELECT namespace FROM namespace_aggregates ORDER BY namespace")]


async def summary(conn: asyncpg.Connection) -> list[Row]:
    return _rows(await conn.fetch("SELECT * FROM namespace_summary ORDER BY namespace"))


async def activity_span(conn: asyncpg.Connection) -> tuple[datetime | None, datetime | None]:
    row = await conn.fetchrow("SELECT min(first_activity), max(last_activity) "
                              "FROM namespace_aggregates")
    return (row[0], row[1]) if row is not None else (None, None)


async def activity(conn: asyncpg.Connection, bucket: timedelta, since: datetime) -> list[Row]:
    """Workflows created, and of those failed, per namespace and time bucket since ``since``."""
    return _rows(await conn.fetch(
        "SELECT namespace, date_bin($1::interval, created_at, timestamptz 'epoch') AS bucket, "
        "count(*) AS created, count(*) FILTER (WHERE state = 'failed') AS failed "
        "FROM workflows WHERE created_at >= $2 GROUP BY 1, 2 ORDER BY 1, 2",
        bucket, since))


def _where(f: WorkflowFilter, args: list[Any]) -> list[str]:
    conditions = []
    for column, value in (("namespace", f.namespace), ("kind", f.kind), ("state", f.state),
                          ("outcome", f.outcome)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    if f.since is not None:
        args.append(f.since)
        conditions.append(f"created_at >= ${len(args)}")
    if f.until is not None:
        args.append(f.until)
        conditions.append(f"created_at < ${len(args)}")
    return conditions


async def workflows(conn: asyncpg.Connection, f: WorkflowFilter, after: Cursor | None,
                    limit: int) -> list[Row]:
    """A page, newest first, after ``after`` (keyset: index workflows_*created_keyset);
    ``limit + 1`` rows at most, so the caller knows whether there is a next page."""
    args: list[Any] = []
    return await _page(conn, f"SELECT {_WORKFLOW_COLUMNS} FROM workflows",
                       _where(f, args), args, after, limit)


async def _page(conn: asyncpg.Connection, select: str, conditions: list[str], args: list[Any],
                after: Cursor | None, limit: int) -> list[Row]:
    """``select`` under ``conditions``, newest first, after ``after`` (keyset on created_at,
    workflow_id); ``limit + 1`` rows at most, so the caller knows whether there is a next
    page."""
    if after is not None:
        args += [after.created_at, after.workflow_id]
        conditions.append(f"(created_at, workflow_id) < (${len(args) - 1}, ${len(args)})")
    args.append(limit + 1)
    where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
    return _rows(await conn.fetch(
        f"{select} {where}ORDER BY created_at DESC, workflow_id DESC LIMIT ${len(args)}", *args))


async def newer_workflows(conn: asyncpg.Connection, f: WorkflowFilter, than: Cursor,
                          limit: int) -> list[Row]:
    """Workflows that sort before ``than`` (created later): what live updates add on top,
    newest first."""
    args: list[Any] = []
    conditions = _where(f, args)
    args += [than.created_at, than.workflow_id]
    conditions.append(f"(created_at, workflow_id) > (${len(args) - 1}, ${len(args)})")
    args.append(limit)
    rows = _rows(await conn.fetch(
        f"SELECT {_WORKFLOW_COLUMNS} FROM workflows WHERE {' AND '.join(conditions)} "
        f"ORDER BY created_at, workflow_id LIMIT ${len(args)}", *args))
    return rows[::-1]


async def workflow(conn: asyncpg.Connection, workflow_id: UUID) -> Row | None:
    row = await conn.fetchrow(f"SELECT {_WORKFLOW_COLUMNS} FROM workflows "
                              "WHERE workflow_id = $1", workflow_id)
    return dict(row) if row is not None else None


async def transitions(conn: asyncpg.Connection, workflow_id: UUID) -> list[Row]:
    return _rows(await conn.fetch(
        "SELECT seq, from_state, to_state, trigger, reason, occurred_at, recorded_at "
        "FROM workflow_transitions WHERE workflow_id = $1 ORDER BY seq", workflow_id))


async def stamp(conn: asyncpg.Connection, namespace: str, hash_hex: str) -> Row | None:
    row = await conn.fetchrow("SELECT * FROM stamps WHERE namespace = $1 AND hash = $2",
                              namespace, hash_hex)
    return dict(row) if row is not None else None


async def generation(conn: asyncpg.Connection, workflow_id: UUID) -> Row | None:
    row = await conn.fetchrow("SELECT * FROM generations WHERE workflow_id = $1", workflow_id)
    return dict(row) if row is not None else None


async def images(conn: asyncpg.Connection, namespace: str | None, after: Cursor | None,
                 limit: int) -> list[Row]:
    """Generated images, newest first (keyset on created_at, workflow_id); limit + 1 rows."""
    args: list[Any] = [] if namespace is None else [namespace]
    conditions = [] if namespace is None else ["namespace = $1"]
    return await _page(
        conn, "SELECT workflow_id, namespace, hash, size, seed, width, height, steps, model, "
        "compute_seconds, created_at FROM generations", conditions, args, after, limit)


async def image_visible(conn: asyncpg.Connection, hash_hex: str) -> bool:
    """Is there a generated image with this hash in a namespace this role sees?"""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM generations WHERE hash = $1)", hash_hex))


async def failures(conn: asyncpg.Connection, namespace: str | None, limit: int) -> list[Row]:
    return _rows(await conn.fetch(
        "SELECT namespace, workflow_id, kind, error_code, reason, updated_at "
        "FROM recent_failures WHERE $1::text IS NULL OR namespace = $1 "
        "ORDER BY updated_at DESC, workflow_id DESC LIMIT $2", namespace, limit))


async def anomalies(conn: asyncpg.Connection, namespace: str | None, limit: int) -> list[Row]:
    return _rows(await conn.fetch(
        "SELECT id, namespace, workflow_id, event_id, kind, detail, recorded_at "
        "FROM anomalies WHERE $1::text IS NULL OR namespace = $1 "
        "ORDER BY recorded_at DESC, id DESC LIMIT $2", namespace, limit))


async def may_replay(conn: asyncpg.Connection) -> bool:
    """May this role claim dead letters in dlq_replays (a member of stampflow_replay, or the
    owner)? PostgreSQL enforces it again when the replay inserts its claim."""
    return bool(await conn.fetchval(
        "SELECT to_regclass('dlq_replays') IS NOT NULL "
        "AND has_table_privilege(current_user, 'dlq_replays', 'INSERT')"))


async def replays(conn: asyncpg.Connection, dlq_topic: str) -> dict[tuple[int, int], Row]:
    """Earlier replays of the letters of ``dlq_topic``, by (partition, offset)."""
    rows = await conn.fetch(
        'SELECT partition, "offset", replayed_to, replayed_at, by_role, times '
        "FROM dlq_replays WHERE dlq_topic = $1", dlq_topic)
    return {(r["partition"], r["offset"]): dict(r) for r in rows}
