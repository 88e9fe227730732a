"""What operators see: the CLI over PostgreSQL, row-level security per namespace."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from stampflow.bus import ensure_topics, make_producer
from stampflow.migrate import LOCK_KEY, default_migrations_dir, discover
from stampflow.nodes.deadletter import dead_letter
from stampflow.services import EmbeddedPostgres
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    finished_count,
    read_topic,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.integration


def cli(*args: str, database_url: str, bootstrap: str = "", topic_prefix: str = "stampflow",
        stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STAMPFLOW_SERVICES="external", STAMPFLOW_DATABASE_URL=database_url,
               STAMPFLOW_BOOTSTRAP_SERVERS=bootstrap, STAMPFLOW_TOPIC_PREFIX=topic_prefix,
               COLUMNS="200", **extra)
    return subprocess.run([sys.executable, "-m", "stampflow", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


ROLE_PASSWORD = "op-secret"  # every server asks for it (the embedded one too)


def as_role(url: str, role: str) -> str:
    scheme, rest = url.split("://", 1)
    hostpart = rest.split("@", 1)[-1]
    return f"{scheme}://{role}:{ROLE_PASSWORD}@{hostpart}"


async def test_a_namespace_role_sees_only_its_namespace(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings, endpoints) as stack:
        for ns in ("tenant_a", "tenant_b"):
            for i in range(3):
                await stack.client.submit_stamp(ns, content=f"{ns} {i}".encode())
        await wait_for(lambda: _at_least(fresh_database_url, 6), 60, "6 workflows")

    role = f"op_{topic_prefix}"
    made = cli("roles", "create", role, "-n", "tenant_a", "--password-stdin",
               database_url=fresh_database_url, stdin=f"{ROLE_PASSWORD}\n")
    assert made.returncode == 0, made.stderr
    assert ROLE_PASSWORD not in made.stdout + made.stderr
    mine = as_role(fresh_database_url, role)

    status = cli("status", database_url=mine)
    assert status.returncode == 0, status.stderr
    assert "tenant_a" in status.stdout
    assert "tenant_b" not in status.stdout
    everything = cli("status", database_url=fresh_database_url)
    assert "tenant_a" in everything.stdout and "tenant_b" in everything.stdout

    workflows = cli("workflows", database_url=mine)
    assert workflows.returncode == 0, workflows.stderr
    assert "tenant_b" not in workflows.stdout and workflows.stdout.count("tenant_a") == 3

    conn = await asyncpg.connect(mine)
    try:
        for table in ("stamps", "workflows", "workflow_transitions", "namespace_aggregates",
                      "namespace_summary", "workflow_overview"):
            seen = {r[0] for r in await conn.fetch(f"SELECT DISTINCT namespace FROM {table}")}
            assert seen == {"tenant_a"}, table
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE namespace_aggregates SET stamps = 0")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM stamps")
    finally:
        await conn.close()


async def test_workflow_history_and_verify_through_the_cli(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    doc = tmp_path / "doc.txt"
    doc.write_text("stamp me")
    other = tmp_path / "other.txt"
    other.write_text("never submitted")
    async with running_stack(settings, endpoints) as stack:
        submitted = cli("submit", "stamp", str(doc), "-n", "cli", database_url=fresh_database_url,
                        bootstrap=endpoints.bootstrap_servers, topic_prefix=topic_prefix)
        assert submitted.returncode == 0, submitted.stderr
        await wait_for(lambda: _at_least(fresh_database_url, 1), 60, "the workflow")
        del stack
    ok = cli("verify", str(doc), "-n", "cli", database_url=fresh_database_url)
    assert ok.returncode == 0 and "STAMPED" in ok.stdout, ok.stdout + ok.stderr
    missing = cli("verify", str(other), "-n", "cli", database_url=fresh_database_url)
    assert missing.returncode == 1 and "NOT STAMPED" in missing.stdout
    listed = cli("workflows", "-n", "cli", "-s", "completed", database_url=fresh_database_url)
    workflow_id = next(tok for tok in listed.stdout.split() if tok.count("-") == 4)
    history = cli("workflow", workflow_id, database_url=fresh_database_url)
    assert history.returncode == 0, history.stderr
    for state in ("received", "hashing", "stamped", "completed"):
        assert state in history.stdout
    bad = cli("workflow", "not-a-uuid", database_url=fresh_database_url)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "not a workflow id" in bad.stderr


def test_unreachable_database_is_one_clear_line() -> None:
    result = cli("status", database_url="postgresql://u:s3cret@127.0.0.1:1/db")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "127.0.0.1:1" in line and "PostgreSQL" in line
    assert "s3cret" not in result.stderr


async def _at_least(url: str, n: int) -> bool:
    return await finished_count(url) >= n


def test_two_concurrent_migrate_commands_apply_each_migration_once(
    fresh_database_url: str,
) -> None:
    env = dict(os.environ, STAMPFLOW_SERVICES="external",
               STAMPFLOW_DATABASE_URL=fresh_database_url)
    procs = [subprocess.Popen([sys.executable, "-m", "stampflow", "migrate"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied = sorted(out.strip() for out, _ in outputs)
    assert applied[0] == "applied 0 migration(s)", applied  # the second waited, then found none
    shipped = [m.version for m in discover(default_migrations_dir())]
    assert applied[1].startswith(f"applied {len(shipped)} migration(s)"), applied

    async def applied_rows() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            rows = await conn.fetch(
                "SELECT version, count(*) FROM schema_migrations GROUP BY 1 ORDER BY 1")
        finally:
            await conn.close()
        return [(r[0], r[1]) for r in rows]

    assert asyncio.run(applied_rows()) == [(v, 1) for v in shipped]


async def test_dlq_list_and_replay_through_the_cli(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    poison = b"\xff not even utf-8"
    async with running_stack(settings, endpoints) as stack:
        await stack.client.publish_raw(poison, b"ns")
        await stack.client.submit_stamp("ns", content=b"fine")
        await wait_for(lambda: _at_least(fresh_database_url, 1), 60, "the valid workflow")
        env = {"database_url": fresh_database_url, "bootstrap": endpoints.bootstrap_servers,
               "topic_prefix": topic_prefix}
        listed = await asyncio.to_thread(cli, "dlq", "list", **env)  # type: ignore[arg-type]
        assert listed.returncode == 0, listed.stderr
        assert "1 dead letter(s)" in listed.stdout
        assert f"{settings.requests_topic}[" in listed.stdout
        replayed = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests",  # type: ignore[arg-type]
                                           **env)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1 dead letter(s)" in replayed.stdout
        # Still poison: the orchestrator dead-letters the replayed copy too.
        from stampflow.dlq import read_dead_letters

        async def count(n: int) -> bool:
            return len(await read_dead_letters(endpoints.bootstrap_servers,
                                               settings.requests_topic, idle_s=0.5)) == n

        await wait_for(lambda: count(2), 30, "the replayed copy to be dead-lettered again")
        letters = await read_dead_letters(endpoints.bootstrap_servers, settings.requests_topic)
        assert [d.value for d in letters] == [poison, poison]
        assert letters[0].offset != letters[1].offset  # the copy came from a new offset
        # Replaying everything again sends only the new copy: the dead-letter topic grows by
        # one letter per replay, it does not double.
        again = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests",  # type: ignore[arg-type]
                                        **env)
        assert again.returncode == 0, again.stderr
        assert "replayed 1 dead letter(s)" in again.stdout and "skipped 1" in again.stdout
        await wait_for(lambda: count(3), 30, "the second copy to be dead-lettered")
        await asyncio.sleep(1)
        assert await count(3)
        missing = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests",  # type: ignore[arg-type]
                                          "--offset", "9:999", **env)
        assert missing.returncode == 1 and "no such dead letter" in missing.stderr


async def _forge_dead_letter(bootstrap: str, dlq: str, *, topic: str, value: bytes,
                             error: str = "bad", node: str = "orchestrator") -> None:
    await ensure_topics(bootstrap, [dlq], 1)
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(dlq, dead_letter(
            topic=topic, partition=0, offset=7, key=b"ns", value=value, error=error, node=node,
            at=datetime.now(UTC)))
    finally:
        await producer.stop()


async def test_dlq_replay_goes_only_to_the_named_topic_and_once(
    services: Services, fresh_database_url: str, topic_prefix: str,
) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    env = {"database_url": fresh_database_url, "bootstrap": bootstrap,
           "topic_prefix": topic_prefix}
    requests, elsewhere = f"{topic_prefix}.requests.v1", f"{topic_prefix}.elsewhere.v1"
    await ensure_topics(bootstrap, [requests, elsewhere], 1)
    assert cli("migrate", **env).returncode == 0  # type: ignore[arg-type]
    # A dead letter names its own origin; whoever could write it chose that name.
    await _forge_dead_letter(bootstrap, f"{requests}.dlq", topic=elsewhere, value=b"payload")

    unnamed = await asyncio.to_thread(cli, "dlq", "replay", **env)  # type: ignore[arg-type]
    assert unnamed.returncode == 2, unnamed.stdout + unnamed.stderr
    assert "--to" in unnamed.stderr

    first = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests", **env)  # type: ignore[arg-type]
    assert first.returncode == 0, first.stderr
    assert f"replayed 1 dead letter(s) to {requests}" in first.stdout
    assert [r.value for r in await read_topic(bootstrap, requests, 1)] == [b"payload"]
    assert await read_topic(bootstrap, elsewhere, 1, timeout=3) == []

    second = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests", **env)  # type: ignore[arg-type]
    assert second.returncode == 0, second.stderr
    assert "replayed 0 dead letter(s)" in second.stdout
    assert "0:0: replayed before" in second.stdout and "--force" in second.stdout
    assert len(await read_topic(bootstrap, requests, 2, timeout=3)) == 1

    forced = await asyncio.to_thread(cli, "dlq", "replay", "--to", "requests", "--force",  # type: ignore[arg-type]
                                     **env)
    assert forced.returncode == 0, forced.stderr
    assert "replayed 1 dead letter(s)" in forced.stdout
    assert len(await read_topic(bootstrap, requests, 2)) == 2

    conn = await asyncpg.connect(fresh_database_url)
    try:
        rows = [dict(r) for r in await conn.fetch("SELECT * FROM dlq_replays")]
    finally:
        await conn.close()
    assert len(rows) == 1
    assert (rows[0]["dlq_topic"], rows[0]["partition"], rows[0]["offset"]) == (
        f"{requests}.dlq", 0, 0)
    assert rows[0]["replayed_to"] == requests
    assert rows[0]["by_role"] == urlsplit(fresh_database_url).username
    assert rows[0]["times"] == 2


MARKUP = "[/x] [link=http://e]x[/link] [bold]b"


async def test_text_from_the_data_is_printed_literally_never_as_markup(
    services: Services, fresh_database_url: str, topic_prefix: str,
) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    env = {"database_url": fresh_database_url, "bootstrap": bootstrap,
           "topic_prefix": topic_prefix}
    assert cli("migrate", **env).returncode == 0  # type: ignore[arg-type]
    wid, now = uuid.uuid4(), datetime.now(UTC)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "INSERT INTO workflows (workflow_id, namespace, kind, state, seq, request_id, "
            "outcome, error_code, reason, created_at, updated_at) "
            "VALUES ($1, 'acme', 'stamp', 'failed', 2, $1, 'failed', $2, $3, $4, $4)",
            wid, "[/x]", MARKUP, now)
        await conn.execute(
            "INSERT INTO workflow_transitions (workflow_id, seq, namespace, from_state, "
            "to_state, trigger, reason, event_id, occurred_at) "
            "VALUES ($1, 1, 'acme', NULL, 'failed', $2, $3, $1, $4)", wid, "[/x]", MARKUP, now)
    finally:
        await conn.close()
    await _forge_dead_letter(bootstrap, f"{topic_prefix}.requests.v1.dlq",
                             topic=f"{topic_prefix}.requests.v1", value=b"[/x]",
                             error=MARKUP, node="[/x]")
    for args in (("workflows",), ("workflow", str(wid)), ("dlq", "list")):
        done = await asyncio.to_thread(cli, *args, **env)  # type: ignore[arg-type]
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert MARKUP in done.stdout, (args, done.stdout)
        assert "\x1b]8;" not in done.stdout  # no terminal hyperlink either


async def test_a_namespace_role_cannot_take_the_migration_lock(
    services: Services, fresh_database_url: str,
) -> None:
    if not isinstance(services.postgres, EmbeddedPostgres):
        pytest.skip("the advisory-lock functions are revoked from PUBLIC by the embedded "
                    "bootstrap, which has the rights to")
    assert cli("migrate", database_url=fresh_database_url).returncode == 0
    made = cli("roles", "create", "op_nolock", "-n", "acme", "--password-stdin",
               database_url=fresh_database_url, stdin=ROLE_PASSWORD)
    assert made.returncode == 0, made.stderr
    limited = await asyncpg.connect(as_role(fresh_database_url, "op_nolock"))
    try:
        for function in ("pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_xact_lock",
                         "pg_try_advisory_xact_lock", "pg_advisory_lock_shared",
                         "pg_advisory_unlock_all"):
            args = "()" if function.endswith("_all") else "($1)"
            params = () if function.endswith("_all") else (LOCK_KEY,)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await limited.execute(f"SELECT {function}{args}", *params)
    finally:
        await limited.close()
    owner = await asyncpg.connect(fresh_database_url)
    try:
        assert await owner.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY) is True
    finally:
        await owner.close()


def test_migrate_gives_up_on_a_held_lock_with_one_line(fresh_database_url: str) -> None:
    async def hold() -> tuple[asyncpg.Connection, int]:
        conn = await asyncpg.connect(fresh_database_url,
                                     server_settings={"application_name": "blocker"})
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        return conn, conn.get_server_pid()

    loop = asyncio.new_event_loop()
    try:
        holder, pid = loop.run_until_complete(hold())
        started = time.monotonic()
        done = cli("migrate", database_url=fresh_database_url,
                   STAMPFLOW_MIGRATE_LOCK_TIMEOUT="1")
        assert time.monotonic() - started < 20
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert f"pid {pid}" in done.stderr and "blocker" in done.stderr
        loop.run_until_complete(holder.close())
    finally:
        loop.close()
