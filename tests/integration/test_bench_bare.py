"""The benchmark's bare pipeline (bench/bare.py) against the real broker and PostgreSQL: the
baseline that every end-to-end figure of ``./dev bench`` is a ratio to must do the whole job
(every request hashed, six events each, every row written), or the ratios flatter stampflow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from uuid import UUID

import pytest
from bench import bare
from blake3 import blake3

from stampflow.app import prepare
from stampflow.client import Client
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import fetch, read_topic, settings_for

pytestmark = pytest.mark.integration

N = 120


async def test_the_bare_pipeline_hashes_every_request_and_writes_its_rows(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    await prepare(settings, endpoints)
    contents = {}
    async with Client(settings, endpoints, source="test") as client:
        for i in range(N):
            data = os.urandom(1 + i * 7)
            rid = await client.submit_stamp(f"ns{i % 3}", content=data, wait=False)
            contents[rid] = (f"ns{i % 3}", data)
        await client.flush()

    result = await bare.drain(endpoints.bootstrap_servers, fresh_database_url,
                              settings.requests_topic, settings.events_topic,
                              settings.consumer_group_prefix, N, timeout=120)

    assert result["rows"] == {"bare_workflows": N, "bare_transitions": 4 * N, "bare_stamps": N}
    assert result["consumed"] == N
    assert result["events_produced"] == result["events_read"] == 6 * N
    assert result["stamps_per_s"] > 0
    workflows = await fetch(fresh_database_url,
                            "SELECT workflow_id, namespace, request_id, hash, state, seq "
                            "FROM bare_workflows")
    assert {r["request_id"] for r in workflows} == set(contents)
    for r in workflows:
        ns, data = contents[r["request_id"]]
        assert (r["namespace"], r["hash"], r["state"], r["seq"]) == (
            ns, blake3(data).hexdigest(), "completed", 4)
    stamps = await fetch(fresh_database_url,
                         "SELECT namespace, hash, size, first_workflow_id FROM bare_stamps")
    by_workflow = {r["workflow_id"]: r for r in workflows}
    for s in stamps:
        w = by_workflow[s["first_workflow_id"]]
        assert (s["namespace"], s["hash"]) == (w["namespace"], w["hash"])
    history = await fetch(fresh_database_url,
                          "SELECT workflow_id, array_agg(to_state ORDER BY seq) AS states "
                          "FROM bare_transitions GROUP BY workflow_id")
    assert len(history) == N
    assert all(r["states"] == ["received", "hashing", "stamped", "completed"] for r in history)
    # The events on the topic are stampflow's shapes: six per workflow, in its order.
    records = await read_topic(endpoints.bootstrap_servers, settings.events_topic, 6 * N)
    types: dict[str, list[str]] = {}
    for rec in records:
        event = json.loads(rec.value)
        assert UUID(event["correlation_id"]) in contents
        types.setdefault(event["payload"]["workflow_id"], []).append(event["event_type"])
    assert len(types) == N
    assert all(t == ["workflow.transitioned"] * 3 + ["stamp.created", "workflow.transitioned",
                                                     "workflow.completed"]
               for t in types.values())
