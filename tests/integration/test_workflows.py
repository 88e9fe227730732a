"""Stamping workflows end to end over the real broker and the real PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from uuid import uuid4

import pytest

from stampflow.contracts.events import decode, derive_id
from stampflow.nodes.deadletter import parse_dead_letter
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    aggregates,
    fetch,
    finished_count,
    read_topic,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def content(tmp_path: Path) -> Path:
    root = tmp_path / "content"
    root.mkdir()
    return root


async def test_four_namespaces_are_aggregated_in_isolation(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content)
    sizes = {}
    for ns in ("ns1", "ns2", "ns3", "ns4"):
        (content / ns).mkdir()
        for i in range(5):
            data = f"{ns}-{i}".encode() * (i + 1)
            (content / ns / f"f{i}").write_bytes(data)
            sizes.setdefault(ns, 0)
            sizes[ns] += len(data)
    async with running_stack(settings, endpoints) as stack:
        for ns in ("ns1", "ns2", "ns3", "ns4"):
            for i in range(5):
                await stack.client.submit_stamp(ns, path=f"{ns}/f{i}")
        await wait_for(lambda: _finished(fresh_database_url, 20), 60, "20 workflows")
    aggs = await aggregates(fresh_database_url)
    assert set(aggs) == {"ns1", "ns2", "ns3", "ns4"}
    for ns, row in aggs.items():
        assert (row["workflows"], row["completed"], row["failed"], row["stamps"]) == (5, 5, 0, 5)
        assert row["total_bytes"] == sizes[ns]
        assert row["anomalies"] == 0
    stamps = await fetch(fresh_database_url,
                         "SELECT namespace, count(*) AS n FROM stamps GROUP BY namespace")
    assert {r["namespace"]: r["n"] for r in stamps} == {"ns1": 5, "ns2": 5, "ns3": 5, "ns4": 5}
    history = await fetch(fresh_database_url,
                          "SELECT workflow_id, array_agg(to_state ORDER BY seq) AS states "
                          "FROM workflow_transitions GROUP BY workflow_id")
    assert len(history) == 20
    assert all(r["states"] == ["received", "hashing", "stamped", "completed"] for r in history)
    counts = await fetch(fresh_database_url,
                         "SELECT namespace, state, count FROM namespace_state_counts "
                         "WHERE count <> 0")
    assert sorted((r["namespace"], r["state"], r["count"]) for r in counts) == [
        (ns, "completed", 5) for ns in ("ns1", "ns2", "ns3", "ns4")]


async def test_same_content_twice_gives_one_stamp_and_a_duplicate(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content)
    (content / "a.txt").write_bytes(b"same bytes")
    (content / "b.txt").write_bytes(b"same bytes")
    async with running_stack(settings, endpoints) as stack:
        await stack.client.submit_stamp("dup", path="a.txt")
        await wait_for(lambda: _finished(fresh_database_url, 1), 30, "first workflow")
        await stack.client.submit_stamp("dup", path="b.txt")
        await stack.client.submit_stamp("dup", content=b"same bytes")
        await wait_for(lambda: _finished(fresh_database_url, 3), 30, "three workflows")
    row = (await aggregates(fresh_database_url))["dup"]
    assert (row["workflows"], row["completed"], row["stamps"], row["duplicates"]) == (3, 3, 1, 2)
    outcomes = await fetch(fresh_database_url, "SELECT outcome FROM workflows ORDER BY created_at")
    assert [r["outcome"] for r in outcomes] == ["stamped", "duplicate", "duplicate"]


async def test_a_redelivered_request_counts_once(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content)
    request_id = uuid4()
    async with running_stack(settings, endpoints) as stack:
        for _ in range(3):  # the same request, as a producer retry or a replay would send it
            await stack.client.submit_stamp("once", content=b"abc", event_id=request_id)
        await stack.client.submit_stamp("once", content=b"marker")
        await wait_for(lambda: _workflows(fresh_database_url, 2), 30, "two workflows")
        await wait_for(lambda: _finished(fresh_database_url, 2), 30, "both finished")
    row = (await aggregates(fresh_database_url))["once"]
    assert (row["workflows"], row["completed"], row["stamps"], row["duplicates"]) == (2, 2, 2, 0)
    wf = await fetch(fresh_database_url, "SELECT workflow_id FROM workflows WHERE request_id=$1",
                     request_id)
    assert [r["workflow_id"] for r in wf] == [derive_id(request_id, "workflow")]
    # Six distinct events per stamp workflow, each remembered once, in its workflow's row.
    applied = await fetch(fresh_database_url, "SELECT cardinality(applied_events) AS n, "
                          "cardinality(ARRAY(SELECT DISTINCT unnest(applied_events))) AS d "
                          "FROM workflows")
    assert [(r["n"], r["d"]) for r in applied] == [(6, 6), (6, 6)]
    orphans = await fetch(fresh_database_url, "SELECT count(*) AS n FROM processed_events")
    assert orphans[0]["n"] == 0


async def test_bad_input_fails_clearly_and_valid_work_goes_on(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content, max_content_bytes=1024)
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    (content / "escape").symlink_to(outside)
    (content / "big.bin").write_bytes(b"x" * 2048)
    ns = "bad"
    rid = lambda: str(uuid4())  # noqa: E731
    base = {"event_version": 1, "namespace": ns, "occurred_at": "2026-01-01T00:00:00Z",
            "source": "t"}
    unknown_type = {**base, "event_id": rid(), "correlation_id": rid(),
                    "event_type": "stamp.exploded", "payload": {"type": "stamp.exploded"}}
    broken_schema = {**base, "event_id": rid(), "correlation_id": rid(),
                     "event_type": "stamp.requested",
                     "payload": {"type": "stamp.requested", "path": 42}}
    async with running_stack(settings, endpoints) as stack:
        c = stack.client
        await c.publish_raw(b"{this is not json", ns.encode())
        await c.publish_raw(json.dumps(unknown_type).encode(), ns.encode())
        await c.publish_raw(json.dumps(broken_schema).encode(), ns.encode())
        await c.submit_stamp(ns, content=b"y" * 2048)              # inline, over the limit
        await c.submit_stamp(ns, path="big.bin")                     # file, over the limit
        await c.submit_stamp(ns, path="../secret.txt")              # traversal
        await c.submit_stamp(ns, path="escape")                      # symlink escape
        await c.submit_stamp(ns, path="missing.txt")                 # no such file
        await c.submit_stamp(ns, content=b"valid after all that")    # must still work
        await wait_for(lambda: _finished(fresh_database_url, 8), 60, "8 workflows")
        dlq = await read_topic(endpoints.bootstrap_servers, f"{settings.requests_topic}.dlq", 1)
    assert len(dlq) == 1
    dead = parse_dead_letter(dlq[0].value)
    assert dead["value"] == b"{this is not json"
    assert dead["topic"] == settings.requests_topic
    assert isinstance(dead["offset"], int) and isinstance(dead["partition"], int)
    assert "json" in dead["error"].lower()
    rows = await fetch(fresh_database_url,
                       "SELECT state, error_code, reason FROM workflows ORDER BY created_at")
    failed = [r for r in rows if r["state"] == "failed"]
    completed = [r for r in rows if r["state"] == "completed"]
    assert len(failed) == 7 and len(completed) == 1
    codes = sorted(r["error_code"] for r in failed)
    assert codes == sorted(["invalid_request", "invalid_request", "too_large", "too_large",
                            "outside_root", "outside_root", "not_found"])
    reasons = " | ".join(r["reason"] for r in failed)
    assert "stamp.exploded" in reasons  # the unknown type is named
    assert "payload.stamp.requested.path" in reasons  # so is the field that broke the schema
    for r in failed:
        assert r["reason"] and "\n" not in r["reason"]
    assert any("exceeds the limit of 1024 bytes" in r["reason"] for r in failed)
    agg = (await aggregates(fresh_database_url))[ns]
    assert (agg["workflows"], agg["completed"], agg["failed"], agg["stamps"]) == (8, 1, 7, 1)


async def test_hundreds_of_workflows_run_concurrently(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content, max_in_flight=256)
    n = 400
    async with running_stack(settings, endpoints, nodes=("reducer",)) as stack:
        # Requests first, then the orchestrator: it finds hundreds waiting and runs them at once.
        for i in range(n):
            await stack.client.submit_stamp(f"c{i % 4}", content=os.urandom(64), wait=False)
        await stack.client.flush()
        async with running_stack(settings, endpoints, nodes=("orchestrator",)) as orch:
            await wait_for(lambda: _finished(fresh_database_url, n), 90, f"{n} workflows")
            peak = orch.nodes.orchestrators[0].peak_in_flight
    assert peak >= 100, f"at most {peak} workflows ran at once"
    aggs = await aggregates(fresh_database_url)
    assert sum(r["completed"] for r in aggs.values()) == n
    assert sum(r["stamps"] for r in aggs.values()) == n


async def test_events_carry_correlation_ids(
    services: Services, fresh_database_url: str, topic_prefix: str, content: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, content)
    async with running_stack(settings, endpoints) as stack:
        request_id = await stack.client.submit_stamp("corr", content=base64.b16encode(b"z"))
        records = await read_topic(endpoints.bootstrap_servers, settings.events_topic, 6)
    events = [decode(r.value) for r in records]
    assert len(events) == 6
    assert {e.correlation_id for e in events} == {request_id}
    # keyed by the workflow's id (derived from the request's), not by namespace: one workflow
    # keeps its order in one partition while a namespace spreads over all of them
    workflow_id = derive_id(request_id, "workflow")
    assert all(r.key == str(workflow_id).encode() for r in records)
    assert len({r.partition for r in records}) == 1


async def _finished(url: str, n: int) -> bool:
    return await finished_count(url) >= n


async def _workflows(url: str, n: int) -> bool:
    rows = await fetch(url, "SELECT count(*) AS n FROM workflows")
    return int(rows[0]["n"]) >= n
