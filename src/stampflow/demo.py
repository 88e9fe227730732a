"""`stampflow demo`: the main job on the embedded services, checked against ground truth.

It starts a real PostgreSQL and a real Kafka-protocol broker, runs the orchestrator and the
reducer, publishes stamp requests for a sample folder across four namespaces (with some
content repeated, so duplicates are counted, and one request for a path outside the content
root, which must fail), waits for every workflow to finish, and compares the aggregates that
the reducer wrote with what the requests imply.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blake3 import blake3
from rich.console import Console

from stampflow.app import NODE_NAMES, run_nodes
from stampflow.client import Client
from stampflow.errors import StampflowError
from stampflow.queries import summary
from stampflow.services import EmbeddedServices
from stampflow.settings import Settings

NAMESPACES = ("alpha", "beta", "gamma", "delta")


@dataclass
class Expected:
    """Ground truth for one namespace, computed from the requests alone."""

    workflows: int = 0
    failed: int = 0
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


def run_demo(settings: Settings, *, per_namespace: int, console: Console) -> list[dict[str, Any]]:
    base = settings.state_dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="demo-", dir=base))
    try:
        sample = work / "content"
        files = make_sample(sample, per_namespace)
        s = settings.model_copy(update={"content_root": sample, "state_dir": work / "services",
                                        "topic_prefix": "demo"})
        with EmbeddedServices(s.state_dir) as services:
            console.print(f"[dim]PostgreSQL {services.endpoints.database_url}  "
                          f"Kafka {services.endpoints.bootstrap_servers}[/dim]")
            return asyncio.run(_demo(s, services, files, console))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _demo(s: Settings, services: EmbeddedServices, files: dict[str, list[Path]],
                console: Console) -> list[dict[str, Any]]:
    endpoints = services.endpoints
    stop = asyncio.Event()
    started = asyncio.Event()
    nodes = asyncio.create_task(run_nodes(s, endpoints, list(NODE_NAMES), stop, started=started))
    try:
        await asyncio.wait_for(started.wait(), timeout=60)
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
            await client.flush()
        total = sum(e.workflows for e in expected.values())
        console.print(f"submitted {total} stamp requests across {len(NAMESPACES)} namespaces")
        rows = await _wait_until_done(endpoints.database_url, total, timeout=120)
        elapsed = time.perf_counter() - t0
        console.print(f"all {total} workflows finished in {elapsed:.2f}s")
        _check(rows, expected)
        console.print("[green]aggregates match the ground truth computed from the requests[/]")
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


def _check(rows: list[dict[str, Any]], expected: dict[str, Expected]) -> None:
    got = {r["namespace"]: r for r in rows}
    problems = []
    for ns, exp in expected.items():
        row = got.get(ns)
        if row is None:
            problems.append(f"{ns}: no aggregates")
            continue
        want = {"workflows": exp.workflows, "failed": exp.failed,
                "completed": exp.workflows - exp.failed, "stamps": len(exp.hashes),
                "total_bytes": exp.total_bytes, "duplicates": exp.duplicates, "anomalies": 0}
        for key, value in want.items():
            if row[key] != value:
                problems.append(f"{ns}.{key}: stored {row[key]}, expected {value}")
    if problems:
        raise StampflowError("demo: aggregates differ from ground truth: " + "; ".join(problems))
