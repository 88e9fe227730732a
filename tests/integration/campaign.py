"""A seeded fault campaign over the real services: many mixed requests, node processes killed
with SIGKILL at random moments, the broker frozen, PostgreSQL restarted, a second node joining
a consumer group, and outages through fault proxies (stampflow.testing.faultproxy: a service
refusing, hanging or flapping for minutes) — then every result checked against ground truth
computed from the requests, and every node process found still running before the final
SIGTERM.

The CI-sized runs are tests/integration/test_fault_suite.py and test_outages.py. The long run
is a command:

    ./dev sh python -m tests.integration.campaign --requests 100000 --kills 30
    ./dev sh python -m tests.integration.campaign --requests 20000 --kills 0 --freezes 0 \
        --postgres-restarts 0 --outages all --outage-seconds 180

which starts its own embedded services (behind fault proxies when outages are asked for) and
writes bench/results/faults-<N>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
from blake3 import blake3

from stampflow.app import prepare
from stampflow.bus import make_consumer
from stampflow.client import Client
from stampflow.contracts.events import GenerationRequested, derive_id
from stampflow.contracts.nodes import BUILTIN_NODES
from stampflow.nodes.consuming import FetchWait
from stampflow.nodes.deadletter import parse_dead_letter
from stampflow.services import Endpoints
from stampflow.testing.faultproxy import Fault as ProxyFault
from stampflow.testing.faultproxy import FaultProxy
from stampflow.testing.s3 import moto_server
from stampflow.testing.stack import NodeProcess, settings_for

MAX_CONTENT = 64 * 1024  # the campaign's STAMPFLOW_MAX_CONTENT_BYTES: too_large is cheap to hit
GEN_SIDE = 64


class Server(Protocol):
    """What the campaign does to a service (embedded processes and containers both offer it)."""

    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def restart(self, timeout: float = 30.0) -> None: ...
    def kill(self) -> None: ...
    def start(self, timeout: float = 30.0) -> None: ...


@dataclass(frozen=True)
class Outage:
    """A service made unreachable through its fault proxy, in Toxiproxy's words: ``down``
    (refused), ``timeout`` (hung: accepted, never answered), ``reset_peer``, ``latency``, or
    ``flap`` (down for half of every ``period_s``, up for the other half)."""

    target: str  # broker | postgres | both
    fault: str  # a stampflow.testing.faultproxy.Fault value, or "flap"
    seconds: float
    period_s: float = 4.0  # flap: one down-and-up cycle
    ms: float = 0.0  # latency
    # Before the fault, the broker answers this slowly for lead_in_s: publishes take long, so
    # the orchestrator's whole in-flight window is waiting on the broker when the fault comes
    # (a broker that degrades before it dies; without it the window is often nearly empty).
    lead_in_ms: float = 0.0
    lead_in_s: float = 0.0

    def __post_init__(self) -> None:
        if self.target not in ("broker", "postgres", "both"):
            raise ValueError(f"outage target {self.target!r}: broker, postgres or both")
        if self.fault != "flap":
            ProxyFault(self.fault)  # raises for an unknown name

    @property
    def name(self) -> str:
        if self.fault == "flap":
            return f"{self.target} flapping every {self.period_s:g}s for {self.seconds:g}s"
        return f"{self.target} {self.fault} {self.seconds:g}s"

    @property
    def stops_the_broker(self) -> bool:
        return self.target in ("broker", "both") and self.fault != "latency"


def standard_outages(seconds: float = 180.0, flap_s: float = 60.0) -> dict[str, Outage]:
    """The named outages of the campaign (issue 11): each service refusing, the broker
    hanging, both refusing at once, and both flapping every few seconds."""
    slow = {"lead_in_ms": LEAD_IN_MS, "lead_in_s": LEAD_IN_S}
    return {
        "broker-down": Outage("broker", "down", seconds, **slow),
        "broker-timeout": Outage("broker", "timeout", seconds, **slow),
        "postgres-down": Outage("postgres", "down", seconds),
        "both-down": Outage("both", "down", seconds, **slow),
        "flap": Outage("both", "flap", flap_s, period_s=4.0),
    }


LEAD_IN_MS = 800.0
LEAD_IN_S = 5.0


@dataclass
class Proxies:
    """The fault proxies the campaign's endpoints go through (outages need them)."""

    broker: FaultProxy
    postgres: FaultProxy

    def of(self, target: str) -> list[FaultProxy]:
        return {"broker": [self.broker], "postgres": [self.postgres],
                "both": [self.broker, self.postgres]}[target]


