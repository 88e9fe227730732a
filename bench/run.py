"""stampflow's benchmark: each figure side by side with its bare library, in the same run.

    ./dev bench [--quick] [--no-generation] [--out bench/results]

Writes ``bench/results/latest.json`` and ``latest.md`` (and a dated copy of each), the
generation benchmark (bench/generation.py) included. The machine
is noisy: read the ratios against the bare library more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from blake3 import blake3

from bench.common import Result, finished, fresh_db, machine_info, pct
from stampflow.app import RunningNodes, prepare, run_nodes
from stampflow.bus import make_consumer, make_producer
from stampflow.client import Client
from stampflow.contracts.events import StampRequested, decode, envelope_for
from stampflow.contracts.nodes import builtin_contract
from stampflow.migrate import migrate
from stampflow.nodes.fsm import Taken, WorkflowContext, WorkflowMachine
from stampflow.nodes.orchestrator.core import Emit, Limits, OrchestratorCore, StampSucceeded
from stampflow.nodes.stamping import CHUNK_SIZE, StampingNode
from stampflow.observability import configure_logging
from stampflow.services import EmbeddedServices, Endpoints
from stampflow.settings import Settings


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --- stamping against raw blake3 ------------------------------------------------------------


def bench_stamping(work: Path, quick: bool) -> Result:
    node = StampingNode(work, max_bytes=2**40)
    rows = []
    for label, size, repeat in (("1 KB", 1024, 20000), ("1 MB", 1 << 20, 300)):
        data = os.urandom(size)
        ours = statistics.median(timed(lambda d=data: node.stamp_bytes(d, namespace="b"), repeat))
        raw = statistics.median(timed(lambda d=data: blake3(d).hexdigest(), repeat))
        rows.append({"input": label, "stampflow_s": ours, "raw_blake3_s": raw,
                     "stampflow_MBps": size / ours / 1e6, "raw_MBps": size / raw / 1e6,
                     "ratio": ours / raw})
    size = (256 << 20) if quick else (1 << 30)
    big = work / "big.bin"
    block = os.urandom(1 << 20)
    with big.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)

    def raw_file() -> str:
        h = blake3()
        buf = bytearray(CHUNK_SIZE)
        view = memoryview(buf)
        with big.open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        return h.hexdigest()

    ours = statistics.median(timed(lambda: node.stamp_path(big, namespace="b"), 3))
    raw = statistics.median(timed(raw_file, 3))
    rows.append({"input": f"{size >> 20} MB file", "stampflow_s": ours, "raw_blake3_s": raw,
                 "stampflow_MBps": size / ours / 1e6, "raw_MBps": size / raw / 1e6,
                 "ratio": ours / raw})
    big.unlink()
    return {"rows": rows}


# --- FSM against a bare transitions Machine -------------------------------------------------


def bench_fsm(n: int) -> Result:
    from transitions import Machine

    spec = builtin_contract("orchestrator").fsm_named("stamp")
    ours = WorkflowMachine(spec, {"content_within_limit": lambda w, k: True})

    context = WorkflowContext(namespace="bench", request_id=uuid4(),
                              started_at=datetime.now(UTC))

    def run_ours() -> None:
        for _ in range(n):
            wf, _ = ours.create(uuid4(), context)
            for trigger in ("start", "hashed", "complete"):
                fired = ours.fire(wf, trigger)
                assert isinstance(fired, Taken), fired
                wf = fired.workflow

    class Model:
        pass

    table = [{"trigger": t.trigger, "source": list(t.source), "dest": t.dest}
             for t in spec.transitions]

    def run_bare_shared() -> None:
        machine = Machine(model=None, states=list(spec.states), transitions=table,
                          initial=spec.initial, auto_transitions=False)
        for _ in range(n):
            m = Model()
            machine.add_model(m)
            m.start()  # type: ignore[attr-defined]
            m.hashed()  # type: ignore[attr-defined]
            m.complete()  # type: ignore[attr-defined]
            machine.remove_model(m)

    def run_bare_per_model() -> None:
        for _ in range(n):
            m = Model()
            Machine(model=m, states=list(spec.states), transitions=table,
                    initial=spec.initial, auto_transitions=False)
            m.start()  # type: ignore[attr-defined]
            m.hashed()  # type: ignore[attr-defined]
            m.complete()  # type: ignore[attr-defined]

    per = 3 * n
    t_ours = min(timed(run_ours, 3)) / per
    t_shared = min(timed(run_bare_shared, 3)) / per
    t_per_model = min(timed(run_bare_per_model, 1)) / per
    return {"transitions": per, "stampflow_us": t_ours * 1e6,
            "bare_shared_machine_us": t_shared * 1e6,
            "bare_machine_per_workflow_us": t_per_model * 1e6,
            "ratio_vs_bare_shared": t_ours / t_shared,
            "ratio_vs_machine_per_workflow": t_ours / t_per_model}


# --- end to end -----------------------------------------------------------------------------


def settings_for(endpoints: Endpoints, prefix: str, root: Path) -> Settings:
    return Settings(services="external", database_url=endpoints.database_url,  # type: ignore[arg-type]
                    bootstrap_servers=endpoints.bootstrap_servers, topic_prefix=prefix,
                    consumer_group_prefix=prefix, content_root=root, log_level="ERROR",
                    max_in_flight=1024)


async def start_nodes(settings: Settings, endpoints: Endpoints, nodes: list[str],
                      ) -> tuple[asyncio.Event, asyncio.Task[RunningNodes], RunningNodes]:
    """Start the nodes and return once every one has joined its consumer group."""
    stop, started, running = asyncio.Event(), asyncio.Event(), RunningNodes()
    task = asyncio.create_task(run_nodes(settings, endpoints, nodes, stop, started=started,
                                         running=running))
    await asyncio.wait_for(started.wait(), 60)
    deadline = time.monotonic() + 60
    while not running.ready() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return stop, task, running


async def bench_throughput(admin: Endpoints, work: Path, n: int) -> Result:
    """Stamps per second end to end: n requests waiting, then the nodes drain them."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"thr{uuid4().hex[:6]}", work)
    await prepare(s, endpoints)
    async with Client(s, endpoints, source="bench") as client:
        for i in range(n):
            await client.submit_stamp(f"ns{i % 8}", content=os.urandom(1024), wait=False)
        await client.flush()
    stop, task, running = await start_nodes(s, endpoints, ["orchestrator", "reducer"])
    t0 = time.perf_counter()  # the backlog is waiting; time from the moment the nodes joined
    while await finished(endpoints.database_url) < n:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    batches = running.reducers[0].batches
    return {"requests": n, "seconds": elapsed, "stamps_per_s": n / elapsed,
            "reducer_batch_p50": statistics.median(batches) if batches else 0,
            "reducer_batch_max": max(batches) if batches else 0}


