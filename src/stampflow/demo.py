"""`stampflow demo`: the main job on the embedded services, checked against ground truth.

It starts a real PostgreSQL and a real Kafka-protocol broker, runs the orchestrator and the
reducer, publishes stamp requests for a sample folder across four namespaces (with some
content repeated, so duplicates are counted, and one request for a path outside the content
root, which must fail) and a few image generations per namespace (a tiny FLUX pipeline with
random weights, built locally and loaded through the same code as a real model), waits for
every workflow to finish, and compares the aggregates that the reducer wrote with what the
requests imply.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from blake3 import blake3
from rich.console import Console

from stampflow.app import NODE_NAMES, RunningNodes, run_nodes
from stampflow.client import Client
from stampflow.contracts.events import GenerationRequested
from stampflow.errors import StampflowError
from stampflow.inference import make_tiny_flux
from stampflow.observability import redact
from stampflow.queries import create_role, summary
from stampflow.services import EmbeddedServices
from stampflow.settings import Settings

NAMESPACES = ("alpha", "beta", "gamma", "delta")
DEMO_MODEL = "demo-tiny-flux"
DEMO_OPERATOR = "demo_operator"


@dataclass
class Expected:
    """Ground truth for one namespace, computed from the requests alone."""

    workflows: int = 0
    failed: int = 0
    generations: int = 0
    pixels: int = 0
    hashes: set[str] = field(default_factory=set)
    total_bytes: int = 0
    duplicates: int = 0

    def add(self, data: bytes) -> None:
        self.workflows += 1
        digest = blake3(data).hexdigest()
        if digest in self.hashes:
            self.duplicates += 1
        else:
            self.hashes.add(digest)
            self.total_bytes += len(data)


def make_sample(root: Path, per_namespace: int, seed: int = 7) -> dict[str, list[Path]]:
    """Files per namespace. Every fifth file repeats an earlier one's content."""
    rng = random.Random(seed)
    files: dict[str, list[Path]] = {}
    for ns in NAMESPACES:
        folder = root / ns
        folder.mkdir(parents=True)
        made: list[Path] = []
        for i in range(per_namespace):
            if i % 5 == 4 and made:
                data = made[rng.randrange(len(made))].read_bytes()
            else:
                size = rng.choice((64, 1024, 4096, 65536, 262144))
                data = hashlib.shake_256(f"{ns}/{i}/{seed}".encode()).digest(size)
            path = folder / f"doc-{i:04d}.bin"
            path.write_bytes(data)
            made.append(path)
        files[ns] = made
    return files


