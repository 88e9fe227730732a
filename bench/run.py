"""stampflow's benchmark: each figure side by side with its bare library, in the same run.

    ./dev bench [--quick] [--no-generation] [--out bench/results]

Writes ``bench/results/latest.json`` and ``latest.md`` (and a dated copy of each), the
generation benchmark (bench/generation.py) included. The machine
is noisy: read the ratios against the bare library more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
from blake3 import blake3

from bench import bare
from bench.common import (
    Result,
    blake3_speed_index,
    default_gc,
    finished,
    fresh_db,
    machine_info,
    pct,
    process_cpu,
)
from stampflow.app import RunningNodes, prepare, run_nodes
from stampflow.bus import make_consumer, make_producer
from stampflow.client import Client
from stampflow.contracts.events import StampRequested, decode, envelope_for, new_event_id
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
    # ready() is true once each consumer has started, before it joined its group (a join
    # takes about 3 s on Tansu): wait for the assignments, as the bare pipeline does.
    consumers = [*(o._consumer for o in running.orchestrators),
                 *(r.consumer for r in running.reducers)]
    while not all(c is not None and c.assignment() for c in consumers):
        if time.monotonic() > deadline:
            raise TimeoutError("the nodes did not join their consumer groups within 60 s")
        await asyncio.sleep(0.01)
    return stop, task, running


Pids = dict[str, int]  # "broker"/"postgres" -> PID, for their CPU seconds


def cpu_now(pids: Pids) -> dict[str, float]:
    """CPU seconds so far: this process, the broker, PostgreSQL (every backend)."""
    return {"python": time.process_time(),
            **{name: process_cpu(pid) for name, pid in pids.items()}}


def cpu_per_workflow(before: dict[str, float], n: int, pids: Pids) -> dict[str, float]:
    after = cpu_now(pids)
    return {f"{k}_cpu_us_per_workflow": (after[k] - before[k]) / n * 1e6 for k in before}


async def publish_requests(s: Settings, endpoints: Endpoints, n: int) -> None:
    """n stamp requests of 1 KB inline content over 8 namespaces, as a client publishes them
    (the same for stampflow and for the bare pipeline)."""
    async with Client(s, endpoints, source="bench") as client:
        for i in range(n):
            await client.submit_stamp(f"ns{i % 8}", content=os.urandom(1024), wait=False)
        await client.flush()


async def bench_throughput(admin: Endpoints, work: Path, n: int, pids: Pids,
                           profile: cProfile.Profile | None = None) -> Result:
    """Stamps per second end to end: n requests waiting, then the nodes drain them."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"thr{uuid4().hex[:6]}", work)
    await prepare(s, endpoints)
    await publish_requests(s, endpoints, n)
    default_gc()
    stop, task, running = await start_nodes(s, endpoints, ["orchestrator", "reducer"])
    # Requests the orchestrator took before the reducer joined too (the bare pipeline
    # reports the same): the clock starts once both joined.
    head_start = running.orchestrators[0].processed
    cpu = cpu_now(pids)
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()  # the backlog is waiting; time from the moment the nodes joined
    stage1 = None  # when the orchestrator had taken every request (its events acknowledged)
    orchestrator = running.orchestrators[0]
    while await finished(endpoints.database_url) < n:
        if stage1 is None and orchestrator.processed >= n:
            stage1 = time.perf_counter() - t0
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    used = cpu_per_workflow(cpu, n, pids)
    stop.set()
    await task
    batches = running.reducers[0].batches
    return {"requests": n, "seconds": elapsed, "stamps_per_s": n / elapsed, **used,
            "consumed_before_clock": head_start,
            "first_stage_done_s": stage1 if stage1 is not None else elapsed,
            "reducer_batch_p50": statistics.median(batches) if batches else 0,
            "reducer_batch_max": max(batches) if batches else 0}


