"""Load: 10,000 workflows in flight and the memory they take, consumer lag through a burst, and
the largest sustained request rate whose end-to-end p99 stays under 100 ms.

    ./dev sh python -m bench.load [--quick]

Writes bench/results/load.{json,md}. The nodes run as their own processes (`stampflow run`), so
their memory is theirs alone; the broker, PostgreSQL, the nodes and this client share 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from bench.common import finished, fresh_db, machine_info
from bench.run import bench_latency
from stampflow.app import prepare
from stampflow.client import Client
from stampflow.contracts.events import GenerationRequested
from stampflow.observability import configure_logging
from stampflow.services import EmbeddedServices, Endpoints, free_port
from stampflow.testing.stack import NodeProcess, settings_for

Result = dict[str, Any]
P99_LIMIT_MS = 100.0


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None  # the node is too busy to answer right now: skip this sample
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def metric(port: int, name: str) -> float | None:
    """Sum of a Prometheus metric's samples on a node's /metrics (None: no answer)."""
    return await asyncio.to_thread(_metric, port, name)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Nodes:
    def __init__(self, endpoints: Endpoints, work: Path, env: dict[str, str],
                 **overrides: Any) -> None:
        self.settings = settings_for(endpoints, f"load{uuid4().hex[:6]}", work, **overrides)
        self.endpoints = endpoints
        self.port = free_port()  # the orchestrator's /metrics
        self.reducer_port = free_port()
        self.procs: list[NodeProcess] = []
        self._env = env
        self._work = work

    async def __aenter__(self) -> Nodes:
        await prepare(self.settings, self.endpoints)
        self.procs = [
            NodeProcess("orchestrator", self.settings, self._work / "orchestrator.log",
                        extra_env={**self._env, "STAMPFLOW_HTTP_PORT": str(self.port)}),
            NodeProcess("reducer", self.settings, self._work / "reducer.log",
                        extra_env={**self._env, "STAMPFLOW_HTTP_PORT": str(self.reducer_port)}),
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await metric(self.port, "stampflow_workflows_in_flight") is not None:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)  # the reducer joins its group too
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()

    @property
    def orchestrator_pid(self) -> int:
        return self.procs[0].proc.pid


async def bench_in_flight(admin: Endpoints, work: Path, cap: int, requests: int,
                          model: Path) -> Result:
    """``requests`` generation requests against an orchestrator admitting ``cap`` at a time:
    the tiny model on the CPU is the bottleneck, so the admitted ones wait in flight."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    run = work / f"inflight-{cap}"
    run.mkdir()
    env = {"STAMPFLOW_MAX_IN_FLIGHT": str(cap),
           "STAMPFLOW_MODELS": json.dumps({"tiny": str(model)}),
           "STAMPFLOW_ARTIFACT_ROOT": str(run / "artifacts")}
    async with Nodes(endpoints, run, env) as nodes:
        pid = nodes.orchestrator_pid
        idle_rss = rss_mb(pid)
        peak_in_flight, peak_rss, samples = 0.0, 0.0, []
        t0 = time.monotonic()
        async with Client(nodes.settings, endpoints, source="load") as client:
            for i in range(requests):
                req = GenerationRequested(prompt=f"load {i}", seed=i, width=64, height=64,
                                          num_inference_steps=1, model="tiny")
                await client.submit(f"ns{i % 8}", req, wait=False)
            await client.flush()
        published_s = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            in_flight = await metric(nodes.port, "stampflow_workflows_in_flight")
            if in_flight is None:
                continue
            rss = rss_mb(pid)
            samples.append((round(time.monotonic() - t0, 2), int(in_flight), round(rss, 1)))
            peak_in_flight, peak_rss = max(peak_in_flight, in_flight), max(peak_rss, rss)
            if peak_in_flight >= cap and len(samples) > 20:
                break
            await asyncio.sleep(0.25)
        done = await finished(endpoints.database_url)
        hwm = rss_mb(pid, "VmHWM")
    return {"cap": cap, "requests": requests, "published_s": round(published_s, 1),
            "peak_in_flight": int(peak_in_flight), "idle_rss_mb": round(idle_rss, 1),
            "peak_rss_mb": round(max(peak_rss, hwm), 1), "finished_when_measured": done,
            "samples": samples[::4]}