@dataclass(frozen=True)
class Config:
    requests: int = 10_000
    seed: int = 7
    namespaces: int = 8
    kills: int = 10  # SIGKILLs of orchestrators, reducers and inference nodes, at random moments
    freeze_s: float = 10.0  # the broker SIGSTOPped this long
    freezes: int = 1
    postgres_restarts: int = 1
    second_orchestrator: bool = True  # a second member joins the orchestrators' group
    rate: float = 400.0  # requests published per second
    generation_share: float = 0.005  # of requests; 0 leaves torch out of the run
    drain_timeout_s: float = 600.0
    # Outages through the fault proxies, one after another, each once this share of the
    # requests is published (evenly spread by default): publishing pauses (and what was
    # published is flushed) while the broker is out, so every request reaches the broker.
    outages: tuple[Outage, ...] = ()
    # A drain that makes no progress this long ends early: the checks then say what is missing.
    stall_timeout_s: float = 300.0
    # The broker SIGKILLed and started again: only for a broker whose data outlives it
    # (EmbeddedBroker with S3 storage, see s3_server); a memory broker forgets everything.
    broker_kills: int = 0


# --- the requests and their ground truth ------------------------------------------------------

@dataclass
class Request:
    # inline | file | escape | missing | too_large | invalid | garbage | generate | replay
    kind: str
    namespace: str
    event_id: UUID
    content: bytes | None = None
    path: str | None = None
    raw: bytes | None = None  # garbage and invalid: published as they are
    generation: GenerationRequested | None = None
    # Expected result: None for garbage (dead-lettered) and replays (no workflow of their own)
    expect_state: str | None = None
    expect_code: str | None = None
    expect_hash: str | None = None
    expect_size: int = 0


@dataclass
class Plan:
    requests: list[Request]
    files: dict[str, bytes]  # content-root-relative path -> bytes

    @property
    def workflows(self) -> list[Request]:
        return [r for r in self.requests if r.expect_state is not None]


def make_plan(cfg: Config) -> Plan:
    rng = random.Random(cfg.seed)
    namespaces = [f"ns{i}" for i in range(cfg.namespaces)]
    blobs = [rng.randbytes(rng.choice((1, 64, 700, 4096, 20_000))) for _ in range(400)]
    files = {f"f/{i:03d}.bin": (rng.choice(blobs) if i % 5 == 0  # same bytes as some inline
                                else rng.randbytes(rng.choice((10, 3000, 50_000))))
             for i in range(150)}

    def uid() -> UUID:
        return UUID(int=rng.getrandbits(128), version=4)

    kinds = ["inline", "file", "escape", "missing", "too_large", "invalid", "garbage",
             "generate", "replay"]
    weights = [0.6, 0.27, 0.015, 0.015, 0.015, 0.015, 0.01, cfg.generation_share, 0.01]
    out: list[Request] = []
    for _ in range(cfg.requests):
        kind = rng.choices(kinds, weights)[0]
        ns = rng.choice(namespaces)
        r = Request(kind=kind, namespace=ns, event_id=uid())
        if kind == "inline":
            r.content = rng.choice(blobs)
            r.expect_state, r.expect_hash = "completed", blake3(r.content).hexdigest()
            r.expect_size = len(r.content)
        elif kind == "file":
            r.path = rng.choice(sorted(files))
            data = files[r.path]
            r.expect_state, r.expect_hash, r.expect_size = ("completed", blake3(data).hexdigest(),
                                                            len(data))
        elif kind == "escape":
            r.path = rng.choice(["../outside.txt", "escape-link", "f/../../outside.txt"])
            r.expect_state, r.expect_code = "failed", "outside_root"
        elif kind == "missing":
            r.path = f"f/missing-{rng.getrandbits(32)}.bin"
            r.expect_state, r.expect_code = "failed", "not_found"
        elif kind == "too_large":
            r.content = rng.randbytes(MAX_CONTENT + rng.randint(1, 4096))
            r.expect_state, r.expect_code = "failed", "too_large"
        elif kind == "invalid":  # readable, but the payload breaks the contract
            r.raw = json.dumps({
                "event_id": str(r.event_id), "event_type": "generation.requested",
                "namespace": ns, "correlation_id": str(r.event_id),
                "occurred_at": "2026-01-01T00:00:00Z", "source": "campaign",
                "payload": {"type": "generation.requested", "prompt": "p",
                            "width": rng.choice([17, 500, 100_000])}}).encode()
            r.expect_state, r.expect_code = "failed", "invalid_request"
        elif kind == "garbage":  # not even UTF-8: the dead-letter topic's
            r.raw = b"\xff" + rng.randbytes(rng.randint(0, 300))
        elif kind == "generate":
            # Each its own (prompt, seed): the same pair run alone and inside a batch can differ
            # in a pixel's last bit (CPU kernels round differently by batch size), so two
            # requests for one image are not promised one PNG.
            seed = rng.getrandbits(62)
            r.generation = GenerationRequested(prompt=f"campaign {seed}", seed=seed,
                                               width=GEN_SIDE,
                                               height=GEN_SIDE, num_inference_steps=1,
                                               model="tiny")
            r.expect_state = "completed"
        elif kind == "replay":  # an earlier request published again: it must count once
            earlier = [e for e in out if e.kind in ("inline", "file")]
            if not earlier:
                r.kind, r.content = "inline", rng.choice(blobs)
                r.expect_state, r.expect_hash = "completed", blake3(r.content).hexdigest()
                r.expect_size = len(r.content)
            else:
                src = rng.choice(earlier)
                r.namespace, r.event_id, r.content, r.path = (src.namespace, src.event_id,
                                                              src.content, src.path)
        out.append(r)
    return Plan(out, files)