async def bench_bare_throughput(admin: Endpoints, work: Path, n: int, pids: Pids,
                                profile: cProfile.Profile | None = None) -> Result:
    """The same drain by the bare pipeline (bench/bare.py): the same requests, published the
    same way to topics of the same partition count on the same broker, a database of its own
    with the same schema on the same server, the rows COPYed into scratch tables."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"bare{uuid4().hex[:6]}", work)
    await prepare(s, endpoints)  # the same topics and schema as stampflow's run gets
    await publish_requests(s, endpoints, n)
    default_gc()
    before: dict[str, float] = {}

    def started() -> None:
        before.update(cpu_now(pids))

    result = await bare.drain(endpoints.bootstrap_servers, endpoints.database_url,
                              s.requests_topic, s.events_topic, s.consumer_group_prefix, n,
                              profile=profile, on_start=started)
    result.update(cpu_per_workflow(before, n, pids))
    return result


async def bench_end_to_end(admin: Endpoints, work: Path, n: int, rounds: int,
                           pids: Pids) -> Result:
    """Alternating rounds (bare, stampflow, bare, stampflow, ...); medians and their ratio."""
    runs: dict[str, list[Result]] = {"bare": [], "stampflow": []}
    for i in range(rounds):
        print(f"  round {i + 1}/{rounds}: bare ...", file=sys.stderr)
        runs["bare"].append(await bench_bare_throughput(admin, work, n, pids))
        print(f"  round {i + 1}/{rounds}: stampflow ...", file=sys.stderr)
        runs["stampflow"].append(await bench_throughput(admin, work, n, pids))
    med = {k: statistics.median(r["stamps_per_s"] for r in v) for k, v in runs.items()}
    cpu = {k: {key: statistics.median(r[key] for r in v) for key in v[0]
               if key.endswith("_cpu_us_per_workflow")} for k, v in runs.items()}
    return {"requests": n, "rounds": rounds, "bare": runs["bare"], "stampflow": runs["stampflow"],
            "bare_stamps_per_s": med["bare"], "stampflow_stamps_per_s": med["stampflow"],
            "ratio": med["stampflow"] / med["bare"],
            "round_ratios": [a["stamps_per_s"] / b["stamps_per_s"]
                             for a, b in zip(runs["stampflow"], runs["bare"], strict=True)],
            "cpu_us_per_workflow": cpu}


COMPLETED = b'"event_type":"workflow.completed"'


async def bench_latency(admin: Endpoints, work: Path, rate: float, seconds: float,
                        pipeline: str = "stampflow") -> Result:
    """p50/p99 from publish to the workflow's last event (workflow.completed) read back from
    the events topic, at a fixed rate, through stampflow's nodes or the bare pipeline. The
    reader is the same for both: it decodes only the records that are a workflow.completed
    (a byte search, then ``json.loads`` for the correlation id)."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    s = settings_for(endpoints, f"lat{uuid4().hex[:6]}", work)
    await prepare(s, endpoints)
    default_gc()
    async with contextlib.AsyncExitStack() as stack:
        if pipeline == "stampflow":
            stop, task, _ = await start_nodes(s, endpoints, ["orchestrator", "reducer"])

            async def stop_nodes() -> None:
                stop.set()
                await task

            stack.push_async_callback(stop_nodes)
        else:
            await bare.create_scratch_tables(endpoints.database_url)
            pipe = await stack.enter_async_context(bare.BarePipeline(
                endpoints.bootstrap_servers, endpoints.database_url, s.requests_topic,
                s.events_topic, s.consumer_group_prefix))
            await pipe.joined()
        n = int(rate * seconds)
        sent: dict[str, float] = {}
        lat: list[float] = []
        reader = make_consumer(endpoints.bootstrap_servers, [s.events_topic],
                               f"{s.topic_prefix}-r")
        await reader.start()

        async def read() -> None:
            while len(lat) < n:
                batch = await reader.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in batch.values():
                    for r in records:
                        if COMPLETED in r.value:
                            t = sent.get(json.loads(r.value)["correlation_id"])
                            if t is not None:
                                lat.append(now - t)

        reading = asyncio.create_task(read())
        deadline = time.monotonic() + 60
        while not reader.assignment() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the reader in its group before the first publish
        async with Client(s, endpoints, source="bench") as client:
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rid = new_event_id()
                sent[str(rid)] = time.perf_counter()
                await client.submit_stamp(f"ns{i % 8}", content=os.urandom(1024), event_id=rid,
                                          wait=False)
            publish_s = time.perf_counter() - t0
            await client.flush()
            try:
                await asyncio.wait_for(reading, timeout=180)
            finally:
                reading.cancel()
                await reader.stop()
    return {"pipeline": pipeline, "rate_per_s": rate, "requests": n,
            "achieved_rate_per_s": n / publish_s, "p50_ms": pct(lat, 0.5) * 1000,
            "p99_ms": pct(lat, 0.99) * 1000, "max_ms": max(lat) * 1000}