async def bench_latency(admin: Endpoints, work: Path, rate: float, seconds: float) -> Result:
    """p50/p99 from publish to workflow.completed on the events topic, at a fixed rate."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"lat{uuid4().hex[:6]}", work)
    stop, task, _ = await start_nodes(s, endpoints, ["orchestrator", "reducer"])
    n = int(rate * seconds)
    sent: dict[UUID, float] = {}
    lat: list[float] = []
    reader = make_consumer(endpoints.bootstrap_servers, [s.events_topic], f"{s.topic_prefix}-r")
    await reader.start()

    async def read() -> None:
        while len(lat) < n:
            batch = await reader.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    e = decode(r.value)
                    if e.event_type == "workflow.completed" and e.correlation_id in sent:
                        lat.append(now - sent[e.correlation_id])

    reading = asyncio.create_task(read())
    await asyncio.sleep(1.5)
    async with Client(s, endpoints, source="bench") as client:
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = uuid4()
            sent[rid] = time.perf_counter()
            await client.submit_stamp(f"ns{i % 8}", content=os.urandom(1024), event_id=rid,
                                      wait=False)
        await client.flush()
        try:
            await asyncio.wait_for(reading, timeout=120)
        finally:
            reading.cancel()
            await reader.stop()
    stop.set()
    await task
    return {"rate_per_s": rate, "requests": n, "p50_ms": pct(lat, 0.5) * 1000,
            "p99_ms": pct(lat, 0.99) * 1000, "max_ms": max(lat) * 1000}


async def bench_reducer(admin: Endpoints, workflows: int) -> Result:
    """Reducer events/s from a full events topic, against raw asyncpg COPY of the same rows."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"red{uuid4().hex[:6]}", Path("."))
    await prepare(s, endpoints)
    now = datetime.now(UTC)
    events = stamp_events(workflows)
    producer = make_producer(endpoints.bootstrap_servers, linger_ms=20)
    await producer.start()
    futures = [await producer.send(s.events_topic, value=e.to_bytes(), key=e.key())
               for e in events]
    await asyncio.gather(*futures)
    await producer.stop()
    stop, task, running = await start_nodes(s, endpoints, ["reducer"])
    t0 = time.perf_counter()
    while await finished(endpoints.database_url) < workflows:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    ours = len(events) / elapsed

    # Bare: COPY the same rows (transitions, workflows, stamps) into fresh tables.
    bare_url = await fresh_db(admin.database_url)
    await migrate(bare_url)
    conn = await asyncpg.connect(bare_url)
    trans, wfs, stamps = [], {}, []
    for e in events:
        p = e.payload
        if p.type == "workflow.transitioned":
            trans.append((p.workflow_id, p.seq, e.namespace, p.from_state, p.to_state,
                          p.trigger, None, e.event_id, e.occurred_at))
            wfs[p.workflow_id] = (p.workflow_id, e.namespace, "stamp", p.to_state, p.seq,
                                  e.correlation_id, e.occurred_at, e.occurred_at)
        elif p.type == "stamp.created":
            stamps.append((e.namespace, p.hash, "blake3", p.size, p.content_type, None,
                           p.workflow_id, p.stamped_at))
    t0 = time.perf_counter()
    async with conn.transaction():
        await conn.copy_records_to_table("processed_events", records=[
            (e.event_id, e.namespace, now) for e in events])
        await conn.copy_records_to_table("workflow_transitions", records=trans, columns=[
            "workflow_id", "seq", "namespace", "from_state", "to_state", "trigger", "reason",
            "event_id", "occurred_at"])
        await conn.copy_records_to_table("workflows", records=list(wfs.values()), columns=[
            "workflow_id", "namespace", "kind", "state", "seq", "request_id", "created_at",
            "updated_at"])
        await conn.copy_records_to_table("stamps", records=stamps, columns=[
            "namespace", "hash", "algorithm", "size", "content_type", "source",
            "first_workflow_id", "stamped_at"])
    bare = len(events) / (time.perf_counter() - t0)
    await conn.close()
    return {"events": len(events), "seconds": elapsed, "events_per_s": ours,
            "bare_copy_events_per_s": bare, "ratio": ours / bare,
            "reducer_batch_p50": statistics.median(running.reducers[0].batches)}


