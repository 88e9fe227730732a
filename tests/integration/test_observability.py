"""Every node process serves /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import running_stack, settings_for, wait_for

pytestmark = pytest.mark.integration


async def test_nodes_serve_health_readiness_and_metrics(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
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
        # Both nodes report their lag, labelled by consumer group, once they commit.
        for node in ("orchestrator", "reducer"):
            label = f'stampflow_consumer_lag{{group="{topic_prefix}-{node}"'

            async def reported(label: str = label) -> bool:
                return label in (await asyncio.to_thread(get, port, "/metrics"))[1]

            await wait_for(reported, 30, f"{node} consumer lag on /metrics")
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