@dataclass
class Truth:
    workflows: int = 0
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    stamps: int = 0
    total_bytes: int = 0
    generations: int = 0
    total_pixels: int = 0
    anomalies: int = 0


def ground_truth(plan: Plan) -> dict[str, Truth]:
    """Aggregates per namespace from the requests alone. Generated images are counted by their
    distinct (prompt, seed): the checks confirm from the artifacts that this holds."""
    truth: dict[str, Truth] = defaultdict(Truth)
    hashes: dict[str, set[str]] = defaultdict(set)
    images: dict[str, set[tuple[str, int | None]]] = defaultdict(set)
    for r in plan.workflows:
        t = truth[r.namespace]
        t.workflows += 1
        if r.expect_state == "failed":
            t.failed += 1
            continue
        t.completed += 1
        if r.generation is not None:
            t.generations += 1
            t.total_pixels += r.generation.width * r.generation.height
            images[r.namespace].add((r.generation.prompt, r.generation.seed))
            continue
        assert r.expect_hash is not None
        if r.expect_hash in hashes[r.namespace]:
            t.duplicates += 1
        else:
            hashes[r.namespace].add(r.expect_hash)
            t.stamps += 1
            t.total_bytes += r.expect_size
    for ns, pairs in images.items():
        truth[ns].stamps += len(pairs)  # their bytes are read from the artifacts in the checks
    return dict(truth)


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Fault:
    at_s: float
    what: str


@dataclass
class Report:
    config: dict[str, Any]
    requests_by_kind: dict[str, int]
    workflows_expected: int
    faults: list[Fault] = field(default_factory=list)
    submit_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0
    dead_letters: int = 0
    failures: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def kills(self) -> int:
        return sum(f.what.startswith("kill -9") for f in self.faults)


class Nodes:
    """The node processes of the run; a killed node is replaced at once by a fresh process."""

    def __init__(self, settings: Any, logs: Path, env: dict[str, str]) -> None:
        self.settings, self.logs, self.env = settings, logs, env
        self.running: dict[str, list[NodeProcess]] = {
            "orchestrator": [], "reducer": [], "inference": []}
        self.started = Counter[str]()

    def start(self, node: str) -> NodeProcess:
        self.started[node] += 1
        proc = NodeProcess(node, self.settings, self.logs / f"{node}-{self.started[node]}.log",
                           extra_env=self.env)
        self.running[node].append(proc)
        return proc

    def kill(self, node: str, rng: random.Random) -> None:
        victim = rng.choice(self.running[node])
        self.running[node].remove(victim)
        victim.kill()
        self.start(node)

    def terminate_all(self, timeout: float = 60.0) -> tuple[dict[str, int], list[str]]:
        """SIGTERM each node; its exit codes, and a failure for each that outlived
        ``timeout`` (it is killed afterwards by ``kill_all``)."""
        codes, failures = {}, []
        for node, procs in self.running.items():
            for i, proc in enumerate(procs):
                try:
                    code, _ = proc.terminate(timeout)
                except subprocess.TimeoutExpired:
                    failures.append(f"{node}[{i}] (pid {proc.proc.pid}) still ran {timeout:g}s "
                                    f"after SIGTERM: {_log_tail(proc.log_path)}")
                    continue
                codes[f"{node}[{i}]"] = code
        return codes, failures

    def wait_started(self, timeout: float) -> list[str]:
        """Wait until every node process says it runs (a replacement started by a late kill may
        still be importing: SIGTERM then finds no handler yet); a failure for each that did not."""
        deadline = time.monotonic() + timeout
        waiting = [(node, i, proc) for node, procs in self.running.items()
                   for i, proc in enumerate(procs)]
        while waiting and time.monotonic() < deadline:
            waiting = [(node, i, proc) for node, i, proc in waiting
                       if proc.proc.poll() is None and not _says_running(proc.log_path)]
            if waiting:
                time.sleep(0.2)
        return [f"{node}[{i}] (pid {proc.proc.pid}) did not start within {timeout:g}s: "
                f"{_log_tail(proc.log_path)}" for node, i, proc in waiting]

    def dead(self) -> list[str]:
        """Every node process of the run that exited by itself (the killed ones were replaced
        and left this list), with its exit code and the end of its log."""
        return [f"{node}[{i}] (pid {proc.proc.pid}) exited by itself with code "
                f"{proc.proc.returncode}: {_log_tail(proc.log_path)}"
                for node, procs in self.running.items() for i, proc in enumerate(procs)
                if proc.proc.poll() is not None]

    def kill_all(self) -> None:
        for procs in self.running.values():
            for proc in procs:
                proc.kill()


def _says_running(log: Path) -> bool:
    try:
        return b'"nodes running"' in log.read_bytes()
    except OSError:
        return False


def _log_tail(path: Path, chars: int = 1200) -> str:
    try:
        return "..." + path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