async def bench_reducer_cpu(admin: Endpoints, workflows: int, rounds: int) -> Result:
    """The reducer's own CPU per event (decode + reduce + the batch's SQL, 5000 per batch),
    with the nodes' garbage-collector tuning off and on, alternating, in this one process."""
    import gc

    from stampflow.app import tune_gc
    from stampflow.contracts.nodes import load_contracts
    from stampflow.nodes.reducer.store import ReducerStore

    fsms = {spec.name: spec for spec in load_contracts()["orchestrator"].fsm}
    raws = [e.to_bytes() for e in stamp_events(workflows)]
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    wall: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            url = await fresh_db(admin.database_url)
            await migrate(url)
            pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
            store = ReducerStore(pool, fsms)
            gc.unfreeze()
            gc.set_threshold(700, 10, 10)  # Python's defaults
            gc.collect()
            if mode == "on":
                tune_gc()
            t0, w0 = time.process_time(), time.perf_counter()
            for i in range(0, len(raws), 5000):
                await store.apply([decode(r) for r in raws[i:i + 5000]])
            cpu[mode].append((time.process_time() - t0) / len(raws) * 1e6)
            wall[mode].append(len(raws) / (time.perf_counter() - w0))
            await pool.close()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    return {"events": len(raws), "rounds": rounds, "cpu_us_per_event_gc_default": off,
            "cpu_us_per_event_gc_tuned": on, "cpu_ratio": on / off,
            "events_per_s_gc_default": statistics.median(wall["off"]),
            "events_per_s_gc_tuned": statistics.median(wall["on"])}


def stamp_events(workflows: int) -> list[Any]:
    """The events of ``workflows`` completed stamp workflows, as the orchestrator emits them."""
    core = OrchestratorCore(builtin_contract("orchestrator"), Limits(1 << 20))
    now = datetime.now(UTC)
    events = []
    for i in range(workflows):
        rid = uuid4()
        req = envelope_for(StampRequested(content=b"eA=="), namespace=f"ns{i % 8}",
                           event_id=rid, correlation_id=rid, causation_id=None, source="bench",
                           occurred_at=now)
        wf, cmds = core.start(req, now)
        _, more = core.step(wf, StampSucceeded(blake3(rid.bytes).hexdigest(), 1, "text/plain",
                                               now, now))
        events += [c.envelope for c in [*cmds, *more] if isinstance(c, Emit)]
    return events