async def bench_latencies(admin: Endpoints, work: Path, rates: list[float],
                          seconds: float) -> Result:
    """Per rate: bare, then stampflow; p99 ratios."""
    out: list[Result] = []
    for rate in rates:
        row: Result = {"rate_per_s": rate}
        for pipeline in ("bare", "stampflow"):
            print(f"  {rate:.0f} req/s: {pipeline} ...", file=sys.stderr)
            row[pipeline] = await bench_latency(admin, work, rate, seconds, pipeline)
        row["p50_ratio"] = row["stampflow"]["p50_ms"] / row["bare"]["p50_ms"]
        row["p99_ratio"] = row["stampflow"]["p99_ms"] / row["bare"]["p99_ms"]
        out.append(row)
    return {"seconds": seconds, "rates": out}


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


# --- where the time goes -------------------------------------------------------------------


async def profile_e2e(admin: Endpoints, work: Path, n: int, pids: Pids) -> tuple[Result, str]:
    """One more drain of each pipeline under cProfile (not one of the measured rounds: the
    profiler slows Python down, not the broker or PostgreSQL)."""
    stats: dict[str, pstats.Stats] = {}
    results: dict[str, Result] = {}
    for name, drain in (("bare", bench_bare_throughput), ("stampflow", bench_throughput)):
        print(f"  profile: {name} ...", file=sys.stderr)
        # CPU time of this thread, not wall time: on two shared cores a wall-clock profile
        # charges whatever function was running when the process lost its core.
        prof = cProfile.Profile(time.thread_time)
        results[name] = await drain(admin, work, n, pids, profile=prof)
        stats[name] = pstats.Stats(prof)
    text = profile_text(stats, results, n)
    summary = {name: {"stamps_per_s_profiled": r["stamps_per_s"],
                      "by_package_us": by_package(stats[name], n)}
               for name, r in results.items()}
    return summary, text


def _where(file: str, line: int, func: str) -> str:
    f = file.replace("\\", "/")
    for marker in ("/site-packages/", "/stampflow/", "/bench/"):
        if marker in f:
            rest = f.split(marker, 1)[1]
            f = ("" if marker == "/site-packages/" else marker.strip("/") + "/") + rest
            break
    else:
        if "/lib/python3" in f:
            f = f.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{f}:{line}({func})" if file != "~" else func


def _package(file: str) -> str:
    f = file.replace("\\", "/")
    if "/stampflow/" in f:
        return "stampflow/" + f.split("/stampflow/", 1)[1]
    if "/bench/" in f:
        return "bench/" + f.split("/bench/", 1)[1]
    if "/site-packages/" in f:
        return f.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in f:
        rest = f.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return "stdlib " + rest.split("/", 1)[0].removesuffix(".py")
    return f


