"""Secrets stay out of logs: a planted password in the database URL appears nowhere in what
the nodes and the CLI print, in normal work or on the error paths. The embedded PostgreSQL asks
every connection for a password, keeps its own in a private file, and the nodes log in as the
schema's owner, not as a superuser. (Path confinement, size limits and row-level security:
test_workflows.py, test_stamping.py, test_fuzz_decode.py and test_operators.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from stampflow.app import prepare
from stampflow.client import Client
from stampflow.migrate import migrate
from stampflow.services import PG_SYSTEM_USER, EmbeddedPostgres, check_database, pid_alive
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import NodeProcess, finished_count, settings_for, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLANTED = "PLANTED-s3cret-XYZ"


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAMPFLOW_SERVICES": "external", "STAMPFLOW_DATABASE_URL": url,
           "STAMPFLOW_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    return subprocess.run([sys.executable, "-m", "stampflow", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_a_planted_password_never_reaches_the_logs(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    url = fresh_database_url
    secret = urlsplit(url).password
    if secret is None:  # the embedded server trusts: plant one, it is accepted and ignored
        url = url.replace("postgres@", f"postgres:{PLANTED}@")
        secret = PLANTED
    endpoints = services.endpoints.with_database(url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    await prepare(settings, endpoints)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = [NodeProcess(n, settings, logs / f"{n}.log", extra_env={"STAMPFLOW_LOG_LEVEL": "DEBUG"})
             for n in ("orchestrator", "reducer")]
    unreachable = url.replace(urlsplit(url).netloc.split("@")[-1], "127.0.0.1:1")
    try:
        async with Client(settings, endpoints, source="security") as client:
            for i in range(20):
                await client.submit_stamp("sec", content=f"secret-free {i}".encode())
        await wait_for(lambda: _done(fresh_database_url, 20), 60, "20 workflows")
        # The error paths: a node and two commands pointed at a database that is not there.
        # The node waits for it (logging why, once per interval) until told to stop.
        broken = settings_for(endpoints.with_database(unreachable), topic_prefix, tmp_path)
        lost = NodeProcess("reducer", broken, logs / "unreachable.log")
        await wait_for(lambda: _logged(lost.log_path, "a service is unreachable; waiting"),
                       60, "the unreachable database logged")
        code, _ = await asyncio.to_thread(lost.terminate, 30)
        lost.kill()  # already exited: closes its log
        assert code == 0
        status = await asyncio.to_thread(_cli, "status", url=unreachable)
        check = await asyncio.to_thread(_cli, "check", url=unreachable)
    finally:
        for node in nodes:
            node.kill()
    printed = {p.name: p.read_text(errors="replace") for p in logs.glob("*.log")}
    printed["status"] = status.stdout + status.stderr
    printed["check"] = check.stdout + check.stderr
    for where, text in printed.items():
        assert secret not in text, f"the password appears in {where}"
    # ... while the same output does name the database, so the test looks at the right text.
    assert status.returncode == 1 and "127.0.0.1:1" in printed["status"]
    assert check.returncode == 1 and "127.0.0.1:1" in printed["check"]
    assert "127.0.0.1:1" in printed["unreachable.log"]
    assert '"workflow finished"' in printed["orchestrator.log"]


async def _logged(path: Path, text: str) -> bool:
    def read() -> bool:
        return path.exists() and text in path.read_text(errors="replace")

    return await asyncio.to_thread(read)


async def _done(url: str, n: int) -> bool:
    return await finished_count(url) >= n


def _embedded(services: Services) -> EmbeddedPostgres:
    if not isinstance(services.postgres, EmbeddedPostgres):
        pytest.skip("the embedded PostgreSQL's own set-up")
    return services.postgres


def _private(path: Path, mode: int) -> None:
    info = path.stat()
    assert info.st_uid == os.geteuid(), f"{path} is not ours"
    if os.geteuid() == 0 and mode == 0o700 and path.is_dir():
        # As root the server runs as a system user: it may pass through, and do nothing else.
        assert stat.S_IMODE(info.st_mode) == 0o710, oct(info.st_mode)
        assert info.st_gid == pwd.getpwnam(PG_SYSTEM_USER).pw_gid
    else:
        assert stat.S_IMODE(info.st_mode) == mode, f"{path}: {oct(info.st_mode)}"


async def test_embedded_postgres_asks_every_connection_for_a_password(services: Services) -> None:
    pg = _embedded(services)
    state_dir = pg.data_dir.parent
    _private(state_dir, 0o700)
    _private(pg.password_file, 0o600)
    _private(state_dir / "services.json", 0o600)
    assert pg.password_file.read_text().strip() == pg.password and len(pg.password) >= 24
    assert urlsplit(pg.url()).password == pg.password

    conn = await asyncpg.connect(pg.url())
    try:
        rules = await conn.fetch("SELECT type, auth_method FROM pg_hba_file_rules")
    finally:
        await conn.close()
    assert {r["type"] for r in rules} >= {"local", "host"}
    assert {r["auth_method"] for r in rules} == {"scram-sha-256"}, rules

    socket_file = pg.data_dir / f".s.PGSQL.{pg.port}"
    hosts = ["127.0.0.1"] + ([str(pg.data_dir)] if socket_file.exists() else [])
    for host in hosts:
        for password in (None, "not-the-password"):
            with pytest.raises((asyncpg.InvalidPasswordError,
                                asyncpg.InvalidAuthorizationSpecificationError,
                                asyncpg.InterfaceError)) as refused:
                await asyncpg.connect(host=host, port=pg.port, user="postgres",
                                      database="postgres", password=password, timeout=10)
            assert "password" in str(refused.value), (host, password, refused.value)


async def test_nodes_log_in_as_the_schema_owner_not_a_superuser(
    services: Services, fresh_database_url: str,
) -> None:
    _embedded(services)
    published = json.loads((services.postgres.data_dir.parent / "services.json").read_text())
    assert urlsplit(published["database_url"]).username == "stampflow"
    assert published["database_url"] == services.endpoints.database_url
    assert urlsplit(fresh_database_url).username == "stampflow"
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        role = await conn.fetchrow("SELECT rolname, rolsuper, rolbypassrls, rolcanlogin "
                                   "FROM pg_roles WHERE rolname = current_user")
        assert role is not None and role["rolcanlogin"]
        assert not role["rolsuper"] and not role["rolbypassrls"]
        assert await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                   "WHERE datname = current_database()") == "stampflow"
        foreign = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                   "AND tableowner <> current_user")
        assert foreign == []
    finally:
        await conn.close()


def test_services_up_prints_no_password_and_down_stops_them(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    env = dict(os.environ, STAMPFLOW_SERVICES="embedded", STAMPFLOW_STATE_DIR=str(state_dir))
    env.pop("STAMPFLOW_DATABASE_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stampflow", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    up = cli("services", "up")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((state_dir / "services.json").read_text())
        secrets = [urlsplit(state["database_url"]).password,
                   (state_dir / "postgres.password").read_text().strip()]
        assert all(secrets)
        migrated = cli("migrate")
        assert migrated.returncode == 0, migrated.stderr
        asyncio.run(check_database(state["database_url"]))
        for text in (up.stdout + up.stderr, migrated.stdout + migrated.stderr,
                     (state_dir / "postgres.log").read_text(errors="replace")):
            assert not any(secret in text for secret in secrets)
        assert "stampflow:***@127.0.0.1" in up.stdout
    finally:
        down = cli("services", "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not pid_alive(state["postgres_pid"]) and not pid_alive(state["broker_pid"])
