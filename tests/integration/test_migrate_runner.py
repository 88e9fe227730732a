"""migrate() and status() against a real PostgreSQL: order, idempotence, races, failure, drift."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

import stampflow.migrate
from stampflow.errors import ServiceUnavailable
from stampflow.migrate import (
    LOCK_KEY,
    MigrationError,
    default_migrations_dir,
    discover,
    migrate,
    status,
)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- helpers ---------------------------------------------------------------------------------

# 0002 is deliberately not idempotent (plain CREATE TABLE / INSERT): running it twice fails.
MIGRATIONS = {
    "0001_init.sql": "CREATE TABLE things (id int PRIMARY KEY, label text NOT NULL);\n",
    "0002_more.sql": (
        "CREATE TABLE t (id int PRIMARY KEY);\n"
        "INSERT INTO t VALUES (1);\n"
        "SELECT pg_sleep(0.3);  -- keep the lock held while a rival waits\n"
    ),
    "0005_index.sql": "CREATE INDEX things_label ON things (label);\n",
}


def _write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


async def _applied_rows(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(row["version"], row["name"]) for row in rows]
    finally:
        await conn.close()


async def _fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


# The folder that holds the imported stampflow package (src/ in a checkout).
STAMPFLOW_ROOT = str(Path(stampflow.migrate.__file__).resolve().parent.parent)

ALL_ROWS = [(1, "init"), (2, "more"), (5, "index")]


# --- tests -----------------------------------------------------------------------------------


async def test_applies_in_order_then_second_run_is_noop(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)

    assert await migrate(fresh_database_url, directory) == [1, 2, 5]
    assert await _applied_rows(fresh_database_url) == ALL_ROWS
    assert await _fetchval(fresh_database_url, "SELECT count(*) FROM t") == 1
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('things_label')") is not None

    assert await migrate(fresh_database_url, directory) == []
    assert await _applied_rows(fresh_database_url) == ALL_ROWS


async def test_new_file_applies_on_the_next_run(fresh_database_url: str, tmp_path: Path) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    assert await migrate(fresh_database_url, directory) == [1, 2, 5]

    _write_migrations(directory, {"0006_extra.sql": "ALTER TABLE things ADD COLUMN n int;"})

    assert await migrate(fresh_database_url, directory) == [6]
    assert await _applied_rows(fresh_database_url) == [*ALL_ROWS, (6, "extra")]


async def test_lock_is_released_after_a_run(fresh_database_url: str, tmp_path: Path) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    await migrate(fresh_database_url, directory)

    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY) is True
    finally:
        await conn.close()


async def test_concurrent_calls_apply_each_migration_once(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)

    results = await asyncio.gather(*(migrate(fresh_database_url, directory) for _ in range(3)))

    assert sorted(results) == [[], [], [1, 2, 5]]
    assert await _applied_rows(fresh_database_url) == ALL_ROWS
    assert await _fetchval(fresh_database_url, "SELECT count(*) FROM t") == 1


async def test_concurrent_processes_apply_each_migration_once(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    # Both children import the very stampflow this test imported, installed or not.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [STAMPFLOW_ROOT, os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from stampflow.migrate import migrate\n"
        "print(json.dumps(asyncio.run(migrate(sys.argv[1], Path(sys.argv[2])))))\n"
    )
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            fresh_database_url,
            str(directory),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.gather(*(child.communicate() for child in children))

    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()
    results = sorted(json.loads(out) for out, _ in outputs)
    assert results == [[], [1, 2, 5]]
    assert await _applied_rows(fresh_database_url) == ALL_ROWS
    assert await _fetchval(fresh_database_url, "SELECT count(*) FROM t") == 1


async def test_failing_migration_rolls_back_only_itself(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(
        tmp_path / "migrations",
        {
            "0001_init.sql": MIGRATIONS["0001_init.sql"],
            "0002_broken.sql": "CREATE TABLE half (id int);\nSELECT * FROM no_such_table;\n",
            "0003_after.sql": "CREATE TABLE after_broken (id int);\n",
        },
    )

    with pytest.raises(MigrationError) as caught:
        await migrate(fresh_database_url, directory)

    message = str(caught.value)
    assert "\n" not in message
    assert "0002_broken.sql" in message
    assert 'relation "no_such_table" does not exist' in message
    assert "42P01" in message
    assert await _applied_rows(fresh_database_url) == [(1, "init")]
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('things')") is not None
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('half')") is None
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('after_broken')") is None

    # A file that never applied may still be fixed; the next run picks up where this one stopped.
    (directory / "0002_broken.sql").write_text("CREATE TABLE half (id int);\n", encoding="utf-8")
    assert await migrate(fresh_database_url, directory) == [2, 3]
    assert await _applied_rows(fresh_database_url) == [(1, "init"), (2, "broken"), (3, "after")]


async def test_checksum_drift_is_refused(fresh_database_url: str, tmp_path: Path) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    assert await migrate(fresh_database_url, directory) == [1, 2, 5]

    (directory / "0002_more.sql").write_text("CREATE TABLE t (id bigint);\n", encoding="utf-8")
    _write_migrations(directory, {"0009_pending.sql": "CREATE TABLE pending (id int);\n"})

    for call in (migrate, status):
        with pytest.raises(MigrationError) as caught:
            await call(fresh_database_url, directory)
        message = str(caught.value)
        assert "\n" not in message
        assert "0002_more.sql" in message
        assert "applied checksum differs; write a new migration instead" in message
    # Nothing ran: the drift is found before any pending file is applied.
    assert await _applied_rows(fresh_database_url) == ALL_ROWS
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('pending')") is None


async def test_status_reports_applied_and_pending(fresh_database_url: str, tmp_path: Path) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)

    before = await status(fresh_database_url, directory)
    assert [(m.version, at) for m, at in before] == [(1, None), (2, None), (5, None)]
    # status is read-only: it did not create the bookkeeping table.
    assert await _fetchval(fresh_database_url, "SELECT to_regclass('schema_migrations')") is None

    await migrate(fresh_database_url, directory)
    _write_migrations(directory, {"0007_later.sql": "SELECT 1;\n"})

    after = await status(fresh_database_url, directory)
    assert [m.filename for m, _ in after] == [
        "0001_init.sql",
        "0002_more.sql",
        "0005_index.sql",
        "0007_later.sql",
    ]
    times = [at for _, at in after]
    assert times[3] is None
    applied_times = [at for at in times[:3] if at is not None]
    assert len(applied_times) == 3
    assert all(at.tzinfo is not None for at in applied_times)


async def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    port = _free_port()
    url = f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres"

    with pytest.raises(MigrationError) as caught:
        await migrate(url, directory)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"PostgreSQL at 127.0.0.1:{port} is unreachable, cannot migrate:")
    assert "hunter2" not in message
    # A node starting during an outage waits for an unreachable database (app.until_ready).
    assert isinstance(caught.value, ServiceUnavailable)


async def test_refused_login_is_not_unreachable(fresh_database_url: str,
                                                tmp_path: Path) -> None:
    """A wrong password will not pass with time: the node exits with the reason instead of
    waiting for ever."""
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    parts = urlsplit(fresh_database_url)
    wrong = parts._replace(netloc=f"{parts.username}:wrong-{parts.port}@{parts.hostname}:"
                                  f"{parts.port}").geturl()

    with pytest.raises(MigrationError) as caught:
        await migrate(wrong, directory)

    assert not isinstance(caught.value, ServiceUnavailable), str(caught.value)
    assert "refused the migration's connection" in str(caught.value)


async def test_bad_directory_fails_before_connecting(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"

    with pytest.raises(MigrationError, match="does not exist"):
        await migrate(url, tmp_path / "missing")


async def test_repository_migrations_apply_cleanly(fresh_database_url: str) -> None:
    directory = default_migrations_dir()
    shipped = discover(directory)
    if not shipped:
        pytest.skip(f"{directory} holds no migrations yet")

    assert await migrate(fresh_database_url) == [m.version for m in shipped]
    assert await migrate(fresh_database_url) == []
    assert all(at is not None for _, at in await status(fresh_database_url))


async def test_a_held_lock_makes_migrate_give_up_within_its_deadline(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """Whoever holds the advisory lock cannot block start-up forever: migrate gives up after
    its deadline with one line naming the holder's pid and application_name."""
    directory = _write_migrations(tmp_path / "migrations", MIGRATIONS)
    holder = await asyncpg.connect(fresh_database_url,
                                   server_settings={"application_name": "held-by-test"})
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        started = time.monotonic()
        with pytest.raises(MigrationError) as caught:
            await asyncio.wait_for(migrate(fresh_database_url, directory, lock_timeout=1.0), 20)
        assert time.monotonic() - started < 6
        message = str(caught.value)
        assert "\n" not in message
        assert f"pid {holder.get_server_pid()}" in message and "held-by-test" in message
        assert "1s" in message, message
        assert await _fetchval(fresh_database_url,
                               "SELECT to_regclass('schema_migrations')") is None
    finally:
        await holder.close()
    # Released: the next run goes ahead, and a short wait for a lock released meanwhile works.
    assert await migrate(fresh_database_url, directory, lock_timeout=1.0) == [1, 2, 5]
