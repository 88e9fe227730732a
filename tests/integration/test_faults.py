"""Service faults: PostgreSQL restarted or crashed, the broker frozen. Nodes pause, retry
behind their circuit breakers, resume, and lose or double-count nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    aggregates,
    finished_count,
    reconcile,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _embedded(services: Services):
    if services.postgres is None or services.broker is None:
        pytest.skip("fault injection needs the embedded services (their PIDs)")
    return services


async def _submit(stack, n: int, start: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(start, start + n):
        await stack.client.submit_stamp(f"f{i % 4}", content=f"fault {i}".encode(), wait=False)
    await stack.client.flush()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_postgres_outage_loses_nothing(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path, how: str,
) -> None:
    svc = _embedded(services)
    endpoints = svc.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings, endpoints) as stack:
        await _submit(stack, 300, 0)
        await asyncio.sleep(0.3)
        if how == "restart":
            await asyncio.to_thread(svc.postgres.stop)
        else:
            await asyncio.to_thread(svc.postgres.kill)
        await _submit(stack, 300, 300)  # work keeps arriving while the database is down
        await asyncio.sleep(2.0)
        await asyncio.to_thread(svc.postgres.start)
        await wait_for(lambda: _done(fresh_database_url, 600), 120, "600 workflows")
        reducer = stack.nodes.reducers[0]
    aggs = await aggregates(fresh_database_url)
    assert sum(r["workflows"] for r in aggs.values()) == 600
    assert sum(r["completed"] for r in aggs.values()) == 600
    assert sum(r["stamps"] for r in aggs.values()) == 600
    assert sum(r["anomalies"] for r in aggs.values()) == 0
    assert reducer.breaker.state.value == "closed"
    assert await reconcile(fresh_database_url) == []


async def test_frozen_broker_loses_nothing(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    svc = _embedded(services)
    endpoints = svc.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings, endpoints) as stack:
        await _submit(stack, 300, 0)
        svc.broker.freeze()
        try:
            await asyncio.sleep(5)
        finally:
            svc.broker.thaw()
        await _submit(stack, 300, 300)
        await wait_for(lambda: _done(fresh_database_url, 600), 180, "600 workflows")
    aggs = await aggregates(fresh_database_url)
    assert sum(r["workflows"] for r in aggs.values()) == 600
    assert sum(r["stamps"] for r in aggs.values()) == 600
    assert sum(r["duplicates"] for r in aggs.values()) == 0


async def _done(url: str, n: int) -> bool:
    try:
        return await finished_count(url) >= n
    except OSError:
        return False
