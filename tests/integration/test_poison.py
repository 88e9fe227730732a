"""No single record stops or stalls a node: values PostgreSQL refuses, records near the broker's
size limit, and records whose events can never be published."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from stampflow.bus import make_producer
from stampflow.nodes.deadletter import DEFAULT_MAX_MESSAGE_BYTES, parse_dead_letter
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    fetch,
    finished_count,
    read_topic,
    reconcile,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = [pytest.mark.integration]


def _hostile_event(namespace: str) -> bytes:
    """Valid to the contract, refused by PostgreSQL: a workflow created at a time that is year
    0 in UTC (timestamptz has no such date; asyncpg cannot even encode it)."""
    workflow_id = uuid.uuid4()
    doc: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "event_type": "workflow.transitioned",
        "namespace": namespace, "correlation_id": str(uuid.uuid4()),
        "occurred_at": "0001-01-01T00:00:00+14:00", "source": "hostile",
        "payload": {"type": "workflow.transitioned", "workflow_id": str(workflow_id),
                    "workflow_kind": "stamp", "seq": 1, "from_state": None,
                    "to_state": "received", "trigger": "start"},
    }
    return json.dumps(doc).encode()


async def test_values_the_database_refuses_never_stop_the_reducer(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    """Before: one NUL in a content type stopped the reducer for good (it exited, and again
    on every restart). Now the contract refuses the NUL at admission (a failed workflow with
    the field named), and an event that is valid to the contract but refused by PostgreSQL is
    bisected out of its batch, dead-lettered and recorded, while the rest of the batch lands."""
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings, endpoints) as stack:
        for i in range(100):
            await stack.client.submit_stamp("p1", content=f"before {i}".encode(), wait=False)
        nul = uuid.uuid4()  # a producer of its own: stampflow's client would refuse it
        await stack.client.publish_raw(json.dumps({
            "event_id": str(nul), "event_type": "stamp.requested", "namespace": "p1",
            "correlation_id": str(nul), "occurred_at": "2026-01-01T00:00:00Z", "source": "x",
            "payload": {"type": "stamp.requested", "content": "eA==",
                        "content_type": "text/plain\u0000"}}).encode(), b"p1")
        await _publish(endpoints.bootstrap_servers, settings.events_topic,
                       _hostile_event("p1"), b"p1")
        for i in range(100):
            await stack.client.submit_stamp("p1", content=f"after {i}".encode(), wait=False)
        await stack.client.flush()
        await wait_for(lambda: _finished(fresh_database_url, 201), 90, "201 workflows")
        letters = await read_topic(endpoints.bootstrap_servers,
                                   settings.dlq_topic(settings.events_topic), 1)
        reducer = stack.nodes.reducers[0]
        assert reducer.unstorable == 1
    [row] = await fetch(fresh_database_url, "SELECT state, error_code, reason FROM workflows "
                                            "WHERE request_id = $1", nul)
    assert row["state"] == "failed" and row["error_code"] == "invalid_request"
    assert "content_type" in row["reason"] and "\n" not in row["reason"]
    [letter] = [parse_dead_letter(r.value) for r in letters]
    assert letter["topic"] == settings.events_topic
    assert "the database refused this event" in letter["error"]
    anomalies = await fetch(fresh_database_url, "SELECT kind, detail FROM anomalies")
    assert [a["kind"] for a in anomalies] == ["unstorable"]
    assert await reconcile(fresh_database_url) == []


async def test_a_record_near_the_size_limit_becomes_a_bounded_dead_letter(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    """Before: an unreadable record of ~0.8-1 MiB made a dead letter over the broker's limit
    (base64 inside JSON); the publish failed with MessageSizeTooLargeError, which the
    orchestrator retried forever (the partition's commit point froze). Now the letter keeps a
    bounded copy and says it was cut, and the partition moves on."""
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    big = b"\xff" + bytes(range(256)) * 3500  # ~0.9 MB, not JSON
    async with running_stack(settings, endpoints) as stack:
        await stack.client.publish_raw(big, b"p2")
        # The reducer's side: the same bytes on the events topic crashed it in a loop.
        await _publish(endpoints.bootstrap_servers, settings.events_topic, big, b"p2")
        for i in range(50):
            await stack.client.submit_stamp("p2", content=f"after {i}".encode(), wait=False)
        await stack.client.flush()
        await wait_for(lambda: _finished(fresh_database_url, 50), 60, "50 workflows")
        letters = await read_topic(endpoints.bootstrap_servers,
                                   settings.dlq_topic(settings.requests_topic), 1)
        event_letters = await read_topic(endpoints.bootstrap_servers,
                                         settings.dlq_topic(settings.events_topic), 1)
        orchestrator = stack.nodes.orchestrators[0]
        await wait_for(lambda: _all_committed(orchestrator), 10, "every offset committable")
    for [record] in (letters, event_letters):
        assert len(record.value) <= DEFAULT_MAX_MESSAGE_BYTES
        letter = parse_dead_letter(record.value)
        assert letter["value_truncated"] is True and letter["value_size"] == len(big)
        assert big.startswith(letter["value"]) and len(letter["value"]) > 500_000
    assert await reconcile(fresh_database_url) == []


async def _publish(bootstrap: str, topic: str, value: bytes, key: bytes) -> None:
    """Straight onto a topic, as a hostile producer would (no client-side validation)."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _finished(url: str, n: int) -> bool:
    return await finished_count(url) >= n


async def _all_committed(orchestrator: Any) -> bool:
    return orchestrator.tracker.in_flight() == 0