async def bench_burst(admin: Endpoints, work: Path, burst: int, steady_rate: float) -> Result:
    """Steady traffic, then ``burst`` requests at once, then steady again: how far the backlog
    (published − finished) and the orchestrator's consumer lag rise, and how soon they fall."""
    endpoints = admin.with_database(await fresh_db(admin.database_url))
    run = work / "burst"
    run.mkdir()
    async with Nodes(endpoints, run, {}) as nodes:
        published = 0
        timeline: list[tuple[float, int, int, int]] = []
        t0 = time.monotonic()

        async def sample() -> None:
            while True:
                done = await finished(endpoints.database_url)
                lag = await metric(nodes.reducer_port, "stampflow_consumer_lag")
                timeline.append((round(time.monotonic() - t0, 2), published, published - done,
                                 -1 if lag is None else int(lag)))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        async with Client(nodes.settings, endpoints, source="load") as client:
            async def steady(seconds: float) -> None:
                nonlocal published
                start = time.monotonic()
                while time.monotonic() - start < seconds:
                    await client.submit_stamp(f"ns{published % 8}",
                                              content=f"steady {published}".encode(), wait=False)
                    published += 1
                    await asyncio.sleep(1 / steady_rate)

            await steady(5)
            burst_at = time.monotonic() - t0
            for i in range(burst):
                await client.submit_stamp(f"ns{i % 8}", content=f"burst {i}".encode(), wait=False)
                published += 1
            await client.flush()
            burst_end = time.monotonic() - t0
            recovered_at = None
            while time.monotonic() - t0 < burst_end + 180:
                await steady(1)
                await client.flush()
                last = timeline[-1] if timeline else None
                if last and last[0] > burst_end and last[2] <= steady_rate * 0.5:
                    recovered_at = last[0]
                    break
        sampler.cancel()
        peak_backlog = max(t[2] for t in timeline)
        peak_lag = max(t[3] for t in timeline)
    return {"burst": burst, "steady_rate_per_s": steady_rate, "burst_at_s": round(burst_at, 2),
            "burst_published_s": round(burst_end - burst_at, 2), "peak_backlog": peak_backlog,
            "peak_consumer_lag": peak_lag,
            "recovered_after_s": round(recovered_at - burst_end, 1) if recovered_at else None,
            "drain_rate_per_s": round(burst / (recovered_at - burst_at), 0) if recovered_at
            else None, "timeline": timeline[::4]}


async def bench_max_rate(admin: Endpoints, work: Path, rates: list[float], seconds: float,
                         ) -> Result:
    """Step the publish rate up; the largest rate whose p99 stays under 100 ms. Stops after
    two steps in a row over the limit."""
    steps = []
    best = None
    over = 0
    for rate in rates:
        step = await bench_latency(admin, work, rate, seconds)
        steps.append({k: round(v, 1) for k, v in step.items()})
        if step["p99_ms"] < P99_LIMIT_MS:
            best, over = rate, 0
        else:
            over += 1
            if over == 2:
                break
    return {"p99_limit_ms": P99_LIMIT_MS, "largest_rate_per_s": best, "steps": steps}


def markdown(r: Result) -> str:
    inf = r["in_flight"]
    b = r["burst"]
    m = r["max_rate"]
    lines = [f"# stampflow load — {r['when']}", "",
             f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, Python "
             f"{r['machine']['python']}. Embedded PostgreSQL and Tansu; the nodes are "
             "`stampflow run` processes (the rate steps run them in this process).", "",
             "## Workflows in flight and memory", "",
             "Generation requests (tiny FLUX, 64x64, 1 step, CPU) queue behind the model, so "
             "every admitted workflow stays in flight. Orchestrator memory:", "",
             "| in-flight cap | requests | peak in flight | RSS idle | peak RSS |",
             "| --- | --- | --- | --- | --- |"]
    for x in inf:
        lines.append(f"| {x['cap']} | {x['requests']} | {x['peak_in_flight']} | "
                     f"{x['idle_rss_mb']} MB | {x['peak_rss_mb']} MB |")
    if len(inf) == 2 and inf[1]["peak_in_flight"] > inf[0]["peak_in_flight"]:
        per = ((inf[1]["peak_rss_mb"] - inf[0]["peak_rss_mb"]) * 1024
               / (inf[1]["peak_in_flight"] - inf[0]["peak_in_flight"]))
        lines += ["", f"About {per:.1f} KB per workflow in flight. Requests beyond the cap "
                  "wait in Kafka, not in memory: the cap bounds the node's memory."]
    lines += ["", "## Consumer lag through a burst", "",
              "| measure | value |", "| --- | --- |",
              f"| steady rate | {b['steady_rate_per_s']:g}/s |",
              f"| burst | {b['burst']} requests published in {b['burst_published_s']} s |",
              f"| peak backlog (published − finished) | {b['peak_backlog']} |",
              f"| peak reducer consumer lag (events) | {b['peak_consumer_lag']} |",
              f"| back to steady state after the burst | {b['recovered_after_s']} s |",
              f"| drain rate | {b['drain_rate_per_s']}/s |",
              "", "## Largest sustained rate with p99 < 100 ms", "",
              "| rate/s | p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- |",
              *[f"| {s['rate_per_s']:g} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |"
                for s in m["steps"]],
              "", f"Largest rate with p99 under {m['p99_limit_ms']:g} ms: "
              f"**{m['largest_rate_per_s']}/s**."]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, admin: Endpoints, work: Path) -> Result:
    from stampflow.inference import make_tiny_flux

    model = make_tiny_flux(work / "tiny-flux")
    big = 2000 if args.quick else 10_000
    in_flight = [await bench_in_flight(admin, work, cap, cap + cap // 5, model)
                 for cap in (1000, big)]
    burst = await bench_burst(admin, work, 3000 if args.quick else 20_000, 100.0)
    rates = [25.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0]
    max_rate = await bench_max_rate(admin, work, rates, 4.0 if args.quick else 10.0)
    return {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
            "in_flight": in_flight, "burst": burst, "max_rate": max_rate}


def main() -> None:
    configure_logging("ERROR", "json", libraries="ERROR")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="stampflow-load-") as tmp, \
            EmbeddedServices(Path(tmp) / "services", fast=True) as svc:
        work = Path(tmp) / "work"
        work.mkdir()
        # The superuser creates a database per measurement (the owner role may not).
        admin = Endpoints(svc.postgres.url(), svc.broker.bootstrap_servers)
        result = asyncio.run(main_async(args, admin, work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
