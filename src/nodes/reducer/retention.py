"""Retention of the history tables: a partition per day, made ahead; old ones dropped whole.

The history tables (``workflows``, ``workflow_transitions``, ``generations``, ``anomalies``,
``processed_events``) are partitioned by the day (UTC) the database recorded a row. Day
partitions are named ``<table>_dYYYYMMDD``; the rows that existed when the schema became
partitioned lie in ``<table>_until_YYYYMMDD`` (everything before that day), and
``<table>_default`` takes a row that no day partition covers yet.

:func:`plan` (pure) decides from the partitions that exist, today's date and the settings
which day partitions to make (today and ``ahead_days`` after it, and any day the default
partition holds rows of) and which to drop (every partition whose last day ended
``keep_days`` or more before today). :func:`maintain` carries the plan out:

- A partition is made by moving the default partition's rows of that day into a new table and
  attaching it, in one transaction, so nothing is ever lost or left behind in the default.
- A partition is dropped in one transaction that first adds what it held to
  ``namespace_retired`` (and takes its workflows out of ``namespace_state_counts``), so the
  aggregates still add up (``stampflow check``), then drops it. No row is deleted.

Why this stays exactly once: a workflow's applied event ids live in its own row, so they go
when its partition goes. An event re-delivered after that would be taken for new. The events
topic must therefore keep records for less time than the history is kept; the reducer reads
the topic's ``retention.ms`` when it starts and warns when it is not shorter
(:func:`topic_retention_problem`).

Every DDL statement runs with a short ``lock_timeout``: a busy table makes maintenance give way
and try again at its next run, instead of stalling the reducers behind it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import asyncpg

# Table -> the column it is partitioned by.
HISTORY_TABLES: dict[str, str] = {
    "workflows": "recorded_at",
    "workflow_transitions": "recorded_at",
    "generations": "recorded_at",
    "anomalies": "recorded_at",
    "processed_events": "processed_at",
}

# What a dropped partition of each table adds to namespace_retired (column -> expression).
_RETIRE: dict[str, dict[str, str]] = {
    "workflows": {
        "workflows": "count(*)",
        "completed": "count(*) FILTER (WHERE state = 'completed')",
        "failed": "count(*) FILTER (WHERE state = 'failed')",
        "duplicates": "count(*) FILTER (WHERE outcome = 'duplicate')",
    },
    "generations": {
        "generations": "count(*)",
        "total_pixels": "coalesce(sum(width::bigint * height), 0)",
        "compute_seconds": "coalesce(sum(compute_seconds), 0)",
    },
    "anomalies": {"anomalies": "count(*)"},
}

# The session-level advisory lock one maintenance run holds, so that several reducers do not
# run it at once ("SR" in ASCII, and 1).
MAINTENANCE_LOCK = (0x5352, 1)
DEFAULT_LOCK_TIMEOUT_MS = 2000

_NAME = re.compile(r"^(?P<table>[a-z_]+?)_(?:(?P<kind>d|until_)(?P<day>\d{8})|default)$")


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    table: str
    name: str
    first: date | None  # first day it covers; None: from the beginning
    end: date | None  # the day after the last it covers; None for the default partition

    @property
    def is_default(self) -> bool:
        return self.end is None

    def covers(self, day: date) -> bool:
        if self.end is None:
            return False
        return (self.first is None or self.first <= day) and day < self.end


def parse(table: str, name: str) -> Partition | None:
    """The partition that ``name`` names, or None for a name retention did not make."""
    found = _NAME.match(name)
    if found is None or found["table"] != table:
        return None
    if found["kind"] is None:
        return Partition(table, name, None, None)
    day = datetime.strptime(found["day"], "%Y%m%d").date()
    if found["kind"] == "d":
        return Partition(table, name, day, day + timedelta(days=1))
    return Partition(table, name, None, day)


def day_name(table: str, day: date) -> str:
    return f"{table}_d{day:%Y%m%d}"


@dataclass(frozen=True, slots=True)
class Plan:
    create: tuple[tuple[str, date], ...]  # (table, day)
    drop: tuple[Partition, ...]

    @property
    def empty(self) -> bool:
        return not self.create and not self.drop


def plan(
    partitions: Iterable[Partition],
    today: date,
    *,
    keep_days: int,
    ahead_days: int,
    default_days: dict[str, set[date]] | None = None,
) -> Plan:
    """What to make and what to drop. ``keep_days`` 0 keeps everything; ``default_days``
    are the days each table's default partition holds rows of. Pure."""
    by_table: dict[str, list[Partition]] = {t: [] for t in HISTORY_TABLES}
    for p in partitions:
        if p.table in by_table:
            by_table[p.table].append(p)
    cutoff = today - timedelta(days=keep_days) if keep_days > 0 else None
    create: list[tuple[str, date]] = []
    drop: list[Partition] = []
    for table, existing in by_table.items():
        wanted = {today + timedelta(days=i) for i in range(ahead_days + 1)}
        wanted |= (default_days or {}).get(table, set())
        made: list[Partition] = []
        for day in sorted(wanted):
            if not any(p.covers(day) for p in existing):
                create.append((table, day))
                made.append(Partition(table, day_name(table, day), day,
                                      day + timedelta(days=1)))
        if cutoff is not None:
            # A day the default partition held rows of, older than the cutoff, is made and
            # then dropped at once: its rows are retired like any other expired day's.
            drop.extend(p for p in sorted(existing + made)
                        if p.end is not None and p.end <= cutoff)
    return Plan(tuple(create), tuple(drop))


