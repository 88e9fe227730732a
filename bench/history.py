"""The reducer against a history that keeps growing: events/s with 0, 10 million and 50 million
prior events in the database, and PostgreSQL's bytes per workflow.

`python -m bench.history [--quick] [--prior 0,10000000,50000000]` (results in
`results/history.{json,md}`). Prior events are written straight into the tables as the reducer
would have left them (stamp workflows of six events: one workflow row with its six applied ids,
four transitions, one stamp), in the partition that today's rows go to (the worst case for one
partition's indexes) and in the namespaces of the timed workload (so its stamps land among
the prior ones in the (namespace, hash) index). Their workflow ids are time-ordered as the
orchestrator derives them from UUIDv7 request ids, with times before the run's. Then the same
fresh workload (decoded envelopes, batches of 5,000, through `ReducerStore.apply`, as the
reducer node calls it) is timed, five rounds each, in the same database growing from one step
to the next. Reported: events/s per step, each step's ratio to the first, and the index blocks
that missed PostgreSQL's buffer cache per 1,000 events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import fresh_db, machine_info
from bench.run import stamp_events
from stampflow.contracts.nodes import load_contracts
from stampflow.migrate import migrate
from stampflow.nodes.reducer.store import ReducerStore
from stampflow.services.postgres import EmbeddedPostgres

RESULTS = Path(__file__).parent / "results"
EVENTS_PER_WORKFLOW = 6
CHUNK = 250_000  # workflows per INSERT
# The prior workflows' ids carry milliseconds from here on, one per workflow: all before the
# timed workload's, as a history written before it would be.
PRIOR_EPOCH_MS = int((time.time() - 30 * 86_400) * 1000)

STATIO_SQL = "SELECT indexrelname, idx_blks_read FROM pg_statio_user_indexes"

PRIOR_SQL = """
WITH w AS (
    INSERT INTO workflows (workflow_id, namespace, kind, state, seq, request_id, created_at,
                           updated_at, outcome, hash, duration_ms, applied_events)
    SELECT (lpad(to_hex($3::bigint + i), 12, '0') || '7' || substr(md5(i::text), 1, 19))::uuid,
           'ns' || (i % 8), 'stamp', 'completed', 4, gen_random_uuid(),
           now(), now(), 'stamped', encode(sha256(int8send(i)), 'hex'), 1.0,
           ARRAY[gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), gen_random_uuid(),
                 gen_random_uuid(), gen_random_uuid()]
    FROM generate_series($1::bigint, $2::bigint) AS i
    RETURNING workflow_id, namespace, hash
), s AS (
    INSERT INTO stamps (namespace, hash, size, content_type, source, first_workflow_id,
                        stamped_at)
    SELECT namespace, hash, 1024, 'text/plain', NULL, workflow_id, now() FROM w
)
INSERT INTO workflow_transitions (workflow_id, seq, namespace, from_state, to_state, trigger,
                                  event_id, occurred_at)
SELECT w.workflow_id, t.seq, w.namespace, t.from_state, t.to_state, t.trigger,
       gen_random_uuid(), now()
FROM w, (VALUES (1, NULL, 'received', 'receive'), (2, 'received', 'hashing', 'hash'),
                (3, 'hashing', 'stamped', 'stamped'), (4, 'stamped', 'completed', 'complete'))
        AS t(seq, from_state, to_state, trigger)
"""

SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')
"""


async def add_prior(url: str, start: int, workflows: int) -> float:
    t0 = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        for lo in range(start, start + workflows, CHUNK):
            hi = min(start + workflows, lo + CHUNK) - 1
            await conn.execute(PRIOR_SQL, lo, hi, PRIOR_EPOCH_MS)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def time_reducer(url: str, workflows: int, rounds: int) -> list[float]:
    fsms = {spec.name: spec for spec in load_contracts()["orchestrator"].fsm}
    rates = []
    for _ in range(rounds):
        events = stamp_events(workflows)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            store = ReducerStore(pool, fsms)
            t0 = time.perf_counter()
            for i in range(0, len(events), 5000):
                await store.apply(events[i:i + 5000], {("events", 0)})
            rates.append(len(events) / (time.perf_counter() - t0))
        finally:
            await pool.close()
    return rates


