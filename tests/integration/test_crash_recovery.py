"""kill -9 and SIGTERM of real node processes over the real services: nothing lost, nothing
counted twice, and state recovered after a restart."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from blake3 import blake3

from stampflow.app import prepare
from stampflow.client import Client
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    NodeProcess,
    aggregates,
    fetch,
    finished_count,
    reconcile,
    settings_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _wait_finished(url: str, n: int, timeout: float) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    done = 0
    while asyncio.get_running_loop().time() < deadline:
        done = await finished_count(url)
        if done >= n:
            return done
        await asyncio.sleep(0.25)
    return done


async def test_kill_9_and_restart_lose_nothing_and_count_nothing_twice(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    content = tmp_path / "content"
    content.mkdir()
    settings = settings_for(endpoints, topic_prefix, content)
    await prepare(settings, endpoints)
    rng = random.Random(1234)
    namespaces = ["k0", "k1", "k2", "k3"]
    truth: dict[str, dict[str, object]] = {
        ns: {"workflows": 0, "hashes": set(), "bytes": 0, "dups": 0} for ns in namespaces}
    blobs = [rng.randbytes(rng.choice((32, 512, 4096))) for _ in range(300)]

    def expect(ns: str, data: bytes) -> None:
        t = truth[ns]
        t["workflows"] = int(t["workflows"]) + 1  # type: ignore[call-overload]
        digest = blake3(data).hexdigest()
        hashes: set[str] = t["hashes"]  # type: ignore[assignment]
        if digest in hashes:
            t["dups"] = int(t["dups"]) + 1  # type: ignore[call-overload]
        else:
            hashes.add(digest)
            t["bytes"] = int(t["bytes"]) + len(data)  # type: ignore[call-overload]

    logs = tmp_path / "logs"
    logs.mkdir()
    orch = NodeProcess("orchestrator", settings, logs / "orchestrator.log")
    red = NodeProcess("reducer", settings, logs / "reducer.log")
    total = 0
    kills = 0
    try:
        async with Client(settings, endpoints, source="crash-test") as client:
            for wave in range(6):
                for _ in range(250):
                    ns = rng.choice(namespaces)
                    data = rng.choice(blobs)  # repeats on purpose: duplicates must count once
                    await client.submit_stamp(ns, content=data, wait=False)
                    expect(ns, data)
                    total += 1
                await client.flush()
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                victim = "orchestrator" if wave % 2 == 0 else "reducer"
                if victim == "orchestrator":
                    orch.kill()
                    orch = NodeProcess("orchestrator", settings, logs / "orchestrator.log")
                else:
                    red.kill()
                    red = NodeProcess("reducer", settings, logs / "reducer.log")
                kills += 1
        done = await _wait_finished(fresh_database_url, total, timeout=180)
        assert done == total, (
            f"{done} of {total} workflows finished; logs in {logs}:\n"
            + (logs / "orchestrator.log").read_text()[-3000:]
            + (logs / "reducer.log").read_text()[-3000:])
        # A SIGTERM'd node stops taking work, finishes, commits and exits 0 within 30 s.
        code, took = orch.terminate()
        assert code == 0 and took < 30, f"orchestrator exited {code} after {took:.1f}s"
        code, took = red.terminate()
        assert code == 0 and took < 30, f"reducer exited {code} after {took:.1f}s"
    finally:
        orch.kill()
        red.kill()
    assert kills == 6
    aggs = await aggregates(fresh_database_url)
    for ns in namespaces:
        t = truth[ns]
        row = aggs[ns]
        assert row["workflows"] == t["workflows"], ns
        assert row["completed"] == t["workflows"], ns
        assert row["failed"] == 0, ns
        assert row["stamps"] == len(t["hashes"]), ns  # type: ignore[arg-type]
        assert row["total_bytes"] == t["bytes"], ns
        assert row["duplicates"] == t["dups"], ns
        assert row["anomalies"] == 0, ns
    # Every workflow has exactly one history of four transitions, once.
    per_wf = await fetch(fresh_database_url,
                         "SELECT count(*) AS n FROM workflow_transitions GROUP BY workflow_id")
    assert len(per_wf) == total
    assert {r["n"] for r in per_wf} == {4}
    assert await reconcile(fresh_database_url) == []
    distinct = await fetch(fresh_database_url, "SELECT count(*) AS n FROM stamps")
    assert distinct[0]["n"] == sum(len(t["hashes"]) for t in truth.values())  # type: ignore[arg-type]


async def test_two_orchestrators_share_the_work(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    await prepare(settings, endpoints)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = [NodeProcess("orchestrator", settings, logs / f"orch{i}.log") for i in range(2)]
    nodes.append(NodeProcess("reducer", settings, logs / "reducer.log"))
    n = 600
    try:
        await asyncio.sleep(4)  # both members join the group before the work arrives
        async with Client(settings, endpoints, source="scale-test") as client:
            for i in range(n):
                await client.submit_stamp(f"s{i % 8}", content=f"item {i}".encode(), wait=False)
            await client.flush()
        assert await _wait_finished(fresh_database_url, n, timeout=120) == n
        for node in nodes:
            code, _ = node.terminate()
            assert code == 0
    finally:
        for node in nodes:
            node.kill()
    aggs = await aggregates(fresh_database_url)
    assert sum(r["workflows"] for r in aggs.values()) == n
    assert sum(r["stamps"] for r in aggs.values()) == n
    worked = [(logs / f"orch{i}.log").read_text().count('"workflow finished"') for i in range(2)]
    assert all(w > 0 for w in worked), f"work per orchestrator: {worked}"
