"""Past one process: 2 orchestrators, 2 inference workers (the tiny FLUX on the CPU) and 2
reducers, each its own `stampflow run NODE` process, on one set of services. One namespace
carries most of the traffic; an inference worker and an orchestrator are killed (-9) mid-run
and not replaced, so the survivors must take their partitions over. The ground truth holds,
and each process's share of the work, read from its /metrics endpoint, is reported."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from blake3 import blake3

from stampflow.app import prepare
from stampflow.contracts.events import GenerationRequested
from stampflow.inference.engine import decode_png
from stampflow.services import free_port
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    NodeProcess,
    fetch,
    finished_count,
    reconcile,
    settings_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAMPS, GENERATIONS = 3000, 120
BIG = "big"  # most of the traffic
SMALL = ("s1", "s2", "s3")
GEN_PAIRS = 30  # distinct (prompt, seed) pairs: each image is asked for about 4 times

# What each node's share is counted in (its own /metrics).
SHARE_METRIC = {
    "orchestrator": ('stampflow_transitions_total', 'to_state="received"'),
    "inference": ("stampflow_inference_jobs_total", ""),
    "reducer": ("stampflow_reducer_events_total", 'result="applied"'),
}


@dataclass
class Member:
    node: str
    index: int
    port: int
    proc: NodeProcess
    share: float = 0.0
    killed: bool = False
    samples: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.node}-{self.index}"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz",
                                        timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def scrape(self) -> None:
        """The member's count so far; a member that cannot answer keeps its last count."""
        metric, label = SHARE_METRIC[self.node]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric) and label in line and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        self.share = max(self.share, total)


def _requests(seed: int) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    blobs = [rng.randbytes(rng.choice((40, 900, 5000))) for _ in range(400)]
    todo: list[tuple[str, object]] = []
    for _ in range(STAMPS):
        ns = BIG if rng.random() < 0.8 else rng.choice(SMALL)
        todo.append((ns, rng.choice(blobs)))
    for _ in range(GENERATIONS):
        ns = BIG if rng.random() < 0.8 else rng.choice(SMALL)
        pair = rng.randrange(GEN_PAIRS)
        todo.append((ns, GenerationRequested(prompt=f"a cat number {pair}", seed=pair,
                                             width=64, height=64, num_inference_steps=1,
                                             model="tiny")))
    rng.shuffle(todo)
    return todo


def _maps_torch(pid: int) -> bool:
    """Has process ``pid`` loaded torch's shared library (read from outside, /proc)?"""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return re.search(r"libtorch|torch/_C", maps) is not None


