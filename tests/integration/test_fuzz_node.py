"""10,000 hypothesis-made records against running nodes, among valid requests: every record
ends as a dead letter or a failed (or, when valid, finished) workflow; the valid traffic is
counted exactly; the nodes keep running."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from contracts.events import derive_id
from nodes.deadletter import parse_dead_letter
from nodes.orchestrator.admission import Admission, Admitted, Refused, Unreadable, admit
from tests.fuzz import RECORDS
from tests.integration.stack import (
    aggregates,
    fetch,
    read_topic,
    reconcile,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ_CASES = int(os.environ.get("STAMPFLOW_FUZZ_CASES", "10000"))


def fuzz_records(n: int) -> list[bytes]:
    """``n`` records drawn by hypothesis from the shared strategies, reproducibly."""
    drawn: list[bytes] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(RECORDS)
    def collect(raw: bytes) -> None:
        drawn.append(raw)

    collect()
    return drawn


def _request_id(answer: Admission) -> UUID | None:
    if isinstance(answer, Refused):
        return answer.request_id
    if isinstance(answer, Admitted):
        return answer.request.event_id
    return None


async def test_ten_thousand_fuzz_records_against_running_nodes(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    # A request id names one request: a second, different request under the same id is taken
    # for a redelivery (README, "Exactly once"). Hypothesis reuses ids, so a record whose id
    # was drawn before gets a fresh one (its other fields stay as drawn).
    rng = random.Random(11)
    records, answers, seen = [], [], set()
    for raw in fuzz_records(int(FUZZ_CASES * 1.05)):
        answer = admit(raw)
        if _request_id(answer) in seen:
            doc = json.loads(raw)
            doc["event_id"] = str(UUID(int=rng.getrandbits(128), version=4))
            raw = json.dumps(doc).encode()
            answer = admit(raw)
        rid = _request_id(answer)
        if rid is not None:
            if rid in seen:
                continue
            seen.add(rid)
        records.append(raw)
        answers.append(answer)
    assert len(records) >= FUZZ_CASES
    unreadable = sum(isinstance(a, Unreadable) for a in answers)
    workflow_ids = {derive_id(a.request_id if isinstance(a, Refused) else a.request.event_id,
                              "workflow")
                    for a in answers if isinstance(a, Refused | Admitted)}
    assert len(workflow_ids) == len(answers) - unreadable
    assert unreadable > 100 and len(workflow_ids) > 100  # the fuzz reaches both outcomes

    endpoints = services.endpoints.with_database(fresh_database_url)
    settings_ = settings_for(endpoints, topic_prefix, tmp_path)
    async with running_stack(settings_, endpoints) as stack:
        for i, raw in enumerate(records):
            await stack.client.publish_raw(raw, f"k{i % 7}".encode(), wait=False)
            if i % 20 == 0:  # valid traffic, interleaved
                await stack.client.submit_stamp("control", content=f"valid {i}".encode(),
                                                wait=False)
        await stack.client.flush()
        valid = len(range(0, len(records), 20))
        expected = len(workflow_ids) + valid

        async def all_terminal() -> bool:
            rows = await fetch(fresh_database_url, "SELECT count(*) AS n FROM workflows "
                                                   "WHERE state IN ('completed', 'failed')")
            return int(rows[0]["n"]) >= expected

        await wait_for(all_terminal, 240, f"{expected} terminal workflows")
        assert all(not t.done() for t in asyncio.all_tasks() if t.get_name() in (
            "orchestrator", "reducer")), "a node stopped"
        letters = await read_topic(endpoints.bootstrap_servers,
                                   settings_.dlq_topic(settings_.requests_topic), unreadable)
    rows = await fetch(fresh_database_url, "SELECT workflow_id, namespace, state FROM workflows")
    fuzzed = {r["workflow_id"] for r in rows if r["namespace"] != "control"}
    assert fuzzed == workflow_ids
    assert all(r["state"] in ("completed", "failed") for r in rows)
    originals = {(d["partition"], d["offset"]) for d in
                 (parse_dead_letter(rec.value) for rec in letters)}
    assert len(originals) == unreadable
    control = (await aggregates(fresh_database_url))["control"]
    assert (control["workflows"], control["completed"], control["stamps"]) == (valid,) * 3
    assert await reconcile(fresh_database_url) == []
