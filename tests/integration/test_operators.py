"""What operators see: the CLI over PostgreSQL, row-level security per namespace."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.integration.stack import finished_count, running_stack, settings_for, wait_for

pytestmark = pytest.mark.integration


def cli(*args: str, database_url: str, bootstrap: str = "",
        topic_prefix: str = "stampflow") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STAMPFLOW_SERVICES="external", STAMPFLOW_DATABASE_URL=database_url,
               STAMPFLOW_BOOTSTRAP_SERVERS=bootstrap, STAMPFLOW_TOPIC_PREFIX=topic_prefix,
               COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "stampflow", *args], env=env,
                          capture_output=True, text=True, timeout=60)


ROLE_PASSWORD = "op-secret"  # the embedded server trusts; a container's asks for it


def as_role(url: str, role: str) -> str:
    scheme, rest = url.split("://", 1)
    hostpart = rest.split("@", 1)[-1]
    return f"{scheme}://{role}:{ROLE_PASSWORD}@{hostpart}"


async def test_a_namespace_role_sees_only_its_namespace(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings, endpoints) as stack:
        for ns in ("tenant_a", "tenant_b"):
            for i in range(3):
                await stack.client.submit_stamp(ns, content=f"{ns} {i}".encode())
        await wait_for(lambda: _at_least(fresh_database_url, 6), 60, "6 workflows")

    role = f"op_{topic_prefix}"
    made = cli("roles", "create", role, "-n", "tenant_a", "--password", ROLE_PASSWORD,
               database_url=fresh_database_url)
    assert made.returncode == 0, made.stderr
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
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
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
    assert applied[1].startswith("applied 2 migration(s)"), applied

    async def applied_rows() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            rows = await conn.fetch(
                "SELECT version, count(*) FROM schema_migrations GROUP BY 1 ORDER BY 1")
        finally:
            await conn.close()
        return [(r[0], r[1]) for r in rows]

    assert asyncio.run(applied_rows()) == [(1, 1), (2, 1)]


async def test_dlq_list_and_replay_through_the_cli(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
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
        replayed = await asyncio.to_thread(cli, "dlq", "replay", **env)  # type: ignore[arg-type]
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1 dead letter(s)" in replayed.stdout
        # Still poison: the orchestrator dead-letters the replayed copy too.
        from stampflow.dlq import read_dead_letters

        async def two() -> bool:
            return len(await read_dead_letters(endpoints.bootstrap_servers,
                                               settings.requests_topic, idle_s=0.5)) == 2

        await wait_for(two, 30, "the replayed copy to be dead-lettered again")
        letters = await read_dead_letters(endpoints.bootstrap_servers, settings.requests_topic)
        assert [d.value for d in letters] == [poison, poison]
        assert letters[0].offset != letters[1].offset  # the copy came from a new offset
        missing = await asyncio.to_thread(cli, "dlq", "replay", "--offset", "9:999",  # type: ignore[arg-type]
                                          **env)
        assert missing.returncode == 1 and "no such dead letter" in missing.stderr