def by_package(stats: pstats.Stats, n: int) -> dict[str, float]:
    """Self time per package (stampflow: per module), µs per workflow. The self time of a C
    function goes to the packages of the Python functions that called it, in proportion;
    waiting in the event loop's epoll is its own line."""
    out: dict[str, float] = {}
    table = stats.stats  # type: ignore[attr-defined]
    for (file, _line, func), (_cc, _nc, tt, _ct, callers) in table.items():
        if file != "~":
            out[_package(file)] = out.get(_package(file), 0.0) + tt
            continue
        if "poll" in func and "epoll" in func:
            out["event loop: epoll"] = out.get("event loop: epoll", 0.0) + tt
            continue
        shares = {c: v[2] for c, v in callers.items()}
        total = sum(shares.values())
        if not shares or total <= 0:
            out[f"C {func}"] = out.get(f"C {func}", 0.0) + tt
            continue
        for (cfile, _l, _f), part in shares.items():
            key = _package(cfile) if cfile != "~" else "C (called from C)"
            out[key] = out.get(key, 0.0) + tt * part / total
    return {k: v / n * 1e6 for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def profile_text(stats: dict[str, pstats.Stats], results: dict[str, Result], n: int) -> str:
    lines = [f"Where the time goes: end-to-end drain of {n} waiting stamp requests, profiled with "
             "cProfile (this process only: both stampflow nodes, or both bare stages, plus the "
             "50 ms completion poll), one more drain each after the measured rounds.", "",
             "Times are CPU µs of the event loop's thread per workflow (cProfile with "
             "time.thread_time; waiting is not counted). cProfile inflates Python calls, so "
             "compare the two columns, not the absolute values with the unprofiled rounds. "
             "A coroutine counts one call per resumption, so calls/wf of async functions are "
             "resumptions. C functions' self time is charged to the packages of their Python "
             "callers in the package table.", ""]
    for name, r in results.items():
        cpu = ", ".join(f"{k.split('_')[0]} {v:.0f} µs" for k, v in r.items()
                        if k.endswith("_cpu_us_per_workflow"))
        lines.append(f"{name}: {r['seconds']:.2f} s under the profiler, "
                     f"{r['stamps_per_s']:.0f} stamps/s; CPU per workflow: {cpu}")
    pk = {name: by_package(st, n) for name, st in stats.items()}
    keys = sorted(set(pk["stampflow"]) | set(pk["bare"]),
                  key=lambda k: -(pk["stampflow"].get(k, 0) + pk["bare"].get(k, 0)))
    lines += ["", "== Self time by package (stampflow: by module), µs per workflow ==", "",
              f"{'package / module':<60} {'stampflow':>10} {'bare':>10}"]
    for k in keys:
        a, b = pk["stampflow"].get(k, 0.0), pk["bare"].get(k, 0.0)
        if max(a, b) >= 1.0:
            lines.append(f"{k[:60]:<60} {a:>10.1f} {b:>10.1f}")
    busy = {name: sum(p.values()) for name, p in pk.items()}
    lines.append(f"{'total':<60} {busy['stampflow']:>10.1f} {busy['bare']:>10.1f}")
    wall = {name: r["seconds"] / n * 1e6 for name, r in results.items()}
    lines.append(f"{'wall time of the drain':<60} {wall['stampflow']:>10.1f} {wall['bare']:>10.1f}")
    for name, st in stats.items():
        table = st.stats  # type: ignore[attr-defined]
        for label, index in (("self", 2), ("cumulative", 3)):
            lines += ["", f"== {name}: top 30 functions by {label} time, µs per workflow ==", "",
                      f"{'calls/wf':>9} {'self µs':>9} {'cum µs':>9}  function"]
            top = sorted(table.items(), key=lambda kv: -kv[1][index])[:30]
            for (file, line, func), (_cc, nc, tt, ct, _callers) in top:
                lines.append(f"{nc / n:>9.2f} {tt / n * 1e6:>9.1f} {ct / n * 1e6:>9.1f}  "
                             f"{_where(file, line, func)}")
    return "\n".join(lines) + "\n"


def stamp_events(workflows: int) -> list[Any]:
    """The events of ``workflows`` completed stamp workflows, as the orchestrator emits them."""
    core = OrchestratorCore(builtin_contract("orchestrator"), Limits(1 << 20))
    now = datetime.now(UTC)
    events = []
    for i in range(workflows):
        rid = new_event_id()
        req = envelope_for(StampRequested(content=b"eA=="), namespace=f"ns{i % 8}",
                           event_id=rid, correlation_id=rid, causation_id=None, source="bench",
                           occurred_at=now)
        wf, cmds = core.start(req, now)
        _, more = core.step(wf, StampSucceeded(blake3(rid.bytes).hexdigest(), 1, "text/plain",
                                               now, now))
        events += [c.envelope for c in [*cmds, *more] if isinstance(c, Emit)]
    return events


TARGETS = {"stamps": 0.6, "latency_p99_ms": 50.0, "reducer": 0.5}


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(result: Result) -> str:
    m = result["machine"]
    out = [f"# stampflow benchmark — {result['when']}", "",
           f"Machine: {m.get('cpu_model', '?')}, {m.get('usable_cpus', m['cpus'])} usable "
           f"cores ({m['cpus']} CPUs), speed index {m.get('blake3_GBps_1MB', 0):.2f} GB/s "
           f"(raw blake3, one thread, 1 MB, this run). {m['platform']}, Python {m['python']}. "
           f"Broker: {m['broker']}. PostgreSQL: {m['postgres']}."
           + (" **Quick run** (small N: a smoke test, not a measurement)."
              if result.get("quick") else ""), "",
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
    e, red = result["end_to_end"], result["reducer"]
    out += ["", "## End to end: stampflow against the bare pipeline (same run, one process each)",
            "",
            "The bare pipeline (bench/bare.py) does the same job with raw aiokafka, blake3, "
            "json and asyncpg COPY: no FSM, no pydantic, no dedup, no aggregates. Ratios are "
            "stampflow / bare.", "",
            "| figure | stampflow | bare | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| stamps/s, {e['requests']} waiting requests drained (median of {e['rounds']} "
            f"alternating rounds) | {e['stampflow_stamps_per_s']:.0f} | "
            f"{e['bare_stamps_per_s']:.0f} | {e['ratio']:.2f}× | ≥ {TARGETS['stamps']}× bare "
            f"| {_met(e['ratio'] >= TARGETS['stamps'])} |"]
    for row in result["latency"]["rates"]:
        a, b = row["stampflow"], row["bare"]
        rate = f"{row['rate_per_s']:.0f} req/s"
        p99_target = (f"< {TARGETS['latency_p99_ms']:.0f} ms"
                      if row["rate_per_s"] == 500 else "(reported)")
        p99_met = (_met(a["p99_ms"] < TARGETS["latency_p99_ms"])
                   if row["rate_per_s"] == 500 else "—")
        out += [f"| latency p50 at {rate} | {a['p50_ms']:.1f} ms | {b['p50_ms']:.1f} ms | "
                f"{row['p50_ratio']:.2f}× | | |",
                f"| latency p99 at {rate} | {a['p99_ms']:.1f} ms | {b['p99_ms']:.1f} ms | "
                f"{row['p99_ratio']:.2f}× | {p99_target} | {p99_met} |"]
    out += [f"| reducer events/s ({red['events']} events) vs raw asyncpg COPY of the same rows "
            f"| {red['events_per_s']:.0f} | {red['bare_copy_events_per_s']:.0f} | "
            f"{red['ratio']:.2f}× | ≥ {TARGETS['reducer']}× bare "
            f"| {_met(red['ratio'] >= TARGETS['reducer'])} |", "",
            "Latency: publish to the workflow's last event (workflow.completed) read back from "
            "the events topic by one reader, the same for both, in the process that runs the "
            f"pipeline ({result['latency']['seconds']:.0f} s at each rate). Achieved publish "
            "rates: " + ", ".join(
                f"{r['stampflow']['achieved_rate_per_s']:.0f}/{r['bare']['achieved_rate_per_s']:.0f}"
                for r in result["latency"]["rates"]) + " req/s (stampflow/bare).", "",
            "CPU per workflow during the drains (median of the rounds; this process, the "
            "broker, PostgreSQL with every backend):", "",
            "| | this process | broker | PostgreSQL | all |", "| --- | --- | --- | --- | --- |"]
    for name in ("stampflow", "bare"):
        c = e["cpu_us_per_workflow"][name]
        parts = [c.get(f"{k}_cpu_us_per_workflow", 0.0) for k in ("python", "broker", "postgres")]
        out.append(f"| {name} | {parts[0]:.0f} µs | {parts[1]:.0f} µs | {parts[2]:.0f} µs | "
                   f"{sum(parts):.0f} µs |")
    out += ["", "Rounds (stamps/s, in the order run): " + "; ".join(
        f"bare {b['stamps_per_s']:.0f}, stampflow {s['stamps_per_s']:.0f}"
        for b, s in zip(e["bare"], e["stampflow"], strict=True))
        + f". Per-pair ratios: {', '.join(f'{r:.2f}' for r in e['round_ratios'])}. "
        "Requests taken by the first stage before the clock started (it joined before the "
        "second stage did): " + "; ".join(
            f"bare {b['consumed_before_clock']}, stampflow {s['consumed_before_clock']}"
            for b, s in zip(e["bare"], e["stampflow"], strict=True)) + ". "
        "Seconds until the first stage (orchestrator) had acknowledged every request's "
        "events, of the whole drain: " + "; ".join(
            f"bare {b['first_stage_done_s']:.1f} of {b['seconds']:.1f}, stampflow "
            f"{s['first_stage_done_s']:.1f} of {s['seconds']:.1f}"
            for b, s in zip(e["bare"], e["stampflow"], strict=True)) + ". "
        f"Reducer batch p50 in the stampflow drains: "
        f"{statistics.median(r['reducer_batch_p50'] for r in e['stampflow']):.0f} events; "
        f"the bare pipeline's COPY batch p50: "
        f"{statistics.median(r['copy_batch_p50'] for r in e['bare']):.0f} rows."]
    if "profile" in result:
        out += ["", "Profile of one more drain each (cProfile in CPU time, this process; "
                "`profile-e2e.txt`): self time by package, µs per workflow under the profiler "
                "(it inflates Python code: compare the columns, not these with the CPU table "
                "above):", "",
                "| package | stampflow | bare |", "| --- | --- | --- |"]
        pk = {k: v["by_package_us"] for k, v in result["profile"].items()}
        keys = sorted(set(pk["stampflow"]) | set(pk["bare"]),
                      key=lambda k: -(pk["stampflow"].get(k, 0) + pk["bare"].get(k, 0)))[:15]
        for k in keys:
            out.append(f"| {k} | {pk['stampflow'].get(k, 0):.0f} | {pk['bare'].get(k, 0):.0f} |")
    if "reducer_cpu" in result:
        c = result["reducer_cpu"]
        out += ["", "## Improvement: garbage-collector tuning in the nodes", "",
                f"Reducer CPU per event (decode, reduce, SQL; {c['events']} events in batches of "
                f"5000, median of {c['rounds']} alternating rounds, this process only).", "",
                "| Python's GC defaults | tuned (`app.tune_gc`) | ratio |", "| --- | --- | --- |",
                f"| {c['cpu_us_per_event_gc_default']:.1f} µs ({c['events_per_s_gc_default']:.0f}"
                f" events/s) | {c['cpu_us_per_event_gc_tuned']:.1f} µs "
                f"({c['events_per_s_gc_tuned']:.0f} events/s) | {c['cpu_ratio']:.2f}× CPU |"]
    if "generation_error" in result:
        out += ["", "## Generation", "", f"Failed: `{result['generation_error']}`."]
    if "generation" in result:
        from bench.generation import markdown as generation_markdown

        body = generation_markdown(result["generation"]).split("\n", 1)[1]
        out += ["", "## Generation (tiny FLUX on this machine's CPU)",
                body.replace("\n## ", "\n### ")]
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> Result:
    result: Result = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                      "machine": machine_info(), "quick": args.quick}
    result["machine"]["blake3_GBps_1MB"] = blake3_speed_index()
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
        pids: Pids = {"broker": services.broker.pid, "postgres": services.postgres.pid}
        try:
            print("end to end, bare and stampflow alternating ...", file=sys.stderr)
            result["end_to_end"] = await bench_end_to_end(
                admin, work, 1000 if args.quick else 20000, 1 if args.quick else 3, pids)
            print("latency, bare and stampflow ...", file=sys.stderr)
            result["latency"] = await bench_latencies(
                admin, work, [500, 1000], seconds=2 if args.quick else 10)
            print("reducer ...", file=sys.stderr)
            result["reducer"] = await bench_reducer(
                admin, 2000 if args.quick else 10000)
            if not args.no_profile:
                print("profile of the end-to-end drains ...", file=sys.stderr)
                result["profile"], text = await profile_e2e(
                    admin, work, 500 if args.quick else 5000, pids)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "profile-e2e.txt").write_text(text)
            if not args.quick:
                print("reducer CPU, GC tuning off/on ...", file=sys.stderr)
                result["reducer_cpu"] = await bench_reducer_cpu(admin, 10000, 3)
        finally:
            await asyncio.to_thread(services.stop)
    if not args.no_generation:
        from bench import generation

        print("generation ...", file=sys.stderr)
        gen_args = argparse.Namespace(quick=args.quick, threads=min(2, os.cpu_count() or 1))
        try:
            result["generation"] = await generation.main_async(gen_args)
        except Exception as err:  # noqa: BLE001 - keep what was measured; main() exits 1
            traceback.print_exc()
            result["generation_error"] = repr(err)
    return result


def main() -> None:
    configure_logging("ERROR", "json", libraries="ERROR")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-profile", action="store_true",
                        help="leave out the profiled drains (results/profile-e2e.txt)")
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
    if "generation_error" in result:
        sys.exit(f"the generation benchmark failed: {result['generation_error']}")


if __name__ == "__main__":
    main()
