"""Generation benchmark on CPU: a tiny random-weight FLUX, each figure beside the bare library.

    python -m bench.generation [--quick] [--threads N] [--out bench/results]

Writes ``bench/results/generation.json`` and ``generation.md``. The tiny FLUX (built here by
``make_tiny_flux``) costs ~40 ms a call on CPU, so what is measured is stampflow's own cost
around a real diffusers call, not image quality. Figures:

a. bare ``FluxPipeline`` call (diffusers only), 64x64, 2 steps, batch 1;
b. the same request through ``InferenceEffectNode.generate`` in-process (batcher, worker
   thread, PNG encode, artifact store, stamp), with ``max_batch_wait_ms`` 0 and 50 (shipped);
c. end to end through the embedded broker and PostgreSQL: publish -> ``workflow.completed``;
d. images/s of the engine with groups of 1 against groups of 8 (N=32);
e. RSS over 1,000 generations through the effect node.
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
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import torch

from bench.common import fresh_db, machine_info, pct
from stampflow.app import RunningNodes, run_nodes
from stampflow.bus import make_consumer
from stampflow.client import Client
from stampflow.contracts.events import GenerationRequested, decode, new_event_id
from stampflow.contracts.nodes import BatchingPolicy, IoPolicy, builtin_contract, load_contracts
from stampflow.inference import ArtifactStore, InferenceEffectNode, ModelRegistry, make_tiny_flux
from stampflow.inference.effect import JobOwner
from stampflow.inference.engine import InferenceEngine
from stampflow.inference.jobs import GenerationJob
from stampflow.nodes.orchestrator.core import GenerationSucceeded
from stampflow.nodes.stamping import StampingNode
from stampflow.observability import configure_logging
from stampflow.services import EmbeddedServices, Endpoints
from stampflow.settings import Settings

Result = dict[str, Any]
SIZE, STEPS, MAX_SEQ = 64, 2, 512  # MAX_SEQ: what InferenceEngine passes (its default)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def stats_ms(values: list[float]) -> Result:
    return {"n": len(values), "p50_ms": pct(values, 0.5) * 1000,
            "p99_ms": pct(values, 0.99) * 1000, "mean_ms": statistics.fmean(values) * 1000,
            "min_ms": min(values) * 1000}


# --- a. the bare diffusers call ---------------------------------------------------------------


def bench_bare(model_dir: Path, n: int, warmup: int) -> Result:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def call(i: int) -> None:
        # The same arguments InferenceEngine passes, minus stampflow's own work.
        with torch.inference_mode():
            pipe(prompt=[f"a red cat {i}"], width=SIZE, height=SIZE, num_inference_steps=STEPS,
                 guidance_scale=0.0, generator=[torch.Generator("cpu").manual_seed(i)],
                 output_type="np", max_sequence_length=MAX_SEQ)

    for i in range(warmup):
        call(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return stats_ms(times)


# --- b. the effect node in-process ------------------------------------------------------------


def effect_node(model_dir: Path, work: Path, batch: int, wait_ms: int) -> InferenceEffectNode:
    base = builtin_contract("inference").io_policy
    policy = IoPolicy.model_validate({**base.model_dump(), "device": "cpu", "batching":
                                      BatchingPolicy(max_batch_size=batch,
                                                     max_batch_wait_ms=wait_ms)})
    return InferenceEffectNode(
        registry=ModelRegistry({"tiny": model_dir}, device="cpu"),
        artifacts=ArtifactStore(work / "artifacts"),
        stamping=StampingNode(work, max_bytes=100_000_000), io_policy=policy)


def request(i: int, steps: int = STEPS) -> GenerationRequested:
    return GenerationRequested(prompt=f"a red cat {i}", width=SIZE, height=SIZE,
                               num_inference_steps=steps, model="tiny", seed=i)


async def one(node: InferenceEffectNode, i: int, steps: int = STEPS) -> None:
    outcome = await node.generate(request(i, steps), seed=i,
                                  owner=JobOwner(uuid.uuid4(), "bench"))
    if not isinstance(outcome, GenerationSucceeded):
        raise RuntimeError(f"generation failed: {outcome}")


async def bench_effect(model_dir: Path, work: Path, n: int, warmup: int, wait_ms: int) -> Result:
    node = effect_node(model_dir, work, batch=8, wait_ms=wait_ms)
    try:
        for i in range(warmup):
            await one(node, i)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            await one(node, i)
            times.append(time.perf_counter() - t0)
    finally:
        await node.aclose()
    return {"max_batch_size": 8, "max_batch_wait_ms": wait_ms, **stats_ms(times)}


# --- c. end to end through the real stack -----------------------------------------------------


async def bench_e2e(admin: Endpoints, work: Path, model_dir: Path, n: int, warmup: int,
                    wait_ms: int) -> Result:
    """Closed loop: publish one request, wait for its workflow.completed, then the next."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    prefix = f"gen{uuid.uuid4().hex[:6]}"
    s = Settings(services="external", database_url=endpoints.database_url,  # type: ignore[arg-type]
                 bootstrap_servers=endpoints.bootstrap_servers, topic_prefix=prefix,
                 consumer_group_prefix=prefix, content_root=work, log_level="ERROR",
                 models={"tiny": str(model_dir)}, artifact_root=work / "artifacts",
                 inference_device="cpu")
    contracts = load_contracts()
    inf = contracts["inference"]
    contracts["inference"] = inf.model_copy(update={"io_policy": inf.io_policy.model_copy(
        update={"batching": BatchingPolicy(max_batch_size=8, max_batch_wait_ms=wait_ms)})})
    stop, started, running = asyncio.Event(), asyncio.Event(), RunningNodes()
    task = asyncio.create_task(run_nodes(s, endpoints, ["orchestrator", "reducer", "inference"],
                                         stop, contracts=contracts, started=started,
                                         running=running))
    await asyncio.wait_for(started.wait(), 60)
    deadline = time.monotonic() + 60
    while not running.ready() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    # The reader polls with a short fetch wait so that it adds little of its own.
    reader = make_consumer(endpoints.bootstrap_servers, [s.events_topic], f"{prefix}-r",
                           fetch_max_wait_ms=5)
    await reader.start()
    done: dict[UUID, asyncio.Future[float]] = {}
    inference_ms: dict[UUID, float] = {}

    async def read() -> None:
        while True:
            batch = await reader.getmany(timeout_ms=5)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    e = decode(r.value)
                    if e.event_type == "generation.completed":
                        inference_ms[e.correlation_id] = float(
                            e.payload.timings_ms.get("inference", 0.0))  # type: ignore[union-attr]
                    if e.event_type == "workflow.completed" and e.correlation_id in done:
                        fut = done[e.correlation_id]
                        if not fut.done():
                            fut.set_result(now)

    reading = asyncio.create_task(read())
    lat: list[float] = []
    inner: list[float] = []
    around: list[float] = []  # per request: end to end minus its own pipeline call
    try:
        async with Client(s, endpoints, source="bench") as client:
            for i in range(warmup + n):
                rid = new_event_id()
                done[rid] = asyncio.get_running_loop().create_future()
                t0 = time.perf_counter()
                await client.submit_generation("bench", request(i), event_id=rid)
                t1 = await asyncio.wait_for(done[rid], 120)
                if i >= warmup:
                    lat.append(t1 - t0)
                    if rid in inference_ms:
                        inner.append(inference_ms[rid] / 1000.0)
                        around.append(t1 - t0 - inference_ms[rid] / 1000.0)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await reader.stop()
        stop.set()
        await task
    out = {"max_batch_size": 8, "max_batch_wait_ms": wait_ms, **stats_ms(lat)}
    if inner:
        out["pipeline_call_in_stack_p50_ms"] = pct(inner, 0.5) * 1000
        out["around_call_p50_ms"] = pct(around, 0.5) * 1000
        out["around_call_p99_ms"] = pct(around, 0.99) * 1000
    return out