async def run_campaign(cfg: Config, endpoints: Endpoints, postgres: Server, broker: Server,
                       workdir: Path, *, tiny_model: Path | None = None,
                       topic_prefix: str = "campaign", proxies: Proxies | None = None,
                       ) -> Report:
    """Run the campaign against a database that holds nothing yet; return what was seen.
    Outages need ``proxies``, and ``endpoints`` that go through them."""
    if cfg.outages and proxies is None:
        raise ValueError("outages need proxies (and endpoints through them)")
    plan = make_plan(cfg)
    kinds = Counter(r.kind for r in plan.requests)
    report = Report(config=asdict(cfg), requests_by_kind=dict(kinds),
                    workflows_expected=len(plan.workflows))
    content = workdir / "content"
    for rel, data in plan.files.items():
        (content / rel).parent.mkdir(parents=True, exist_ok=True)
        (content / rel).write_bytes(data)
    (workdir / "outside.txt").write_text("not for stamping")
    (content / "escape-link").symlink_to(workdir / "outside.txt")
    env = {"STAMPFLOW_MAX_CONTENT_BYTES": str(MAX_CONTENT)}
    overrides: dict[str, Any] = {"max_content_bytes": MAX_CONTENT}
    if kinds["generate"]:
        if tiny_model is None:
            raise ValueError("generation requests need tiny_model")
        models = {"tiny": str(tiny_model)}
        env["STAMPFLOW_MODELS"] = json.dumps(models)
        env["STAMPFLOW_ARTIFACT_ROOT"] = str(workdir / "artifacts")
        # A restarted inference node loads torch and the model on its first job; on two
        # busy cores that can pass the contract's 30 s, and a timeout is not what is tested.
        env["STAMPFLOW_CONTRACTS_DIR"] = str(_contracts_with_inference_timeout(workdir, 180_000))
        overrides.update(models=models, artifact_root=workdir / "artifacts")
    settings = settings_for(endpoints, topic_prefix, content, **overrides)
    await prepare(settings, endpoints)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    nodes = Nodes(settings, logs, env)
    nodes.start("orchestrator")
    nodes.start("reducer")
    nodes.start("inference")
    rng = random.Random(cfg.seed + 1)
    t0 = time.monotonic()
    gate = _Gate()
    try:
        await asyncio.sleep(3)  # the first members join their groups
        submitted = asyncio.create_task(_submit(plan, settings, endpoints, cfg.rate, gate))
        outages = asyncio.create_task(_inject_outages(cfg, proxies, gate, report, t0))
        try:
            await _inject_faults(cfg, rng, nodes, postgres, broker, report, t0)
            await outages
        finally:
            outages.cancel()
            for proxy in (proxies.broker, proxies.postgres) if proxies else ():
                proxy.set(ProxyFault.OK)
        await submitted
        report.submit_s = submitted.result()
        drain_start = time.monotonic()
        stalled = await _wait_terminal(endpoints.database_url, len(plan.workflows),
                                       cfg.drain_timeout_s, logs, nodes, cfg.stall_timeout_s,
                                       (endpoints.bootstrap_servers,
                                        settings.consumer_group_prefix,
                                        {"orchestrator": settings.requests_topic,
                                         "reducer": settings.events_topic,
                                         "inference": settings.jobs_topic}))
        if stalled:
            report.failures.append(stalled)
        report.drain_s = time.monotonic() - drain_start
        report.peak_rss_mb = nodes_peak_rss(nodes)
        # Every node outlived the faults: none exited by itself, or hung up for good.
        report.failures += await asyncio.to_thread(nodes.wait_started, 120.0)
        report.failures += nodes.dead()
        report.exit_codes, unterminated = nodes.terminate_all()
        report.failures += unterminated
    finally:
        nodes.kill_all()
    report.total_s = time.monotonic() - t0
    report.failures += [f"{name} exited {code} on SIGTERM"
                        for name, code in report.exit_codes.items() if code != 0]
    await _check(plan, settings, endpoints, report, kinds["garbage"])
    return report


def _contracts_with_inference_timeout(workdir: Path, timeout_ms: int) -> Path:
    from importlib import resources

    import yaml

    out = workdir / "contracts"
    out.mkdir(exist_ok=True)
    for name in BUILTIN_NODES:
        ref = resources.files("stampflow.contracts") / "specs" / f"{name}.yaml"
        (out / f"{name}.yaml").write_text(ref.read_text(encoding="utf-8"))
    spec = out / "inference.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc["io_policy"]["timeout_ms"] = timeout_ms
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class _Gate:
    """Lets the outages pause publishing: ``pause()`` returns once everything published so far
    is acknowledged by the broker, and nothing more is published until ``resume()``."""

    def __init__(self) -> None:
        self.published = 0
        self._open = asyncio.Event()
        self._open.set()
        self._paused = asyncio.Event()
        self._progress = asyncio.Event()
        self.done = False

    async def pause(self, timeout: float = 120.0) -> None:
        self._open.clear()
        if not self.done:
            await asyncio.wait_for(self._paused.wait(), timeout)

    def resume(self) -> None:
        self._paused.clear()
        self._open.set()

    async def reached(self, count: int) -> None:
        while self.published < count and not self.done:
            self._progress.clear()
            await self._progress.wait()

    async def checkpoint(self, client: Client) -> None:
        """Called by the submitter before each request."""
        self.published += 1
        self._progress.set()
        if not self._open.is_set():
            await client.flush()
            self._paused.set()
            await self._open.wait()

    async def finish(self, client: Client) -> None:
        await client.flush()
        self.done = True
        self._progress.set()
        self._paused.set()


