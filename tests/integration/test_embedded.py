"""The real services themselves: embedded PostgreSQL and broker, clear errors when absent."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from stampflow.bus import ensure_topics, make_consumer, make_producer
from stampflow.errors import ServiceUnavailable
from stampflow.services import (
    EmbeddedServices,
    check_broker,
    check_database,
    free_port,
)
from tests.integration.stack import running_stack, settings_for, wait_for

pytestmark = pytest.mark.integration


async def test_postgres_is_real_and_answers(services) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(services.endpoints.database_url)
    try:
        version = await conn.fetchval("SHOW server_version_num")
    finally:
        await conn.close()
    if services.postgres is not None:
        assert int(version) >= 180000


async def test_broker_round_trip_keeps_per_key_order_and_commits(
    services, topic_prefix: str,  # type: ignore[no-untyped-def]
) -> None:
    bootstrap = services.endpoints.bootstrap_servers
    topic = f"{topic_prefix}.roundtrip"
    await ensure_topics(bootstrap, [topic], 4)
    await ensure_topics(bootstrap, [topic], 4)  # idempotent
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        sends = [await producer.send(topic, key=f"k{i % 5}".encode(), value=str(i).encode())
                 for i in range(1000)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    group = f"{topic_prefix}-g"
    consumer = make_consumer(bootstrap, [topic], group)
    await consumer.start()
    seen: dict[bytes, list[int]] = {}
    try:
        while sum(map(len, seen.values())) < 1000:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    seen.setdefault(r.key, []).append(int(r.value))
        await consumer.commit()
    finally:
        await consumer.stop()
    assert sorted(seen) == [f"k{i}".encode() for i in range(5)]
    for values in seen.values():
        assert values == sorted(values)  # one key, one partition, in order

    again = make_consumer(bootstrap, [topic], group)
    await again.start()
    try:
        leftovers = await again.getmany(timeout_ms=1500)
    finally:
        await again.stop()
    assert sum(len(v) for v in leftovers.values()) == 0


async def test_unreachable_services_are_named_in_one_line() -> None:
    port = free_port()
    with pytest.raises(ServiceUnavailable) as db:
        await check_database(f"postgresql://u:pa55@127.0.0.1:{port}/x", timeout=2)
    assert str(db.value).startswith(f"PostgreSQL at 127.0.0.1:{port} is unreachable")
    assert "pa55" not in str(db.value) and "\n" not in str(db.value)
    with pytest.raises(ServiceUnavailable) as kafka:
        await check_broker(f"127.0.0.1:{port}", timeout=2)
    assert str(kafka.value).startswith(f"Kafka broker at 127.0.0.1:{port} is unreachable")
    assert "\n" not in str(kafka.value)


def test_embedded_services_state_file_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    endpoints = EmbeddedServices.start_detached(state)
    try:
        assert EmbeddedServices.read_state(state) == endpoints
        assert EmbeddedServices.start_detached(state) == endpoints  # found, not started again
        recorded = json.loads((state / "services.json").read_text())
        pids = [int(recorded["postgres_pid"]), int(recorded["broker_pid"])]
        asyncio.run(check_database(endpoints.database_url))
        asyncio.run(check_broker(endpoints.bootstrap_servers))
    finally:
        assert EmbeddedServices.stop_from_state(state)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert EmbeddedServices.read_state(state) is None
    assert not EmbeddedServices.stop_from_state(state)


def test_embedded_postgres_restart_keeps_data(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path / "s", fast=True) as svc:
        url = svc.endpoints.database_url

        async def put() -> None:
            conn = await asyncpg.connect(url)
            await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            await conn.close()

        async def get() -> int:
            conn = await asyncpg.connect(url)
            try:
                return int(await conn.fetchval("SELECT v FROM kept"))
            finally:
                await conn.close()

        asyncio.run(put())
        svc.postgres.restart()
        assert asyncio.run(get()) == 42


async def test_nodes_serve_health_readiness_and_metrics(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)

    def get(port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""

    async with running_stack(settings, endpoints) as stack:
        await stack.client.submit_stamp("health", content=b"ping")
        assert stack.nodes.health is not None
        port = stack.nodes.health.port
        assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")
        # Ready once each node's consumer has joined its group.
        await wait_for(lambda: _ready(port), 30, "/readyz to answer 200")
        status, metrics = await asyncio.to_thread(get, port, "/metrics")
        assert status == 200
        for name in ("stampflow_workflows_total", "stampflow_workflow_latency_seconds",
                     "stampflow_reducer_batch_size", "stampflow_consumer_lag"):
            assert name in metrics
        assert (await asyncio.to_thread(get, port, "/nope"))[0] == 404
        stack.nodes.orchestrators[0].ready = False
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 503
        stack.nodes.orchestrators[0].ready = True


async def _ready(port: int) -> bool:
    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as err:
            return err.code

    return await asyncio.to_thread(get) == 200
