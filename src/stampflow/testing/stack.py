"""A running stampflow stack for integration tests: nodes in-process or as subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from stampflow.app import NODE_NAMES, RunningNodes, run_nodes
from stampflow.bus import make_consumer
from stampflow.client import Client
from stampflow.connections import KafkaOptions
from stampflow.contracts.nodes import NodeContract
from stampflow.services import Endpoints
from stampflow.settings import Settings


def settings_for(endpoints: Endpoints, topic_prefix: str, content_root: Path,
                 **overrides: Any) -> Settings:
    return Settings(
        services="external", database_url=endpoints.database_url,
        bootstrap_servers=endpoints.bootstrap_servers, topic_prefix=topic_prefix,
        consumer_group_prefix=topic_prefix, content_root=content_root,
        log_level="WARNING",
        # the test services' broker is Tansu, embedded or in a container
        **{"http_port": 0, "kafka_tansu": endpoints.kafka.tansu, **overrides},
    )


@dataclass
class Stack:
    settings: Settings
    endpoints: Endpoints
    nodes: RunningNodes
    client: Client


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, endpoints: Endpoints,
                        nodes: tuple[str, ...] = NODE_NAMES,
                        contracts: dict[str, NodeContract] | None = None,
                        ) -> AsyncIterator[Stack]:
    stop = asyncio.Event()
    started = asyncio.Event()
    running = RunningNodes()
    task = asyncio.create_task(
        run_nodes(settings, endpoints, list(nodes), stop, started=started, running=running,
                  contracts=contracts))
    done, _ = await asyncio.wait([task, asyncio.create_task(started.wait())], timeout=60,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong
    try:
        async with Client(settings, endpoints, source="test") as client:
            yield Stack(settings, endpoints, running, client)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=40)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def fetch(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def finished_count(url: str) -> int:
    rows = await fetch(url, "SELECT coalesce(sum(completed + failed), 0) AS n "
                            "FROM namespace_aggregates")
    return int(rows[0]["n"])


async def reconcile(url: str) -> list[str]:
    """`stampflow check`'s differences: empty when the aggregates match the base rows."""
    from stampflow.reconcile import check

    conn = await asyncpg.connect(url)
    try:
        return [str(d) for d in await check(conn)]
    finally:
        await conn.close()


async def aggregates(url: str) -> dict[str, dict[str, Any]]:
    rows = await fetch(url, "SELECT * FROM namespace_summary")
    return {r["namespace"]: r for r in rows}


async def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30.0,
                     *, kafka: KafkaOptions | None = None) -> list[Any]:
    """Every record of ``topic`` until ``expect`` were read (a fresh group, from earliest)."""
    consumer = make_consumer(bootstrap, [topic], f"reader-{os.urandom(4).hex()}", kafka=kafka)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


class NodeProcess:
    """`stampflow run NODE` as a subprocess, for kill -9 and SIGTERM tests."""

    def __init__(self, node: str, settings: Settings, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.node = node
        self.log_path = log_path
        env = dict(os.environ)
        env.update({
            "STAMPFLOW_SERVICES": "external",
            "STAMPFLOW_DATABASE_URL": settings.database_url.get_secret_value()
            if settings.database_url else "",
            "STAMPFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
            "STAMPFLOW_TOPIC_PREFIX": settings.topic_prefix,
            "STAMPFLOW_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
            "STAMPFLOW_CONTENT_ROOT": str(settings.content_root),
            # Several node processes on this machine: each its own port (0: any free one).
            "STAMPFLOW_HTTP_PORT": str(settings.http_port),
            "STAMPFLOW_KAFKA_TANSU": str(settings.kafka_tansu).lower(),
            "STAMPFLOW_LOG_LEVEL": "INFO",
            **(extra_env or {}),
        })
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stampflow", "run", node], env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code, time.monotonic() - t0