async def _submit(plan: Plan, settings: Any, endpoints: Endpoints, rate: float,
                  gate: _Gate | None = None) -> float:
    """Publish every request at about ``rate`` per second; return how long it took."""
    gate = gate or _Gate()
    t0 = time.monotonic()
    async with Client(settings, endpoints, source="campaign") as client:
        for i, r in enumerate(plan.requests):
            if i:
                await gate.checkpoint(client)
            if r.raw is not None:
                await client.publish_raw(r.raw, r.namespace.encode())
            elif r.generation is not None:
                await client.submit_generation(r.namespace, r.generation, event_id=r.event_id)
            else:
                await client.submit_stamp(r.namespace, content=r.content, path=r.path,
                                          event_id=r.event_id, wait=False)
            ahead = (i + 1) / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await gate.finish(client)
    return time.monotonic() - t0


async def _inject_outages(cfg: Config, proxies: Proxies | None, gate: _Gate, report: Report,
                          t0: float) -> None:
    """Each outage once its share of the requests is published. An outage that takes the
    broker away first pauses publishing and flushes (a client cannot publish to a broker that
    is gone either), then starts at once, while the orchestrator holds a backlog."""
    if not cfg.outages or proxies is None:
        return
    for n, outage in enumerate(cfg.outages, start=1):
        await gate.reached(cfg.requests * n // (len(cfg.outages) + 1))
        if outage.stops_the_broker:
            await gate.pause()
        if outage.lead_in_s and outage.lead_in_ms:
            proxies.broker.set(ProxyFault.LATENCY, ms=outage.lead_in_ms,
                               seconds=outage.lead_in_s + 60)
            await asyncio.sleep(outage.lead_in_s)
        at = time.monotonic() - t0
        try:
            targets = proxies.of(outage.target)
            if outage.fault == "flap":
                for proxy in targets:
                    proxy.flap(outage.period_s, outage.seconds)
            else:
                for proxy in targets:  # the proxy ends it on time even if this loop stalls
                    proxy.set(outage.fault, ms=outage.ms, seconds=outage.seconds)
            await asyncio.sleep(outage.seconds)
            for proxy in targets:
                proxy.set(ProxyFault.OK)
        finally:
            gate.resume()
        report.faults.append(Fault(round(at, 2), outage.name))


async def _inject_faults(cfg: Config, rng: random.Random, nodes: Nodes, postgres: Server,
                         broker: Server, report: Report, t0: float) -> None:
    """The faults, in a seeded random order, at random moments spread over the submission."""
    plan = ["kill -9"] * cfg.kills + ["freeze broker"] * cfg.freezes + ["restart postgres"] * \
        cfg.postgres_restarts + (["second orchestrator"] if cfg.second_orchestrator else []) + \
        ["broker kill -9"] * cfg.broker_kills
    rng.shuffle(plan)
    span = cfg.requests / cfg.rate - cfg.freezes * cfg.freeze_s
    gap_hi = max(0.6, 2 * span / max(1, len(plan)))  # mean gap: the span shared out
    for what in plan:
        await asyncio.sleep(rng.uniform(0.3, gap_hi))
        at = time.monotonic() - t0
        if what == "kill -9":
            node = rng.choice(["orchestrator", "reducer", "inference"])
            await asyncio.to_thread(nodes.kill, node, rng)
            what = f"kill -9 {node} ({len(nodes.running[node])} running)"
        elif what == "freeze broker":
            broker.freeze()
            try:
                await asyncio.sleep(cfg.freeze_s)
            finally:
                broker.thaw()
            what = f"broker frozen {cfg.freeze_s:g}s"
        elif what == "restart postgres":
            await asyncio.to_thread(postgres.restart)
        elif what == "broker kill -9":
            t = time.monotonic()
            await asyncio.to_thread(broker.kill)
            await asyncio.to_thread(broker.start, 30.0)
            what = f"broker kill -9 and restart ({time.monotonic() - t:.1f}s)"
        else:
            nodes.start("orchestrator")
        report.faults.append(Fault(round(at, 2), what))


async def _wait_terminal(url: str, expected: int, timeout: float, logs: Path,
                         nodes: Nodes | None = None, stall_s: float | None = None,
                         evidence: tuple[str, str, dict[str, str]] | None = None) -> str:
    """Wait until ``expected`` workflows are terminal. Returns "" then, or why it stopped
    waiting early: no progress for ``stall_s`` (lost work never finishes), or a node process
    gone by itself (nothing would finish its work). Raises after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = -1
    progress_at = time.monotonic()
    while True:
        try:
            conn = await asyncpg.connect(url)
            try:
                done = await conn.fetchval("SELECT count(*) FROM workflows "
                                           "WHERE state IN ('completed', 'failed')")
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            done = last
        if done >= expected:
            return ""
        if done != last:
            progress_at = time.monotonic()
        if nodes is not None and (dead := nodes.dead()):
            return f"drain stopped at {done} of {expected} workflows: {dead[0]}"
        if stall_s is not None and time.monotonic() - progress_at > stall_s:
            return (f"drain stalled at {done} of {expected} workflows terminal: no progress "
                    f"for {stall_s:g}s" + (await _stall_evidence(*evidence, nodes)
                                            if evidence else ""))
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                            for p in sorted(logs.glob("*.log")))  # noqa: ASYNC240 (failing)
            raise AssertionError(f"{done} of {expected} workflows terminal after {timeout}s;"
                                 f" node logs in {logs}:{tails}")
        last = done
        await asyncio.sleep(0.5)


async def _stall_evidence(bootstrap: str, group_prefix: str, topics: dict[str, str],
                          nodes: Nodes | None) -> str:
    """What a stalled drain looks like from outside: each group's committed offsets (twice,
    10 s apart: do they move?) and the last lines of every running node. Read through a
    consumer's ``committed()``: Tansu's answer to the admin client's OffsetFetch is garbled."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    out: list[str] = []
    for attempt in (1, 2):
        for node, topic in topics.items():
            group = f"{group_prefix}-{node}"
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                        enable_auto_commit=False)
            try:
                await consumer.start()
                parts = sorted(consumer.partitions_for_topic(topic) or ())
                committed = {p: await consumer.committed(TopicPartition(topic, p))
                             for p in parts}
                out.append(f"{group} (look {attempt}): committed {committed}")
            except Exception as err:  # noqa: BLE001 - evidence, not the verdict
                out.append(f"{group} (look {attempt}): {err!r}")
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
        if attempt == 1:
            await asyncio.sleep(10)
    for node, procs in (nodes.running.items() if nodes else ()):
        for i, proc in enumerate(procs):
            lines = proc.log_path.read_text(errors="replace").splitlines()[-6:]
            out.append(f"{node}[{i}] {proc.log_path.name}, last lines:\n  " + "\n  ".join(
                line[:300] for line in lines))
    return "\n" + "\n".join(out)