async def index_reads(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {row[0]: int(row[1] or 0) for row in await conn.fetch(STATIO_SQL)}
    finally:
        await conn.close()


async def bytes_per_workflow(url: str) -> tuple[int, float, int]:
    conn = await asyncpg.connect(url)
    try:
        total = int(await conn.fetchval(SIZE_SQL))
        count = int(await conn.fetchval("SELECT count(*) FROM workflows"))
        registry = int(await conn.fetchval("SELECT pg_relation_size('stamps_pkey')"))
    finally:
        await conn.close()
    return total, total / max(1, count), registry


async def main(prior_steps: list[int], workflows: int, rounds: int,
               shared_buffers: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stampflow-history-") as tmp:
        options = {"shared_buffers": shared_buffers} if shared_buffers else {}
        pg = EmbeddedPostgres(Path(tmp) / "pg", fast=True, options=options)
        pg.start(120)
        try:
            url = await fresh_db(pg.url())
            await migrate(url)
            conn = await asyncpg.connect(url)
            shared_buffers = await conn.fetchval("SHOW shared_buffers")
            await conn.close()
            steps = []
            have = 0
            for prior in prior_steps:
                want = prior // EVENTS_PER_WORKFLOW
                loaded = await add_prior(url, have, want - have) if want > have else 0.0
                have = want
                conn = await asyncpg.connect(url)
                await conn.execute("ANALYZE")  # every step timed with statistics, the first too
                await conn.close()
                before = await index_reads(url)
                rates = await time_reducer(url, workflows, rounds)
                after = await index_reads(url)
                per_k = 1000 / (workflows * EVENTS_PER_WORKFLOW * rounds)
                misses = {name: round((after[name] - before.get(name, 0)) * per_k, 2)
                          for name in after if after[name] > before.get(name, 0)}
                total, per, registry = await bytes_per_workflow(url)
                steps.append({"prior_events": prior, "prior_workflows": want,
                              "load_seconds": loaded, "events_per_s": statistics.median(rates),
                              "rounds": rates, "database_bytes": total,
                              "bytes_per_workflow": per, "stamps_index_bytes": registry,
                              "index_misses_per_1000_events": dict(sorted(
                                  misses.items(), key=lambda kv: -kv[1])[:4])})
                print(f"prior {prior:>11,} events: {statistics.median(rates):,.0f} events/s, "
                      f"{per:,.0f} bytes per workflow", flush=True)
        finally:
            pg.stop()
    base = steps[0]["events_per_s"]
    for step in steps:
        step["ratio_to_first"] = step["events_per_s"] / base
    return {"at": datetime.now(UTC).isoformat(), "machine": machine_info(),
            "workload_events": workflows * EVENTS_PER_WORKFLOW, "batch": 5000,
            "shared_buffers": shared_buffers,
            "steps": steps}


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# Reducer against a growing history — {result['at']}", "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}; "
        f"{m['postgres']} (fsync off, shared_buffers {result.get('shared_buffers', '?')}).",
        "",
        f"Each step: {result['workload_events']:,} new events (stamp workflows) through "
        f"`ReducerStore.apply` in batches of {result['batch']:,}, median of "
        f"{len(result['steps'][0]['rounds'])} rounds; the prior events were written into the "
        "same database before the step. Target: every step within 10% of the first.", "",
        "| prior events | reducer events/s | ratio to no history | database bytes per "
        "workflow | stamps index | index blocks read from outside the buffer cache, per "
        "1,000 events | load time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["steps"]:
        misses = ", ".join(f"{name} {n:g}" for name, n in
                           s.get("index_misses_per_1000_events", {}).items()) or "none"
        lines.append(f"| {s['prior_events']:,} | {s['events_per_s']:,.0f} | "
                     f"{s['ratio_to_first']:.2f} | {s['bytes_per_workflow']:,.0f} | "
                     f"{int(s.get('stamps_index_bytes', 0)) / 2**20:,.0f} MiB | "
                     f"{misses} | {s['load_seconds']:.0f} s |")
    (out / "history.md").write_text("\n".join(lines) + "\n")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0 and 100,000 prior events")
    parser.add_argument("--prior", default="0,10000000,50000000",
                        help="comma-separated prior event counts, growing")
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shared-buffers", default=None,
                        help="PostgreSQL's shared_buffers (default: the server's, 128MB)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = [0, 100_000] if args.quick else [int(x) for x in args.prior.split(",")]
    workflows = 2_000 if args.quick else args.workflows
    result = asyncio.run(main(steps, workflows, 1 if args.quick else args.rounds,
                              args.shared_buffers))
    write(result, args.out)


if __name__ == "__main__":
    cli()
