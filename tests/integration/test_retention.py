"""Retention of the history tables on a real PostgreSQL: day partitions made and dropped whole,
the aggregates still adding up, rows in the default partition moved, row-level security on
new partitions, and the upgrade from one row per event keeping re-deliveries out."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from stampflow.migrate import default_migrations_dir, migrate
from stampflow.nodes.orchestrator.core import Limits, OrchestratorCore
from stampflow.nodes.reducer import retention
from stampflow.nodes.reducer.store import ReducerStore
from stampflow.queries import create_role
from stampflow.testing.stack import fetch, reconcile
from tests.integration.test_operators import ROLE_PASSWORD, as_role, cli
from tests.integration.test_reducer_concurrency import FSMS, ORCH, stamp_workflow

pytestmark = pytest.mark.integration


def _today() -> datetime:
    return datetime.now(UTC)


async def _apply(url: str, namespace: str, n: int) -> int:
    core = OrchestratorCore(ORCH, Limits(max_content_bytes=10))
    events = [e for _ in range(n) for e in stamp_workflow(core, namespace, os.urandom(32).hex())]
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        result = await ReducerStore(pool, FSMS).apply(events, {("events", 0)})
    finally:
        await pool.close()
    return result.applied


async def _counts(url: str) -> dict[str, int]:
    rows = await fetch(url, """
        SELECT (SELECT count(*) FROM workflows) AS workflows,
               (SELECT count(*) FROM workflow_transitions) AS transitions,
               (SELECT count(*) FROM workflows_default) AS in_default,
               (SELECT coalesce(sum(count), 0) FROM namespace_state_counts) AS state_counts,
               (SELECT coalesce(sum(workflows), 0) FROM namespace_aggregates) AS counted,
               (SELECT coalesce(sum(workflows), 0) FROM namespace_retired) AS retired""")
    return {k: int(v) for k, v in rows[0].items()}


async def _maintain(url: str, **kw: object) -> retention.Report:
    conn = await asyncpg.connect(url)
    try:
        return await retention.maintain(conn, **kw)  # type: ignore[arg-type]
    finally:
        await conn.close()


async def test_expired_partitions_are_dropped_whole_and_the_aggregates_still_add_up(
    fresh_database_url: str,
) -> None:
    url = fresh_database_url
    await migrate(url)
    assert await _apply(url, "a", 40) == 40 * 6
    assert await _apply(url, "b", 10) == 10 * 6
    first = await _maintain(url, keep_days=30, ahead_days=2)
    # today is still the old partition's (it covers everything before tomorrow)
    assert len(first.created) == 2 * len(retention.HISTORY_TABLES)
    assert not first.dropped
    before = await _counts(url)
    assert before["workflows"] == before["counted"] == before["state_counts"] == 50

    later = (_today() + timedelta(days=45)).date()
    report = await _maintain(url, keep_days=30, ahead_days=1, today=later)
    assert {p.split("_until_")[0] for p in report.dropped if "_until_" in p} == set(
        retention.HISTORY_TABLES)
    after = await _counts(url)
    # The rows went with their partitions; what they held is in namespace_retired.
    assert (after["workflows"], after["transitions"], after["state_counts"]) == (0, 0, 0)
    assert after["counted"] == after["retired"] == 50
    assert await reconcile(url) == []

    # Work goes on: today's rows have no day partition now (it was dropped as expired), so
    # they wait in the default partition, and are moved when today's partition is made again.
    assert await _apply(url, "a", 5) == 5 * 6
    assert (await _counts(url))["in_default"] == 5
    again = await _maintain(url, keep_days=30, ahead_days=0)
    assert again.moved >= 5 + 5 * 4  # workflows and their transitions
    final = await _counts(url)
    assert (final["workflows"], final["in_default"]) == (5, 0)
    assert final["counted"] == 55
    assert await reconcile(url) == []
    # The anomalies' id sequence outlived the old partition that once owned it.
    await fetch(url, "INSERT INTO anomalies (namespace, event_id, kind, detail) "
                     "VALUES ('a', gen_random_uuid(), 'test', 'x')")


async def test_a_second_maintenance_session_stands_aside(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    holder = await asyncpg.connect(fresh_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", *retention.MAINTENANCE_LOCK)
        assert (await _maintain(fresh_database_url, keep_days=1)).skipped
    finally:
        await holder.close()
    assert not (await _maintain(fresh_database_url, keep_days=1)).skipped


async def test_a_limited_role_reads_only_its_namespace_from_a_new_partition(
    fresh_database_url: str,
) -> None:
    url = fresh_database_url
    await migrate(url)
    await _maintain(url, keep_days=30, ahead_days=0)
    # Rows recorded on a day that has a partition of its own (tomorrow's, made ahead).
    tomorrow = (_today() + timedelta(days=1)).date()
    await _maintain(url, keep_days=30, ahead_days=0, today=tomorrow)
    name = retention.day_name("workflows", tomorrow)
    await fetch(url, f"""
        INSERT INTO {name} (workflow_id, namespace, kind, state, seq, request_id, created_at,
                            updated_at, recorded_at)
        SELECT gen_random_uuid(), ns, 'stamp', 'completed', 4, gen_random_uuid(), now(), now(),
               '{tomorrow.isoformat()}T12:00:00Z'
        FROM unnest(ARRAY['mine', 'theirs']) AS ns""")
    await create_role(url, "limited_reader", ["mine"], ROLE_PASSWORD)
    # GRANT SELECT ON ALL TABLES reached the partition itself: its own policy must hold.
    conn = await asyncpg.connect(as_role(url, "limited_reader"))
    try:
        direct = await conn.fetch(f"SELECT namespace FROM {name}")
        through_parent = await conn.fetch("SELECT namespace FROM workflows")
    finally:
        await conn.close()
    assert [r["namespace"] for r in direct] == ["mine"]
    assert [r["namespace"] for r in through_parent] == ["mine"]


async def test_events_applied_before_the_upgrade_are_not_applied_again(
    fresh_database_url: str, tmp_path: Path,
) -> None:
    """A database written by the one-row-per-event reducer (schema 3), upgraded: a batch the
    old reducer applied, re-delivered after the upgrade, must change nothing."""
    url = fresh_database_url
    old = tmp_path / "migrations"
    old.mkdir()
    for path in sorted(default_migrations_dir().glob("000[123]_*.sql")):
        shutil.copy(path, old / path.name)
    await migrate(url, old)
    core = OrchestratorCore(ORCH, Limits(max_content_bytes=10))
    events = [e for _ in range(20) for e in stamp_workflow(core, "up", os.urandom(32).hex())]
    # What the old reducer left: every id in processed_events (its rows are not needed here:
    # the bookkeeping alone must stop the re-delivery).
    await fetch(url, "INSERT INTO processed_events (event_id, namespace) "
                     "SELECT unnest($1::uuid[]), 'up'", [e.event_id for e in events])
    assert await migrate(url) == [4, 5]
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        result = await ReducerStore(pool, FSMS).apply(events, {("events", 0)})
    finally:
        await pool.close()
    assert (result.applied, result.duplicates) == (0, len(events))
    assert (await _counts(url))["workflows"] == 0


async def test_the_retention_command_shows_what_is_due_and_applies_it(
    fresh_database_url: str,
) -> None:
    await migrate(fresh_database_url)
    shown = cli("retention", database_url=fresh_database_url)
    assert shown.returncode == 0, shown.stderr
    assert "workflows_default" in shown.stdout and "due: make" in shown.stdout
    assert not (await _maintain(fresh_database_url, keep_days=30, ahead_days=0)).skipped
    applied = cli("retention", "--apply", database_url=fresh_database_url,
                  STAMPFLOW_HISTORY_PARTITIONS_AHEAD="5")
    assert applied.returncode == 0, applied.stderr
    assert "made" in applied.stdout
    names = {p.name for p in await _partitions(fresh_database_url)}
    ahead = (_today() + timedelta(days=5)).date()
    assert retention.day_name("workflows", ahead) in names
    again = cli("retention", database_url=fresh_database_url,
                STAMPFLOW_HISTORY_PARTITIONS_AHEAD="5")
    assert "nothing due" in again.stdout, again.stdout


async def _partitions(url: str) -> list[retention.Partition]:
    conn = await asyncpg.connect(url)
    try:
        return await retention.partitions(conn)
    finally:
        await conn.close()


@pytest.mark.parametrize("bad", ["G" * 64, "a" * 63, "A" * 64, "a" * 63 + "\n", "a" * 65])
async def test_the_cheaper_hash_check_refuses_what_the_regex_refused(
    fresh_database_url: str, bad: str,
) -> None:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "INSERT INTO stamps (namespace, hash, size, content_type, first_workflow_id, "
            "stamped_at) VALUES ('a', $1, 1, 'x', gen_random_uuid(), now())", "a" * 64)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO stamps (namespace, hash, size, content_type, first_workflow_id, "
                "stamped_at) VALUES ('a', $1, 1, 'x', gen_random_uuid(), now())", bad)
    finally:
        await conn.close()


async def test_maintenance_gives_way_to_a_busy_table_and_leaves_nothing_half_made(
    fresh_database_url: str,
) -> None:
    """A reducer's transaction holds the default partition: maintenance must fail within its
    lock timeout (not stall the reducers behind it), make nothing, and let the next run go on."""
    url = fresh_database_url
    await migrate(url)
    before = {p.name for p in await _partitions(url)}
    holder = await asyncpg.connect(url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE workflows_default IN ROW EXCLUSIVE MODE")
        conn = await asyncpg.connect(url)
        try:
            t0 = datetime.now(UTC)
            with pytest.raises(asyncpg.LockNotAvailableError):
                await retention.maintain(conn, keep_days=30, ahead_days=2, lock_timeout_ms=300)
            assert (datetime.now(UTC) - t0).total_seconds() < 5
            assert {p.name for p in await _partitions(url)} == before
            assert await conn.fetchval(  # the maintenance lock went with the failed run
                "SELECT pg_try_advisory_lock($1, $2)", *retention.MAINTENANCE_LOCK)
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *retention.MAINTENANCE_LOCK)
        finally:
            await conn.close()
        await tx.rollback()
    finally:
        await holder.close()
    report = await _maintain(url, keep_days=30, ahead_days=2)
    assert len(report.created) == 2 * len(retention.HISTORY_TABLES)
