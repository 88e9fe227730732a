"""Two reducers on one namespace at once. Records are keyed by workflow, so a namespace's
events reach every reducer of the group; both must agree on what is new."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg
import pytest

from stampflow.contracts.events import Envelope, StampRequested, envelope_for
from stampflow.contracts.nodes import builtin_contract
from stampflow.migrate import migrate
from stampflow.nodes.orchestrator.core import (
    CallStamping,
    Emit,
    Limits,
    OrchestratorCore,
    StampSucceeded,
)
from stampflow.nodes.reducer.store import ReducerStore
from stampflow.testing.stack import fetch, reconcile

pytestmark = pytest.mark.integration

ORCH = builtin_contract("orchestrator")
FSMS = {spec.name: spec for spec in ORCH.fsm}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stamp_workflow(core: OrchestratorCore, namespace: str, digest: str) -> list[Envelope]:
    rid = uuid4()
    request = envelope_for(StampRequested(content=base64.b64encode(b"x")), namespace=namespace,
                           event_id=rid, correlation_id=rid, causation_id=None, source="t",
                           occurred_at=T0)
    workflow, commands = core.start(request, T0)
    assert workflow is not None and any(isinstance(c, CallStamping) for c in commands)
    _, more = core.step(workflow, StampSucceeded(digest, 1, "text/plain", T0,
                                                 T0 + timedelta(milliseconds=1)))
    return [c.envelope for c in [*commands, *more] if isinstance(c, Emit)]


async def test_two_reducers_count_a_stamp_seen_by_both_once(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    core = OrchestratorCore(ORCH, Limits(max_content_bytes=10))
    pools = [await asyncpg.create_pool(fresh_database_url, min_size=2, max_size=2)
             for _ in range(2)]
    try:
        stores = [ReducerStore(pool, FSMS) for pool in pools]
        rounds, per_round = 8, 50
        for _ in range(rounds):
            digests = [os.urandom(32).hex() for _ in range(per_round)]
            # the same content stamped by two workflows, each batch going to another reducer
            batches = [[e for d in digests for e in stamp_workflow(core, "shared", d)]
                       for _ in stores]
            # two partitions of the events topic: the reducers do not wait for each other
            await asyncio.gather(*(s.apply(b, {("events", i)})
                                   for i, (s, b) in enumerate(zip(stores, batches, strict=True))))
        rows = await fetch(fresh_database_url, """
            SELECT (SELECT count(*) FROM stamps WHERE namespace = 'shared') AS stamps,
                   (SELECT count(*) FROM workflows WHERE outcome = 'duplicate') AS dups,
                   a.stamps AS counted, a.duplicates AS counted_dups, a.completed
            FROM namespace_aggregates a WHERE a.namespace = 'shared'""")
        row = rows[0]
        total = rounds * per_round
        assert row["stamps"] == total and row["dups"] == total
        assert (row["counted"], row["counted_dups"]) == (total, total), row
        assert row["completed"] == 2 * total
        assert await reconcile(fresh_database_url) == []
    finally:
        for pool in pools:
            await pool.close()


async def test_two_reducers_given_one_partition_s_records_at_once_apply_them_once(
    fresh_database_url: str,
) -> None:
    """A rebalance hands a partition to a new reducer while the old one still applies the
    same records: each event must count once, whoever commits first."""
    await migrate(fresh_database_url)
    core = OrchestratorCore(ORCH, Limits(max_content_bytes=10))
    pools = [await asyncpg.create_pool(fresh_database_url, min_size=2, max_size=2)
             for _ in range(2)]
    try:
        stores = [ReducerStore(pool, FSMS) for pool in pools]
        rounds, per_round = 8, 50
        for _ in range(rounds):
            batch = [e for _ in range(per_round)
                     for e in stamp_workflow(core, "overlap", os.urandom(32).hex())]
            results = await asyncio.gather(*(s.apply(batch, {("events", 0)}) for s in stores))
            assert sorted(r.applied for r in results) == [0, len(batch)], results
        rows = await fetch(fresh_database_url, """
            SELECT (SELECT count(*) FROM workflows) AS workflows,
                   (SELECT count(*) FROM workflow_transitions) AS transitions,
                   a.workflows AS counted, a.completed, a.stamps
            FROM namespace_aggregates a WHERE a.namespace = 'overlap'""")
        total = rounds * per_round
        assert dict(rows[0]) == {"workflows": total, "transitions": 4 * total,
                                 "counted": total, "completed": total, "stamps": total}
        assert await reconcile(fresh_database_url) == []
    finally:
        for pool in pools:
            await pool.close()