@contextlib.contextmanager
def s3_server(log: Path, bucket: str = "tansu") -> Iterator[dict[str, str]]:
    """moto's S3-API server on 127.0.0.1 with ``bucket`` created; yields the environment that
    points Tansu's S3 storage at it (``EmbeddedBroker(storage_env=...)``)."""
    with moto_server(log) as server:
        server.create_bucket(bucket)
        yield {"AWS_ENDPOINT": server.endpoint_url, "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def nodes_peak_rss(nodes: Nodes) -> dict[str, float]:
    """VmHWM of the node processes running at the end, in MB."""
    out: dict[str, float] = {}
    for node, procs in nodes.running.items():
        for i, proc in enumerate(procs):
            try:
                status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    out[f"{node}[{i}]"] = round(int(line.split()[1]) / 1024, 1)
    return out


# --- the checks -------------------------------------------------------------------------------

async def _check(plan: Plan, settings: Any, endpoints: Endpoints, report: Report,
                 garbage: int) -> None:
    fail = report.failures.append
    url = endpoints.database_url
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT workflow_id, namespace, state, seq, error_code, hash "
                                "FROM workflows")
        transitions = await conn.fetch(
            "SELECT workflow_id, count(*) AS n, max(seq) AS top, "
            "(array_agg(to_state ORDER BY seq DESC))[1] AS last, "
            "(array_agg(to_state ORDER BY seq))[1] AS first FROM workflow_transitions "
            "GROUP BY workflow_id")
        stored = {r["namespace"]: dict(r) for r in await conn.fetch(
            "SELECT * FROM namespace_summary")}
        gens = await conn.fetch("SELECT g.namespace, g.hash, g.size, g.artifact_uri, "
                                "w.request_id FROM generations g JOIN workflows w "
                                "USING (workflow_id)")
        processed = await conn.fetchval(
            "SELECT coalesce(sum(cardinality(applied_events)), 0) FROM workflows") \
            + await conn.fetchval("SELECT count(*) FROM processed_events")
        anomalies = await conn.fetch("SELECT kind, detail FROM anomalies LIMIT 5")
    finally:
        await conn.close()

    # 1. Exactly the expected workflows, each in its expected terminal state.
    expected = {derive_id(r.event_id, "workflow"): r for r in plan.workflows}
    got = {r["workflow_id"]: r for r in rows}
    missing, extra = expected.keys() - got.keys(), got.keys() - expected.keys()
    if missing:
        fail(f"{len(missing)} workflows lost, e.g. {sorted(map(str, missing))[:3]}")
    if extra:
        fail(f"{len(extra)} workflows nobody asked for, e.g. {sorted(map(str, extra))[:3]}")
    wrong = [(str(wid), expected[wid].kind, row["state"], row["error_code"])
             for wid, row in got.items() if wid in expected
             and (row["state"], row["error_code"]) != (expected[wid].expect_state,
                                                      expected[wid].expect_code)]
    if wrong:
        fail(f"{len(wrong)} workflows ended wrongly (id, kind, state, code), e.g. {wrong[:3]}")
    bad_hash = [str(wid) for wid, row in got.items() if wid in expected
                and expected[wid].expect_hash and row["hash"] != expected[wid].expect_hash]
    if bad_hash:
        fail(f"{len(bad_hash)} stamp workflows with a wrong hash, e.g. {bad_hash[:3]}")

    # 2. Every transition recorded once: seq 1..n without gaps, from received to the end state.
    by_wf = {t["workflow_id"]: t for t in transitions}
    broken = [str(wid) for wid, row in got.items()
              if (t := by_wf.get(wid)) is None or t["n"] != row["seq"] or t["top"] != row["seq"]
              or t["first"] != "received" or t["last"] != row["state"]]
    if broken:
        fail(f"{len(broken)} workflows with a broken transition history, e.g. {broken[:3]}")
    report.checks["transitions"] = sum(int(t["n"]) for t in transitions)
    report.checks["processed_events"] = int(processed)

    # 3. Generated images: one per request, all different; the bytes on disk match.
    truth = ground_truth(plan)
    by_request = {r.event_id: r for r in plan.workflows}
    image_of: dict[tuple[str, str, int | None], set[str]] = defaultdict(set)
    image_bytes: dict[str, dict[str, int]] = defaultdict(dict)
    for g in gens:
        req = by_request[g["request_id"]].generation
        assert req is not None
        image_of[(g["namespace"], req.prompt, req.seed)].add(g["hash"])
        data = await asyncio.to_thread(Path(urlsplit(g["artifact_uri"]).path).read_bytes)
        if blake3(data).hexdigest() != g["hash"] or len(data) != g["size"]:
            fail(f"artifact {g['artifact_uri']} does not match its stamp")
        image_bytes[g["namespace"]][g["hash"]] = len(data)
    if len({h for hs in image_of.values() for h in hs}) != len({(p, s) for _, p, s in image_of}):
        fail("two (prompt, seed) pairs gave the same image: the ground truth cannot count them")
    for ns, sizes in image_bytes.items():
        truth[ns].total_bytes += sum(sizes.values())

    # 4. Aggregates equal the ground truth, namespace by namespace.
    for ns in sorted(truth.keys() | stored.keys()):
        want, have = asdict(truth.get(ns, Truth())), stored.get(ns, {})
        diff = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
        if diff:
            fail(f"namespace {ns}: (truth, stored) differ: {diff}")
    if anomalies:
        fail(f"anomalies recorded: {[dict(a) for a in anomalies]}")

    # 5. Every unreadable record dead-lettered, and nothing else. A letter may be there twice
    # (a node killed after sending it, before committing its record, sends it again): the
    # topic is read until every original is seen, not until as many letters as originals.
    originals = await _dead_lettered(endpoints.bootstrap_servers, settings.dlq_topic(
        settings.requests_topic), garbage, timeout=120)
    report.dead_letters = len(originals)
    if len(originals) != garbage:
        fail(f"{len(originals)} distinct records dead-lettered, {garbage} unreadable published")

    # 6. The operator's reconciliation, as an operator runs it.
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "stampflow", "check"],
        env={**os.environ, "STAMPFLOW_SERVICES": "external", "STAMPFLOW_DATABASE_URL": url},
        capture_output=True, text=True, timeout=120)
    report.checks["stampflow_check_exit"] = proc.returncode
    if proc.returncode != 0:
        fail(f"stampflow check exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
    report.checks["workflows"] = len(got)
    report.checks["namespaces"] = len(stored)


# --- the long run, as a command ---------------------------------------------------------------

async def _dead_lettered(bootstrap: str, topic: str, want: int,
                         timeout: float) -> set[tuple[int, int]]:
    """The (partition, offset) of each original record in dead-letter ``topic``: read until
    ``want`` distinct originals are seen, or nothing new came for 15 s, or ``timeout``."""
    consumer = make_consumer(bootstrap, [topic], f"campaign-check-{os.urandom(4).hex()}")
    await consumer.start()
    wait = FetchWait(consumer)
    seen: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while len(seen) < want and time.monotonic() < deadline and \
                time.monotonic() - last_new < 15:
            fetched = await consumer.getmany(timeout_ms=200)
            await wait.after_poll(fetched)
            for records in fetched.values():
                for record in records:
                    letter = parse_dead_letter(record.value or b"")
                    key = (int(letter["partition"]), int(letter["offset"]))
                    if key not in seen:
                        seen.add(key)
                        last_new = time.monotonic()
    finally:
        await consumer.stop()
    return seen


def write_results(report: Report, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version()},
           **asdict(report), "kills": report.kills, "passed": not report.failures}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    c = report.config
    kinds = report.requests_by_kind
    verdict = "FAILED" if report.failures else "PASSED: nothing lost, nothing doubled"
    lines = [
        f"# Fault campaign — {doc['when']}", "",
        f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs, Python "
        f"{doc['machine']['python']}. Embedded PostgreSQL and Tansu; nodes as processes.", "",
        f"Command: `./dev sh python -m tests.integration.campaign --requests {c['requests']} "
        f"--kills {c['kills']} --freezes {c['freezes']} --postgres-restarts "
        f"{c['postgres_restarts']} --seed {c['seed']}"
        + (f" --outages ... ({', '.join(Outage(**o).name for o in c['outages'])})"
           if c.get("outages") else "") + "`", "",
        "| measure | value |", "| --- | --- |",
        f"| requests published | {c['requests']} |",
        f"| by kind | {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} |",
        f"| workflows expected / recorded | {report.workflows_expected} / "
        f"{report.checks.get('workflows')} |",
        f"| transitions recorded | {report.checks.get('transitions')} |",
        f"| unreadable records dead-lettered | {report.dead_letters} |",
        f"| kill -9 | {report.kills} |",
        f"| publish time / drain after publish / total | {report.submit_s:.0f} s / "
        f"{report.drain_s:.0f} s / {report.total_s:.0f} s |",
        f"| node peak RSS at the end (VmHWM) | {report.peak_rss_mb} |",
        f"| SIGTERM exit codes | {report.exit_codes} |",
        f"| `stampflow check` exit code | {report.checks.get('stampflow_check_exit')} |",
        f"| result | {verdict} |",
        "", "## Faults", "", "| at s | fault |", "| --- | --- |",
        *[f"| {f.at_s} | {f.what} |" for f in report.faults],
    ]
    if report.failures:
        lines += ["", "## Failures", "", *[f"- {f}" for f in report.failures]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    from stampflow.inference import make_tiny_flux
    from stampflow.services import EmbeddedServices

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--freezes", type=int, default=3, help="broker SIGSTOPs of 10 s")
    p.add_argument("--postgres-restarts", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--generation-share", type=float, default=0.002)
    p.add_argument("--outages", default="",
                   help="comma-separated outages through fault proxies, in order: "
                        f"{', '.join(standard_outages())}, or 'all'")
    p.add_argument("--outage-seconds", type=float, default=180.0,
                   help="how long each refusing or hanging outage lasts")
    p.add_argument("--flap-seconds", type=float, default=60.0)
    p.add_argument("--broker-kills", type=int, default=0,
                   help="broker kill -9 and restart; runs the broker on S3 storage (a moto "
                        "server on 127.0.0.1: pip install 'moto[server]')")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the services' data and the node logs here (default: a temporary "
                        "folder, deleted at the end)")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (default bench/results/faults-<N>)")
    args = p.parse_args()
    known = standard_outages(args.outage_seconds, args.flap_seconds)
    names = list(known) if args.outages == "all" else [
        n.strip() for n in args.outages.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown outage(s) {unknown}; known: {', '.join(known)}")
    cfg = Config(requests=args.requests, seed=args.seed, kills=args.kills, rate=args.rate,
                 freezes=args.freezes, postgres_restarts=args.postgres_restarts,
                 generation_share=args.generation_share, drain_timeout_s=3600,
                 outages=tuple(known[n] for n in names), broker_kills=args.broker_kills)
    out = args.out or Path("bench/results") / f"faults-{args.requests}"
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    kept = contextlib.nullcontext(str(args.work_dir.resolve())) if args.work_dir else None
    with kept or tempfile.TemporaryDirectory(prefix="stampflow-campaign-") as tmp, \
            contextlib.ExitStack() as stack:
        svc = EmbeddedServices(Path(tmp) / "services", fast=True)
        if cfg.broker_kills:
            svc.broker.storage = "s3://tansu/"
            svc.broker.storage_env = stack.enter_context(s3_server(Path(tmp) / "moto.log"))
        # Behind fault proxies: the broker advertises its proxy's port, so clients that
        # bootstrap through the proxy stay behind it.
        with FaultProxy(upstream=("127.0.0.1", svc.broker.port), name="broker") as bp, \
                FaultProxy(upstream=("127.0.0.1", svc.postgres.port), name="postgres") as pp:
            svc.broker.advertised_port = bp.listen_port
            with svc:
                # The nodes log in as the owner role, as they would in production.
                endpoints = Endpoints(svc.database_url.replace(
                    f":{svc.postgres.port}/", f":{pp.listen_port}/"), svc.broker.bootstrap_servers)
                work = Path(tmp) / "work"
                work.mkdir()
                model = make_tiny_flux(Path(tmp) / "tiny-flux") if cfg.generation_share else None
                report = asyncio.run(run_campaign(cfg, endpoints, svc.postgres, svc.broker, work,
                                                  tiny_model=model, proxies=Proxies(bp, pp)))
    write_results(report, out)
    print(out.with_suffix(".md").read_text())
    sys.exit(1 if report.failures else 0)



if __name__ == "__main__":
    main()
