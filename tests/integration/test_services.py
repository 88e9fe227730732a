"""The real services: embedded PostgreSQL and Tansu, the Kafka wiring, and clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiokafka import TopicPartition

from stampflow.bus import ensure_topics, make_consumer, make_producer
from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.services import (
    EmbeddedPostgres,
    EmbeddedServices,
    Endpoints,
    check_broker,
    check_database,
    database_address,
    external_endpoints,
    free_port,
    pid_alive,
    with_database,
)
from stampflow.settings import Settings
from stampflow.testing.pytest_plugin import Services

pytestmark = pytest.mark.integration


async def _fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_embedded_postgres_starts_restarts_and_survives_a_crash(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", fast=True, options={"shared_buffers": "48MB"})
    started = time.monotonic()
    await asyncio.to_thread(pg.start)
    try:
        assert time.monotonic() - started < 30
        version = await _fetchval(pg.url(), "select version()")
        assert str(version).startswith("PostgreSQL 18"), version
        assert await _fetchval(pg.url(), "show max_connections") == "200"
        assert await _fetchval(pg.url(), "show fsync") == "off"
        assert await _fetchval(pg.url(), "show shared_buffers") == "48MB"  # options pass on
        await _fetchval(pg.url(), "create table kept as select 42 as v")
        port, first_pid = pg.port, pg.pid

        await asyncio.to_thread(pg.restart)
        assert (pg.port, pg.url()) == (
            port, f"postgresql://postgres:{pg.password}@127.0.0.1:{port}/postgres")
        assert pg.pid != first_pid and not pid_alive(first_pid)
        assert await _fetchval(pg.url(), "select v from kept") == 42

        crashed = pg.pid
        await asyncio.to_thread(pg.kill)
        assert not pid_alive(crashed) and not pg.running
        await asyncio.to_thread(pg.start)  # crash recovery from the WAL
        assert await _fetchval(pg.url(), "select v from kept") == 42
    finally:
        last = pg.pid if pg.running else 0
        await asyncio.to_thread(pg.stop)
    assert not pid_alive(last)
    with pytest.raises(StampflowError, match="is not running"):
        _ = pg.pid


async def test_broker_round_trip_keeps_key_order_and_resumes_from_commits(
    services: Services, topic_prefix: str,
) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    topic = f"{topic_prefix}.roundtrip"
    assert await ensure_topics(bootstrap, [topic], 4) == [topic]
    assert await ensure_topics(bootstrap, [topic, topic], 4) == []  # already there

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        sent = [await producer.send(topic, key=f"k{i % 20}".encode(), value=str(i).encode())
                for i in range(1000)]
        await asyncio.gather(*sent)
        assert await producer.partitions_for(topic) == {0, 1, 2, 3}
    finally:
        await producer.stop()

    group = f"{topic_prefix}-group"
    consumer = make_consumer(bootstrap, [topic], group)
    await consumer.start()
    seen: dict[bytes, list[int]] = {}
    partition_of: dict[bytes, set[int]] = {}
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, seen.values())) < 1000 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    assert r.key is not None and r.value is not None
                    seen.setdefault(r.key, []).append(int(r.value))
                    partition_of.setdefault(r.key, set()).add(r.partition)
        await consumer.commit()
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in range(4)]
    finally:
        await consumer.stop()
    assert sorted(v for values in seen.values() for v in values) == list(range(1000))
    assert len(seen) == 20
    for key, values in seen.items():
        assert values == sorted(values), f"{key!r} out of order"
        assert len(partition_of[key]) == 1
    assert sum(c or 0 for c in committed) == 1000
    assert len({p for ps in partition_of.values() for p in ps}) > 1  # keys spread out

    # More work arrives; the next consumer of the group reads from the committed offsets:
    # exactly the new messages, none of the 1000 again.
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for i in range(1000, 1010):
            await producer.send_and_wait(topic, key=f"k{i % 20}".encode(), value=str(i).encode())
    finally:
        await producer.stop()
    again = make_consumer(bootstrap, [topic], group)
    await again.start()
    later: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(later) < 10 and time.monotonic() < deadline:
            for records in (await again.getmany(timeout_ms=500)).values():
                later += [int(r.value) for r in records if r.value is not None]
        assert len(again.assignment()) == 4
        for records in (await again.getmany(timeout_ms=1000)).values():
            later += [int(r.value) for r in records if r.value is not None]
    finally:
        await again.stop()
    assert sorted(later) == list(range(1000, 1010))


async def test_checks_pass_on_live_services(services: Services) -> None:
    await check_database(services.endpoints.database_url)
    await check_broker(services.endpoints.bootstrap_servers)


async def test_checks_name_the_service_and_address_in_one_line() -> None:
    port = free_port()  # nothing listens there now
    with pytest.raises(ServiceUnavailable) as db:
        await check_database(f"postgresql://app:s3cret@127.0.0.1:{port}/stamps", timeout=2)
    assert str(db.value) == f"PostgreSQL at 127.0.0.1:{port} is unreachable: connection refused"
    with pytest.raises(ServiceUnavailable) as kafka:
        await check_broker(f"127.0.0.1:{port}", timeout=2)
    assert str(kafka.value) == (f"Kafka broker at 127.0.0.1:{port} is unreachable: "
                                "connection refused")


async def test_check_database_reports_a_missing_database_without_the_password(
    services: Services,
) -> None:
    url = with_database(services.endpoints.database_url, "nope")
    if urlsplit(url).password is None:  # the embedded server trusts: any password will do
        url = url.replace("postgres@", "postgres:s3cret@")
    secret = urlsplit(url).password
    assert secret
    with pytest.raises(ServiceUnavailable) as err:
        await check_database(url)
    message = str(err.value)
    assert message.startswith(f"PostgreSQL at {database_address(url)} is unreachable: ")
    assert '"nope" does not exist' in message
    assert secret not in message and "\n" not in message


def test_external_endpoints_name_the_missing_variables() -> None:
    with pytest.raises(StampflowError) as both:
        external_endpoints(Settings(services="external", database_url=None,
                                    bootstrap_servers=None))
    assert str(both.value) == ("external services need STAMPFLOW_DATABASE_URL and "
                               "STAMPFLOW_BOOTSTRAP_SERVERS to be set")
    settings = Settings(services="external", database_url="postgresql://u:pw@db:5432/x",
                        bootstrap_servers=None)
    with pytest.raises(StampflowError, match=r"need STAMPFLOW_BOOTSTRAP_SERVERS to be set$"):
        external_endpoints(settings)
    assert external_endpoints(settings, need_broker=False).database_url.endswith("@db:5432/x")


def test_endpoints_never_show_a_password() -> None:
    endpoints = Endpoints("postgresql://app:s3cret@db:5432/stamps", "k1:9092,k2:9092")
    assert "s3cret" not in repr(endpoints) and "s3cret" not in str(endpoints)
    assert "s3cret" not in endpoints.redacted()
    assert "app:***@db:5432" in endpoints.redacted()


async def test_fresh_database_is_its_own(services: Services, fresh_database_url: str) -> None:
    name = await _fetchval(fresh_database_url, "select current_database()")
    assert str(name).startswith("test_") and fresh_database_url.endswith(f"/{name}")
    await _fetchval(fresh_database_url, "create table only_here (v int)")
    assert await _fetchval(services.endpoints.database_url,
                           "select to_regclass('only_here')") is None


async def test_services_json_lets_another_process_find_and_stop_them(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    svc = EmbeddedServices(state_dir, fast=True)
    endpoints = await asyncio.to_thread(svc.start)
    try:
        state = json.loads((state_dir / "services.json").read_text())
        pids = [state["postgres_pid"], state["broker_pid"]]
        assert pids == [svc.postgres.pid, svc.broker.pid]
        assert all(pid_alive(pid) for pid in pids)
        assert (state["database_url"], state["bootstrap_servers"]) == (
            endpoints.database_url, endpoints.bootstrap_servers)
        assert Path(state["pgdata"]) == state_dir.resolve() / "pgdata"
        assert (Path(state["pgdata"]) / "PG_VERSION").is_file()

        assert EmbeddedServices.read_state(state_dir) == endpoints
        assert await asyncio.to_thread(EmbeddedServices.start_detached, state_dir) == endpoints
        with pytest.raises(StampflowError, match="already run"):
            await asyncio.to_thread(EmbeddedServices(state_dir).start)
        await check_database(endpoints.database_url)
        await check_broker(endpoints.bootstrap_servers)

        assert await asyncio.to_thread(EmbeddedServices.stop_from_state, state_dir)
        assert not any(pid_alive(pid) for pid in pids)
        assert not (state_dir / "services.json").exists()
        assert EmbeddedServices.read_state(state_dir) is None
        assert not EmbeddedServices.stop_from_state(state_dir)

        # `stampflow services up` then `down`: started here, left running, stopped by PID.
        again = await asyncio.to_thread(EmbeddedServices.start_detached, state_dir)
        assert again.database_url != ""
        await check_database(again.database_url)  # the data directory was reused
        state = json.loads((state_dir / "services.json").read_text())
        assert await asyncio.to_thread(EmbeddedServices.stop_from_state, state_dir)
        assert not pid_alive(state["postgres_pid"]) and not pid_alive(state["broker_pid"])
    finally:
        await asyncio.to_thread(svc.stop)
        await asyncio.to_thread(EmbeddedServices.stop_from_state, state_dir)


def test_a_stale_services_json_is_ignored(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # A PID that is gone: nothing to stop, and the stale file goes.
    (state_dir / "services.json").write_text(json.dumps({
        "database_url": "postgresql://postgres@127.0.0.1:1/postgres",
        "bootstrap_servers": "127.0.0.1:1", "postgres_pid": 2**22 + 1,
        "broker_pid": 2**22 + 2,
    }))
    assert EmbeddedServices.read_state(state_dir) is None
    assert not EmbeddedServices.stop_from_state(state_dir)
    assert not (state_dir / "services.json").exists()


# An unrelated process whose command line names both servers, as a recycled PID's might.
IMPOSTOR = [sys.executable, "-c", "import time; time.sleep(60)", "postgres", "tansu"]


def _proc_identity(pid: int) -> tuple[list[str], int]:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    return [arg.decode() for arg in cmdline], ticks


@pytest.mark.parametrize("recorded", ["nothing", "postgres", "same-cmdline-other-start"])
def test_services_down_spares_a_process_it_did_not_start(tmp_path: Path, recorded: str) -> None:
    """services.json names a live PID that this state dir did not start: `services down`
    refuses with one line, and the process survives."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    other = subprocess.Popen(IMPOSTOR)
    try:
        time.sleep(0.2)  # exec'd
        cmdline, ticks = _proc_identity(other.pid)
        state: dict[str, object] = {
            "database_url": "postgresql://postgres@127.0.0.1:1/postgres",
            "bootstrap_servers": "127.0.0.1:1", "postgres_pid": other.pid,
            "broker_pid": other.pid,
        }
        if recorded == "postgres":  # what the real server's record looks like
            state |= {"postgres_cmdline": ["/opt/pg/bin/postgres", "-D", str(state_dir)],
                      "postgres_start_ticks": ticks,
                      "broker_cmdline": ["/opt/tansu", "broker"], "broker_start_ticks": ticks}
        elif recorded == "same-cmdline-other-start":
            state |= {"postgres_cmdline": cmdline, "postgres_start_ticks": ticks - 1,
                      "broker_cmdline": cmdline, "broker_start_ticks": ticks - 1}
        (state_dir / "services.json").write_text(json.dumps(state))
        assert EmbeddedServices.read_state(state_dir) is None
        with pytest.raises(StampflowError) as refused:
            EmbeddedServices.stop_from_state(state_dir)
        assert "\n" not in str(refused.value)
        assert f"pid {other.pid}" in str(refused.value)
        env = dict(os.environ, STAMPFLOW_STATE_DIR=str(state_dir), STAMPFLOW_SERVICES="embedded")
        down = subprocess.run([sys.executable, "-m", "stampflow", "services", "down"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 1, down.stdout + down.stderr
        assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
        assert f"pid {other.pid}" in down.stderr and "not stopping" in down.stderr
        time.sleep(0.2)
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()