def markdown(result: Result) -> str:
    out = [f"# stampflow benchmark — {result['when']}", "",
           f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
           f"Python {result['machine']['python']}. Broker: {result['machine']['broker']}.", "",
           "## Stamping against raw blake3", "",
           "| input | stampflow | raw blake3 | ratio |", "| --- | --- | --- | --- |"]
    for r in result["stamping"]["rows"]:
        out.append(f"| {r['input']} | {r['stampflow_MBps']:.0f} MB/s | {r['raw_MBps']:.0f} MB/s "
                   f"| {r['ratio']:.2f}× time |")
    f = result["fsm"]
    out += ["", "## FSM transition", "",
            "| stampflow WorkflowMachine | bare Machine, shared + add_model | bare Machine per "
            "workflow |", "| --- | --- | --- |",
            f"| {f['stampflow_us']:.1f} µs | {f['bare_shared_machine_us']:.1f} µs "
            f"({f['ratio_vs_bare_shared']:.2f}×) | {f['bare_machine_per_workflow_us']:.1f} µs "
            f"({f['ratio_vs_machine_per_workflow']:.2f}×) |"]
    t, lat, red = result["throughput"], result["latency"], result["reducer"]
    out += ["", "## End to end (embedded broker and PostgreSQL, one process)", "",
            "| measure | value | target |", "| --- | --- | --- |",
            f"| stamps/s, {t['requests']} waiting requests drained | {t['stamps_per_s']:.0f} "
            "| ≥ 3,000 |",
            f"| latency at {lat['rate_per_s']:.0f} req/s, p50 | {lat['p50_ms']:.1f} ms | |",
            f"| latency at {lat['rate_per_s']:.0f} req/s, p99 | {lat['p99_ms']:.1f} ms "
            "| < 50 ms |",
            f"| reducer events/s ({red['events']} events) | {red['events_per_s']:.0f} "
            "| ≥ 30,000 |",
            f"| raw asyncpg COPY of the same rows, events/s | "
            f"{red['bare_copy_events_per_s']:.0f} | |",
            f"| reducer / raw COPY | {red['ratio']:.2f} | |",
            f"| reducer batch p50 | {red['reducer_batch_p50']:.0f} events | ≥ 1,000 |"]
    if "reducer_cpu" in result:
        c = result["reducer_cpu"]
        out += ["", "## Improvement: garbage-collector tuning in the nodes", "",
                f"Reducer CPU per event (decode, reduce, SQL; {c['events']} events in batches of "
                f"5000, median of {c['rounds']} alternating rounds, this process only).", "",
                "| Python's GC defaults | tuned (`app.tune_gc`) | ratio |", "| --- | --- | --- |",
                f"| {c['cpu_us_per_event_gc_default']:.1f} µs ({c['events_per_s_gc_default']:.0f}"
                f" events/s) | {c['cpu_us_per_event_gc_tuned']:.1f} µs "
                f"({c['events_per_s_gc_tuned']:.0f} events/s) | {c['cpu_ratio']:.2f}× CPU |"]
    if "generation" in result:
        from bench.generation import markdown as generation_markdown

        body = generation_markdown(result["generation"]).split("\n", 1)[1]
        out += ["", "## Generation (tiny FLUX on this machine's CPU)",
                body.replace("\n## ", "\n### ")]
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> Result:
    result: Result = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                      "machine": machine_info(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="stampflow-bench-") as tmp:
        work = Path(tmp)
        print("stamping ...", file=sys.stderr)
        result["stamping"] = bench_stamping(work, args.quick)
        print("fsm ...", file=sys.stderr)
        result["fsm"] = bench_fsm(2000 if args.quick else 20000)
        services = EmbeddedServices(work / "services", fast=False)
        await asyncio.to_thread(services.start)
        # Each measurement gets a database of its own: the superuser creates them (the owner
        # role that nodes use in production may not).
        admin = Endpoints(services.postgres.url(), services.broker.bootstrap_servers)
        try:
            print("throughput ...", file=sys.stderr)
            result["throughput"] = await bench_throughput(
                admin, work, 3000 if args.quick else 20000)
            print("latency ...", file=sys.stderr)
            result["latency"] = await bench_latency(
                admin, work, rate=500, seconds=3 if args.quick else 10)
            print("reducer ...", file=sys.stderr)
            result["reducer"] = await bench_reducer(
                admin, 2000 if args.quick else 10000)
            print("reducer CPU, GC tuning off/on ...", file=sys.stderr)
            result["reducer_cpu"] = await bench_reducer_cpu(
                admin, 2000 if args.quick else 10000, 2 if args.quick else 3)
        finally:
            await asyncio.to_thread(services.stop)
    if not args.no_generation:
        from bench import generation

        print("generation ...", file=sys.stderr)
        gen_args = argparse.Namespace(quick=args.quick, threads=min(2, os.cpu_count() or 1))
        result["generation"] = await generation.main_async(gen_args)
    return result


def main() -> None:
    configure_logging("ERROR", "json", libraries="ERROR")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-generation", action="store_true",
                        help="leave out the generation benchmark (bench.generation)")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = result["when"].replace(":", "").replace("-", "")
    md = markdown(result)
    for name in ("latest", f"bench-{stamp}"):
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