def run_demo(settings: Settings, *, per_namespace: int, generations: int,
             console: Console, serve: bool = False) -> list[dict[str, Any]]:
    base = settings.state_dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="demo-", dir=base))
    try:
        sample = work / "content"
        files = make_sample(sample, per_namespace)
        models = dict(settings.models)
        if generations:
            console.print("[dim]building a tiny FLUX pipeline (random weights) for the "
                          "generations ...[/dim]")
            models[DEMO_MODEL] = str(make_tiny_flux(work / "tiny-flux", seed=0))
        s = settings.model_copy(update={"content_root": sample, "state_dir": work / "services",
                                        "topic_prefix": "demo", "models": models,
                                        "artifact_root": work / "artifacts"})
        with EmbeddedServices(s.state_dir) as services:
            console.print(f"[dim]PostgreSQL {redact(services.endpoints.database_url)}  "
                          f"Kafka {services.endpoints.bootstrap_servers}[/dim]")
            return asyncio.run(_demo(s, services, files, generations, console, serve))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _demo(s: Settings, services: EmbeddedServices, files: dict[str, list[Path]],
                generations: int, console: Console, serve: bool = False) -> list[dict[str, Any]]:
    endpoints = services.endpoints
    stop = asyncio.Event()
    started = asyncio.Event()
    running = RunningNodes()
    nodes = asyncio.create_task(run_nodes(s, endpoints, list(NODE_NAMES), stop, started=started,
                                          running=running, console=True))
    try:
        await asyncio.wait_for(started.wait(), timeout=60)
        # An operator for the console: every demo namespace, and the replay of dead letters.
        password = secrets.token_urlsafe(12)
        await create_role(endpoints.database_url, DEMO_OPERATOR, list(NAMESPACES), password,
                          replay=True)
        console.print(f"console {running.console_url}: log in as {DEMO_OPERATOR}, password "
                      f"{password} (this demo's throwaway server)", markup=False,
                      highlight=False)
        expected = {ns: Expected() for ns in NAMESPACES}
        t0 = time.perf_counter()
        async with Client(s, endpoints, source="demo") as client:
            for ns, paths in files.items():
                for path in paths:
                    await client.submit_stamp(ns, path=str(path.relative_to(s.content_root)),
                                              wait=False)
                    expected[ns].add(path.read_bytes())
            # One request that must fail: a path outside the content root.
            await client.submit_stamp(NAMESPACES[0], path="../../etc/passwd", wait=False)
            expected[NAMESPACES[0]].workflows += 1
            expected[NAMESPACES[0]].failed += 1
            for n, ns in enumerate(NAMESPACES):
                for i in range(generations):
                    await client.submit_generation(ns, GenerationRequested(
                        prompt=f"{ns} landscape number {i}", width=64, height=64,
                        num_inference_steps=2, seed=1000 * n + i, model=DEMO_MODEL))
                    expected[ns].workflows += 1
                    expected[ns].generations += 1
                    expected[ns].pixels += 64 * 64
            await client.flush()
        total = sum(e.workflows for e in expected.values())
        console.print(f"submitted {total} requests ({total - 4 * generations} stamps, "
                      f"{4 * generations} generations) across {len(NAMESPACES)} namespaces")
        rows = await _wait_until_done(endpoints.database_url, total, timeout=120)
        elapsed = time.perf_counter() - t0
        console.print(f"all {total} workflows finished in {elapsed:.2f}s")
        _check(rows, expected, await _stamped_bytes(endpoints.database_url))
        console.print("[green]aggregates match the ground truth computed from the requests[/]")
        if serve:
            console.print(f"serving the console on {running.console_url} until Ctrl-C",
                          markup=False, highlight=False)
            await asyncio.Event().wait()
        return rows
    finally:
        stop.set()
        await nodes


async def _wait_until_done(url: str, total: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await summary(url)
        done = sum(r["completed"] + r["failed"] for r in rows)
        if done >= total:
            return rows
        if time.monotonic() > deadline:
            raise StampflowError(f"demo: only {done} of {total} workflows finished in {timeout}s")
        await asyncio.sleep(0.2)


async def _stamped_bytes(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT namespace, sum(size) AS b FROM stamps GROUP BY 1")
    finally:
        await conn.close()
    return {r["namespace"]: int(r["b"]) for r in rows}


def _check(rows: list[dict[str, Any]], expected: dict[str, Expected],
           stamped_bytes: dict[str, int]) -> None:
    got = {r["namespace"]: r for r in rows}
    problems = []
    for ns, exp in expected.items():
        row = got.get(ns)
        if row is None:
            problems.append(f"{ns}: no aggregates")
            continue
        # Each generated image is a distinct stamp too (distinct seeds); its PNG size is only
        # known afterwards, so bytes are checked against the stamps table.
        want = {"workflows": exp.workflows, "failed": exp.failed,
                "completed": exp.workflows - exp.failed,
                "stamps": len(exp.hashes) + exp.generations,
                "duplicates": exp.duplicates, "anomalies": 0,
                "generations": exp.generations, "total_pixels": exp.pixels,
                "total_bytes": stamped_bytes.get(ns, 0)}
        if row["total_bytes"] - exp.total_bytes < 0:
            problems.append(f"{ns}.total_bytes: stored {row['total_bytes']}, less than the "
                            f"{exp.total_bytes} bytes of stamped files")
        for key, value in want.items():
            if row[key] != value:
                problems.append(f"{ns}.{key}: stored {row[key]}, expected {value}")
    if problems:
        raise StampflowError("demo: aggregates differ from ground truth: " + "; ".join(problems))