# --- d. batched against unbatched -------------------------------------------------------------


def bench_batching(model_dir: Path, n: int, repeat: int) -> Result:
    engine = InferenceEngine(ModelRegistry({"tiny": model_dir}, device="cpu"))
    jobs = [GenerationJob(prompt=f"a red cat {i}", seed=i, model="tiny", width=SIZE,
                          height=SIZE, num_inference_steps=STEPS) for i in range(n)]
    engine.run(jobs[:8])  # load + warm up both shapes
    engine.run(jobs[:1])
    rows: Result = {}
    for size in (1, 8):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for k in range(0, n, size):
                engine.run(jobs[k:k + size])
            best = min(best, time.perf_counter() - t0)
        rows[f"batch_{size}"] = {"seconds": best, "images_per_s": n / best}
    rows["requests"] = n
    rows["ratio_batch8_over_batch1"] = (rows["batch_8"]["images_per_s"]
                                        / rows["batch_1"]["images_per_s"])
    return rows


# --- e. memory over 1,000 generations ---------------------------------------------------------


async def bench_memory(model_dir: Path, work: Path, total: int, every: int, warmup: int,
                       steps: int) -> Result:
    import gc

    node = effect_node(model_dir, work, batch=8, wait_ms=0)
    series: list[Result] = []
    try:
        for i in range(warmup):
            await one(node, 10_000_000 + i, steps)
        gc.collect()
        series.append({"generations": 0, "rss_mb": rss_mb()})
        t0 = time.perf_counter()
        for i in range(total):
            await one(node, i, steps)
            if (i + 1) % every == 0:
                series.append({"generations": i + 1, "rss_mb": rss_mb()})
        elapsed = time.perf_counter() - t0
    finally:
        await node.aclose()
    first, last = series[0]["rss_mb"], series[-1]["rss_mb"]
    second_half = [p["rss_mb"] for p in series if p["generations"] >= total // 2]
    return {"warmup": warmup, "steps": steps, "generations": total, "seconds": elapsed,
            "series": series, "growth_mb": last - first,
            "growth_second_half_mb": second_half[-1] - second_half[0],
            "max_mb": max(p["rss_mb"] for p in series), "min_mb": min(p["rss_mb"] for p in series)}


# --- report -----------------------------------------------------------------------------------


def markdown(r: Result) -> str:
    m, bare = r["machine"], r["bare"]
    out = [f"# stampflow generation benchmark — {r['when']}", "",
           f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, torch "
           f"{m['torch']}, diffusers {m['diffusers']}, torch threads {m['torch_threads']}. "
           f"Model: tiny random-weight FLUX (make_tiny_flux), {SIZE}x{SIZE}, {STEPS} steps, "
           "batch 1, fp32 on CPU." + (" Quick run." if r["quick"] else ""), "",
           "## Latency per request", "",
           "| path | p50 | p99 | overhead p50 vs bare |", "| --- | --- | --- | --- |",
           f"| a. bare FluxPipeline call | {bare['p50_ms']:.1f} ms | {bare['p99_ms']:.1f} ms | — |"]
    for e in r["effect"]:
        out.append(f"| b. InferenceEffectNode.generate, max_batch_wait_ms "
                   f"{e['max_batch_wait_ms']} | {e['p50_ms']:.1f} ms | {e['p99_ms']:.1f} ms | "
                   f"{e['overhead_p50_ms']:+.1f} ms |")
    for e in r["e2e"]:
        out.append(f"| c. end to end publish → workflow.completed, max_batch_wait_ms "
                   f"{e['max_batch_wait_ms']} | {e['p50_ms']:.1f} ms | {e['p99_ms']:.1f} ms | "
                   f"{e['overhead_p50_ms']:+.1f} ms |")
    out += ["", "Overhead = path p50 − bare p50 (a). Within each end-to-end run the pipeline "
            "call itself (generation.completed timings_ms.inference) had a p50 of "
            + ", ".join(f"{e.get('pipeline_call_in_stack_p50_ms', float('nan')):.1f} ms "
                        f"(wait {e['max_batch_wait_ms']})" for e in r["e2e"])
            + ". Per request, end to end minus that request's own pipeline call: p50 "
            + ", ".join(f"{e.get('around_call_p50_ms', float('nan')):.1f} ms / p99 "
                        f"{e.get('around_call_p99_ms', float('nan')):.1f} ms "
                        f"(wait {e['max_batch_wait_ms']})" for e in r["e2e"])
            + " (the broker and PostgreSQL share the CPUs with the pipeline, so the bare "
            "p50 is not the in-stack call time). Aim: orchestration overhead ≤ 10 ms at p50 "
            "(contract threshold generation_overhead_p50_ms).", ""]
    b = r["batching"]
    out += ["## Batched against unbatched", "",
            f"{b['requests']} requests through InferenceEngine.run, best of the repeats.", "",
            "| group size | seconds | images/s |", "| --- | --- | --- |",
            f"| 1 | {b['batch_1']['seconds']:.3f} | {b['batch_1']['images_per_s']:.1f} |",
            f"| 8 | {b['batch_8']['seconds']:.3f} | {b['batch_8']['images_per_s']:.1f} |", "",
            f"Batch 8 / batch 1: {b['ratio_batch8_over_batch1']:.2f}×", ""]
    mem = r["memory"]
    out += ["## Memory over generations", "",
            f"RSS (VmRSS) after {mem['warmup']} warm-up generations, then every "
            f"{mem['series'][1]['generations']} of {mem['generations']} ({mem['steps']} "
            f"step(s), effect node, {mem['seconds']:.0f} s).", "",
            "| generations | RSS MB |", "| --- | --- |"]
    out += [f"| {p['generations']} | {p['rss_mb']:.1f} |" for p in mem["series"]]
    out += ["", f"Growth: {mem['growth_mb']:+.1f} MB over all, "
            f"{mem['growth_second_half_mb']:+.1f} MB over the second half."]
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> Result:
    import diffusers

    quick = args.quick
    torch.set_num_threads(args.threads)
    info = {**machine_info(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_threads": torch.get_num_threads()}
    result: Result = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                      "machine": info, "quick": quick}
    n = 30 if quick else 100
    warm = 5 if quick else 10
    with tempfile.TemporaryDirectory(prefix="stampflow-genbench-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_flux(work / "tiny-flux", seed=0)
        print("a. bare pipeline ...", file=sys.stderr)
        result["bare"] = bench_bare(model_dir, n, warm)
        bare_p50 = result["bare"]["p50_ms"]
        print("b. effect node ...", file=sys.stderr)
        result["effect"] = []
        for wait in (0, 50):
            e = await bench_effect(model_dir, work / f"eff{wait}", n, warm, wait)
            e["overhead_p50_ms"] = e["p50_ms"] - bare_p50
            result["effect"].append(e)
        print("d. batching ...", file=sys.stderr)
        result["batching"] = bench_batching(model_dir, 32, 2 if quick else 3)
        print("e. memory ...", file=sys.stderr)
        result["memory"] = await bench_memory(
            model_dir, work / "mem", total=200 if quick else 1000, every=20 if quick else 100,
            warmup=50, steps=1)
        print("c. end to end ...", file=sys.stderr)
        services = EmbeddedServices(work / "services", fast=False)
        await asyncio.to_thread(services.start)
        result["e2e"] = []
        # The superuser creates each run's database (the owner role in services.endpoints
        # may not create databases).
        admin = Endpoints(services.postgres.url(), services.broker.bootstrap_servers)
        try:
            for wait in (0, 50):
                e = await bench_e2e(admin, work / f"e2e{wait}", model_dir,
                                    20 if quick else n, 3 if quick else warm, wait)
                e["overhead_p50_ms"] = e["p50_ms"] - bare_p50
                result["e2e"].append(e)
        finally:
            await asyncio.to_thread(services.stop)
    return result


def main() -> None:
    configure_logging("ERROR", "json", libraries="ERROR")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch.set_num_threads (default: min(2, CPUs))")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "generation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