async def test_two_of_each_node_share_the_work_and_survive_kills(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
    tiny_flux_model: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    models = {"tiny": str(tiny_flux_model)}
    settings = settings_for(endpoints, topic_prefix, tmp_path, models=models,
                            artifact_root=tmp_path / "artifacts")
    await prepare(settings, endpoints)
    env = {"STAMPFLOW_MODELS": json.dumps(models),
           "STAMPFLOW_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    members: list[Member] = []
    for node in ("orchestrator", "inference", "reducer"):
        for index in (1, 2):
            port = free_port()
            proc = NodeProcess(node, settings, tmp_path / f"{node}-{index}.log",
                               extra_env={**env, "STAMPFLOW_HTTP_PORT": str(port)})
            members.append(Member(node, index, port, proc))
    by_name = {m.name: m for m in members}
    todo = _requests(seed=13)
    try:
        async def all_ready() -> bool:
            return all(await asyncio.gather(*(asyncio.to_thread(m.is_ready) for m in members)))

        await wait_for(all_ready, 90, "every node process ready")
        await asyncio.sleep(3)  # the groups settle: each member holds its partitions
        from stampflow.client import Client

        async def scrape_until(done: asyncio.Event) -> None:
            while not done.is_set():
                for member in members:
                    if not member.killed:
                        await asyncio.to_thread(member.scrape)
                await asyncio.sleep(0.5)

        scraping_done = asyncio.Event()
        scraper = asyncio.create_task(scrape_until(scraping_done))
        t0 = time.monotonic()
        async with Client(settings, endpoints, source="scaling") as client:
            for i, (ns, item) in enumerate(todo):
                if isinstance(item, GenerationRequested):
                    await client.submit_generation(ns, item)
                else:
                    assert isinstance(item, bytes)
                    await client.submit_stamp(ns, content=item, wait=False)
                if i % 50 == 49:
                    await asyncio.sleep(0.2)  # about 250 requests/s
                if i == len(todo) * 2 // 5:
                    await client.flush()
                    # mid-run: one worker and one orchestrator die, and are not replaced
                    for name in ("inference-1", "orchestrator-2"):
                        victim = by_name[name]
                        await wait_for(lambda v=victim: _has_worked(v), 60,  # type: ignore[misc]
                                       f"{name} at work")
                        victim.killed = True
                        victim.proc.kill()
            await client.flush()
        await wait_for(lambda: _all_finished(fresh_database_url, len(todo)), 240,
                       f"{len(todo)} workflows finished")
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.5)  # a last scrape of the survivors' counters
        scraping_done.set()
        await scraper
        for member in members:
            if not member.killed:
                member.scrape()

        # The orchestrator never loads torch; the inference worker that did the work does.
        orchestrator = by_name["orchestrator-1"].proc.proc.pid
        worker = by_name["inference-2"].proc.proc.pid
        assert not _maps_torch(orchestrator), "the orchestrator process loaded torch"
        assert _maps_torch(worker), "the check cannot tell: the worker shows no torch either"

        await _check_ground_truth(fresh_database_url, todo)

        shares = _shares(members)
        with capsys.disabled():
            print(f"\n{len(todo)} workflows ({STAMPS} stamps, {GENERATIONS} generations, "
                  f"{sum(ns == BIG for ns, _ in todo)} in namespace {BIG!r}) in {elapsed:.1f}s; "
                  "inference-1 and orchestrator-2 killed -9 at 40%")
            for member in members:
                print(f"  {member.name:<15} {member.share:>8.0f}  "
                      f"{shares[member.name]:>6.1%}{'  (killed)' if member.killed else ''}")
        # Every member did part of the work before (or after) the kills: keyed by workflow,
        # the one big namespace spread over both members of each group.
        for member in members:
            assert member.share > 0, f"{member.name} did nothing: {shares}"
        reducers = [m.share for m in members if m.node == "reducer"]
        assert min(reducers) / sum(reducers) > 0.2, f"one reducer did almost everything: {shares}"
    finally:
        for member in members:
            if not member.killed:
                code, _ = await asyncio.to_thread(member.proc.terminate, 40.0)
                assert code == 0, f"{member.name} exited {code}"


async def _has_worked(member: Member) -> bool:
    await asyncio.to_thread(member.scrape)
    return member.share > 0


def _shares(members: list[Member]) -> dict[str, float]:
    totals = Counter[str]()
    for m in members:
        totals[m.node] += m.share
    return {m.name: (m.share / totals[m.node] if totals[m.node] else 0.0) for m in members}


async def _all_finished(url: str, n: int) -> bool:
    return await finished_count(url) >= n


async def _check_ground_truth(url: str, todo: list[tuple[str, object]]) -> None:
    want_workflows = Counter(ns for ns, _ in todo)
    want_stamps: dict[str, set[str]] = {}
    for ns, item in todo:
        if isinstance(item, bytes):
            want_stamps.setdefault(ns, set()).add(blake3(item).hexdigest())
    rows = await fetch(url, "SELECT namespace, workflows, completed, failed FROM "
                            "namespace_aggregates")
    got = {r["namespace"]: r for r in rows}
    assert set(got) == set(want_workflows)
    for ns, n in want_workflows.items():
        assert (got[ns]["workflows"], got[ns]["completed"], got[ns]["failed"]) == (n, n, 0), (
            ns, dict(got[ns]))
    generations = await fetch(url, "SELECT g.namespace, g.seed, g.hash, g.batch_size, "
                                   "g.artifact_uri, w.hash AS recorded FROM generations g "
                                   "JOIN workflows w USING (workflow_id)")
    assert len(generations) == GENERATIONS
    by_seed: dict[int, dict[str, bytes]] = {}
    for g in generations:
        # the image the workflow records is the one in the store, whichever worker made it
        assert g["hash"] == g["recorded"]
        stored = await asyncio.to_thread(Path(urlsplit(g["artifact_uri"]).path).read_bytes)
        assert blake3(stored).hexdigest() == g["hash"]
        by_seed.setdefault(g["seed"], {})[g["hash"]] = stored
        want_stamps.setdefault(g["namespace"], set()).add(g["hash"])  # images are stamped too
    # The same (prompt, seed) gives the same picture, whichever worker ran it and in whatever
    # batch. Not always the same bytes: batched kernels round differently by batch size and
    # position (measured: a pixel channel one level apart), so a job redone in another batch
    # may store a second PNG; its workflow still counts once and records the first.
    for seed, images in by_seed.items():
        pixels = [(decode_png(png) * 255).round().astype(int) for png in images.values()]
        worst = max(int(abs(p - pixels[0]).max()) for p in pixels)
        assert worst <= 2, f"seed {seed}: {len(images)} images up to {worst} levels apart"
    stamps = await fetch(url, "SELECT namespace, count(*) AS n FROM stamps GROUP BY namespace")
    assert {r["namespace"]: r["n"] for r in stamps} == {
        ns: len(h) for ns, h in want_stamps.items()}
    transitions = await fetch(url, "SELECT count(*) AS n, count(DISTINCT (workflow_id, seq)) "
                                   "AS d FROM workflow_transitions")
    assert transitions[0]["n"] == transitions[0]["d"]
    assert await reconcile(url) == []
