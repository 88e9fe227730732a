"""The whole stack as containers on one user network: PostgreSQL, the broker, the orchestrator
and the reducer each in its own container, requests published from a container too. The
reducer container is stopped mid-run and started again: nothing lost, nothing counted twice.

Runs only with the containers source; the service image is $STAMPFLOW_TEST_SERVICE_IMAGE
(default ``stampflow:test``, built by scripts/build-test-images or `docker build -t
stampflow:test .`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from blake3 import blake3

from stampflow.services import free_port
from stampflow.testing.containers import KAFKA_IMAGE, PASSWORD, POSTGRES_IMAGE
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import aggregates, finished_count, reconcile, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE_IMAGE = os.environ.get("STAMPFLOW_TEST_SERVICE_IMAGE", "stampflow:test")

# The requests, made from a seed: the same code runs here (for the ground truth) and in the
# submitting container.
ITEMS = """
import random

def items(seed, n):
    rng = random.Random(seed)
    blobs = [rng.randbytes(rng.choice((16, 300, 2000))) for _ in range(120)]
    return [(f"c{rng.randrange(4)}", rng.choice(blobs)) for _ in range(n)]
"""

SUBMIT = ITEMS + """
import asyncio, os
from stampflow.client import Client
from stampflow.services import Endpoints
from stampflow.settings import Settings

async def main():
    s = Settings()
    todo = items(int(os.environ["SEED"]), int(os.environ["COUNT"]))
    async with Client(s, Endpoints("", s.bootstrap_servers), source="containers") as c:
        for ns, data in todo:
            await c.submit_stamp(ns, content=data, wait=False)
        await c.flush()
    print("submitted", len(todo))

asyncio.run(main())
"""


def _items(seed: int, n: int) -> list[tuple[str, bytes]]:
    scope: dict[str, Any] = {}
    exec(ITEMS, scope)  # noqa: S102 - our own constant
    return scope["items"](seed, n)  # type: ignore[no-any-return]


def _truth(items: list[tuple[str, bytes]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, Any]] = {}
    for ns, data in items:
        t = out.setdefault(ns, {"workflows": 0, "hashes": set(), "total_bytes": 0,
                                "duplicates": 0})
        t["workflows"] += 1
        digest = blake3(data).hexdigest()
        if digest in t["hashes"]:
            t["duplicates"] += 1
        else:
            t["hashes"].add(digest)
            t["total_bytes"] += len(data)
    return {ns: {"workflows": t["workflows"], "completed": t["workflows"],
                 "stamps": len(t["hashes"]), "total_bytes": t["total_bytes"],
                 "duplicates": t["duplicates"]} for ns, t in out.items()}


async def test_reducer_container_stopped_and_started_loses_and_doubles_nothing(
    services: Services, topic_prefix: str,
) -> None:
    if services.source != "containers":
        pytest.skip("runs the stack as containers: needs --services=containers")
    import docker
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    client = docker.from_env()
    try:
        client.images.get(SERVICE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{SERVICE_IMAGE}: service image not found; build it with "
                    "scripts/build-test-images (or docker build -t stampflow:test .)",
                    pytrace=False)
    finally:
        client.close()

    first, second = _items(5, 3000), _items(6, 500)
    total = len(first) + len(second)
    db_url = f"postgresql://postgres:{PASSWORD}@postgres:5432/postgres"
    env = {"STAMPFLOW_SERVICES": "external", "STAMPFLOW_DATABASE_URL": db_url,
           "STAMPFLOW_BOOTSTRAP_SERVERS": "broker:9092", "STAMPFLOW_TOPIC_PREFIX": topic_prefix,
           "STAMPFLOW_CONSUMER_GROUP_PREFIX": topic_prefix, "STAMPFLOW_LOG_LEVEL": "INFO"}

    def service(*command: str, **extra: str) -> Any:
        c = DockerContainer(SERVICE_IMAGE).with_network(network).with_command(list(command))
        for k, v in {**env, **extra}.items():
            c = c.with_env(k, v)
        return c

    def run_to_end(container: Any, what: str, timeout: float = 120) -> None:
        container.start()
        try:
            status = container.get_wrapped_container().wait(timeout=timeout)
            out = container.get_wrapped_container().logs().decode(errors="replace")
            assert status["StatusCode"] == 0, f"{what} exited {status}: {out[-2000:]}"
        finally:
            container.stop()

    with Network() as network:
        pg_port = free_port()
        pg = (PostgresContainer(POSTGRES_IMAGE, username="postgres", password=PASSWORD,
                                dbname="postgres", driver=None)
              .with_network(network).with_network_aliases("postgres")
              .with_bind_ports(5432, pg_port))
        if "redpanda" in KAFKA_IMAGE:
            broker = DockerContainer(KAFKA_IMAGE).with_command(
                "redpanda start --mode dev-container --smp 1 --kafka-addr PLAINTEXT://0.0.0.0:9092"
                " --advertise-kafka-addr PLAINTEXT://broker:9092")
        else:
            broker = DockerContainer(KAFKA_IMAGE).with_env("ADVERTISED", "broker:9092")
        broker = broker.with_network(network).with_network_aliases("broker")
        with pg, broker:
            host_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{pg_port}/postgres"
            await asyncio.to_thread(run_to_end, service("migrate"), "stampflow migrate")
            orchestrator = service("run", "orchestrator")
            reducer = service("run", "reducer")
            with orchestrator, reducer:
                # The first requests are published in the background; the reducer is stopped
                # as soon as the first results land, while the rest are still flowing.
                submitting = asyncio.create_task(asyncio.to_thread(
                    run_to_end, service("-c", SUBMIT, SEED="5", COUNT=str(len(first)))
                    .with_kwargs(entrypoint="python"), "the first submitter"))
                await wait_for(lambda: _at_least(host_url, 20), 120, "work under way")
                docker_reducer = reducer.get_wrapped_container()
                await asyncio.to_thread(docker_reducer.stop, timeout=5)
                await submitting
                stopped_at = await finished_count(host_url)
                await asyncio.to_thread(
                    run_to_end, service("-c", SUBMIT, SEED="6", COUNT=str(len(second))).with_kwargs(
                        entrypoint="python"), "the second submitter")
                await asyncio.sleep(2)
                assert await finished_count(host_url) == stopped_at  # nobody reduces now
                await asyncio.to_thread(docker_reducer.start)
                t0 = time.monotonic()
                await wait_for(lambda: _at_least(host_url, total), 180, f"{total} workflows")
                recovered_s = time.monotonic() - t0
                logs = docker_reducer.logs().decode(errors="replace")
            assert 0 < stopped_at < len(first), "the reducer was not stopped mid-run"
            got = await aggregates(host_url)
            for ns, want in _truth(first + second).items():
                have = {k: got[ns][k] for k in want}
                assert have == want, f"{ns}: {have} != {want}\n{logs[-2000:]}"
            assert sum(r["anomalies"] for r in got.values()) == 0
            assert await reconcile(host_url) == []
    print(f"reducer stopped at {stopped_at}/{total} finished; caught up {recovered_s:.1f}s "
          "after its restart")


async def _at_least(url: str, n: int) -> bool:
    try:
        return await finished_count(url) >= n
    except OSError:
        return False