def topic_retention_problem(retention_ms: int | None, keep_days: int) -> str | None:
    """Why the events topic's retention (``retention.ms``; None: not reported) may break
    exactly-once with ``keep_days`` of history, or None when it cannot."""
    if keep_days <= 0:
        return None  # history kept forever: every id stays remembered
    if retention_ms is None:
        return (f"the broker does not report the events topic's retention.ms; make sure it is "
                f"shorter than the {keep_days} days of history kept "
                "(STAMPFLOW_HISTORY_RETENTION_DAYS)")
    keep_ms = keep_days * 86_400_000
    if retention_ms < 0 or retention_ms >= keep_ms:
        kept = "forever" if retention_ms < 0 else f"{retention_ms / 86_400_000:g} days"
        return (f"the events topic keeps records {kept}, the history only {keep_days} days "
                "(STAMPFLOW_HISTORY_RETENTION_DAYS): an event re-delivered after its "
                "workflow's partition was dropped would be applied again")
    return None


def _at(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


async def partitions(conn: asyncpg.Connection) -> list[Partition]:
    rows = await conn.fetch(
        """
        SELECT parent.relname AS parent, child.relname AS child
        FROM pg_inherits i
        JOIN pg_class parent ON parent.oid = i.inhparent
        JOIN pg_class child ON child.oid = i.inhrelid
        JOIN pg_namespace n ON n.oid = parent.relnamespace
        WHERE n.nspname = current_schema() AND parent.relname = ANY($1::text[])
        """,
        list(HISTORY_TABLES),
    )
    found = (parse(r["parent"], r["child"]) for r in rows)
    return sorted(p for p in found if p is not None)


async def default_days(conn: asyncpg.Connection) -> dict[str, set[date]]:
    """The days (UTC) each default partition holds rows of: normally none."""
    out: dict[str, set[date]] = {}
    for table, key in HISTORY_TABLES.items():
        rows = await conn.fetch(
            f"SELECT DISTINCT (({key} AT TIME ZONE 'UTC')::date) AS day "  # noqa: S608
            f'FROM "{table}_default"')
        out[table] = {r["day"] for r in rows}
    return out


async def create_partition(conn: asyncpg.Connection, table: str, day: date,
                           lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> int:
    """Make ``table``'s partition of ``day``, moving the default partition's rows of that
    day into it. Returns how many rows moved."""
    key, name = HISTORY_TABLES[table], day_name(table, day)
    lo, hi = _at(day), _at(day + timedelta(days=1))
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        await conn.execute("SET LOCAL stampflow.moving_partition = 'on'")
        await conn.execute(f'LOCK TABLE "{table}_default" IN ACCESS EXCLUSIVE MODE')
        await conn.execute(
            f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
        moved = await conn.execute(
            f'WITH moved AS (DELETE FROM "{table}_default" '  # noqa: S608
            f"WHERE {key} >= $1 AND {key} < $2 RETURNING *) "
            f'INSERT INTO "{name}" SELECT * FROM moved', lo, hi)
        await conn.execute(
            f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" '
            f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')")
        await conn.execute(f'ALTER TABLE "{name}" ENABLE ROW LEVEL SECURITY')
        await conn.execute(
            f'CREATE POLICY namespace_isolation ON "{name}" USING (EXISTS ('
            "SELECT 1 FROM namespace_grants g "
            f'WHERE g.role_name = current_user AND g.namespace = "{name}".namespace))')
    return int(moved.split()[-1])


async def drop_partition(conn: asyncpg.Connection, partition: Partition,
                         lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
    """Drop ``partition``, adding what it held to ``namespace_retired`` first."""
    table, name = partition.table, partition.name
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        await conn.execute(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE')
        retire = _RETIRE.get(table)
        if retire:
            columns = ", ".join(retire)
            await conn.execute(
                f"INSERT INTO namespace_retired AS r (namespace, {columns}) "  # noqa: S608
                f"SELECT namespace, {', '.join(retire.values())} "
                f'FROM "{name}" GROUP BY namespace '
                "ON CONFLICT (namespace) DO UPDATE SET "
                + ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in retire))
        if table == "workflows":
            await conn.execute(
                "UPDATE namespace_state_counts c SET count = c.count - x.n "  # noqa: S608
                "FROM (SELECT namespace, kind, state, count(*) AS n "
                f'FROM "{name}" GROUP BY namespace, kind, state) x '
                "WHERE c.namespace = x.namespace AND c.kind = x.kind AND c.state = x.state")
        await conn.execute(f'DROP TABLE "{name}"')


@dataclass(frozen=True, slots=True)
class Report:
    created: tuple[str, ...]
    dropped: tuple[str, ...]
    moved: int  # rows moved out of default partitions
    skipped: bool  # another session was maintaining


async def maintain(conn: asyncpg.Connection, *, keep_days: int, ahead_days: int = 3,
                   today: date | None = None,
                   lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> Report:
    """Make the partitions the plan wants and drop the expired ones. One session at a time
    (a session-level advisory lock, tried, not waited for); ``conn`` must not be inside a
    transaction. A lock timeout ends the run with the error; the next run goes on."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *MAINTENANCE_LOCK):
        return Report((), (), 0, True)
    try:
        day = today or datetime.now(UTC).date()
        wanted = plan(await partitions(conn), day, keep_days=keep_days, ahead_days=ahead_days,
                      default_days=await default_days(conn))
        created: list[str] = []
        moved = 0
        for table, d in wanted.create:
            moved += await create_partition(conn, table, d, lock_timeout_ms)
            created.append(day_name(table, d))
        for p in wanted.drop:
            await drop_partition(conn, p, lock_timeout_ms)
        return Report(tuple(created), tuple(p.name for p in wanted.drop), moved, False)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", *MAINTENANCE_LOCK)
