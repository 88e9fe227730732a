"""End to end with valid-but-nasty requests: 10,000 records drawn from the exported JSON Schemas
(tests/schema_strategies.py), most valid to the contract with the worst value each field
allows, some with one rule broken, mixed with ordinary traffic and published to the requests
topic; the orchestrator and the reducer run as `stampflow run` processes.

What each record must become is decided by tests/oracle.py (jsonschema against the exported
schemas, plus the rules a schema cannot express, restated there), never by stampflow's own
validation. Then: every record ended as exactly one terminal workflow with the expected state
and error code (and, for a stamp, the BLAKE3 of the expected bytes) or as exactly one dead
letter; every reason is one line; every workflow's history is whole; `stampflow check` is
clean; both processes are alive at the end and exit 0 on SIGTERM.

Reproducible: the hypothesis seed is fixed (STAMPFLOW_FUZZ_SEED to change it) and printed with
the summary; STAMPFLOW_FUZZ_E2E_CASES sets the number of drawn records.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, Phase, given, seed, settings

from contracts.events import derive_id
from inference import make_tiny_flux
from stampflow.app import prepare
from stampflow.bus import make_consumer
from stampflow.client import Client
from tests.integration.stack import NodeProcess, fetch, reconcile, settings_for
from tests.oracle import (
    DEAD_LETTER,
    ContentRoot,
    Expectation,
    Oracle,
    Outcome,
    one_line,
    summarize,
)
from tests.schema_strategies import Case, PathWorld, installed_generations, nasty_requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = int(os.environ.get("STAMPFLOW_FUZZ_E2E_CASES", "10000"))
SEED = int(os.environ.get("STAMPFLOW_FUZZ_SEED", "20261123"))
CONTENT_LIMIT = 4096  # STAMPFLOW_MAX_CONTENT_BYTES for this test: near-limit records stay small
CONTROL_EVERY = 25  # one ordinary stamp request after every 25 drawn records
TINY = "tiny"


# --- the world the requests aim at ------------------------------------------------------------


def make_content_root(root: Path) -> ContentRoot:
    """A content root with nasty names: what the path fuzz can find, and what it must not."""
    content = ContentRoot(root)
    rng = random.Random(SEED)
    for name, data in {
        "a.txt": b"hello\n",
        "empty": b"",
        "sub/dir/file": b"deep",
        "\u00e9.txt": b"NFC e-acute",                # NFD "e\u0301.txt" is another name
        "\u202eevil.txt": b"right-to-left override",
        "line\nbreak": b"newline in a name",
        "tab\there": b"tab",
        "zw\u200bsp": b"zero-width space",
        "\U0001F600.bin": b"astral",
        " lead space": b"space",
        "trail space ": b"space",
        "-dash": b"dash",
        "x" * 255: b"NAME_MAX bytes",
        "\U0001F600" * 63: b"252 bytes of name",
        "...": b"three dots",
        "back\\slash": b"backslash",
        "\x01ctl": b"control character",
        "%2e%2e": b"percent-encoded dots",
        "\u2028sep": b"line separator",
        "deep/" + "d/" * 40 + "f": b"forty levels down",
        "at-limit.bin": rng.randbytes(CONTENT_LIMIT),
        "over-limit.bin": rng.randbytes(CONTENT_LIMIT + 1),
    }.items():
        content.add_file(name, data)
    content.add_dir("dir")
    content.add_dir("dir/empty-dir")
    return content


def draw_cases(n: int, world: PathWorld) -> list[Case]:
    """``n`` requests drawn by hypothesis, reproducibly (a fixed seed, generation only)."""
    drawn: list[Case] = []

    @seed(SEED)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(nasty_requests(world, CONTENT_LIMIT, frozenset({TINY})))
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


def encode(case: Case) -> bytes:
    return json.dumps(case.doc, ensure_ascii=case.ascii_only).encode("utf-8", "surrogatepass")


def unique_ids(cases: list[Case], rng: random.Random) -> None:
    """An event id names one request (README, "Exactly once"): a drawn id already used (the
    extremes repeat on purpose: the nil UUID, the all-f UUID), in any spelling, is replaced by
    a fresh one."""
    seen: set[Any] = set()
    for case in cases:
        event_id = case.doc.get("event_id")
        try:
            key: Any = UUID(str(event_id))
        except ValueError:
            key = event_id
        if key in seen and event_id is not None:
            key = UUID(int=rng.getrandbits(128), version=4)
            case.doc["event_id"] = str(key)
        seen.add(key)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


# --- what the nodes made of it ------------------------------------------------------------------


async def read_dead_letters(consumer: Any, into: list[dict[str, Any]]) -> None:
    batch = await consumer.getmany(timeout_ms=100)
    for records in batch.values():
        for record in records:
            doc = json.loads(record.value)
            doc["value"] = base64.b64decode(doc["value"])
            into.append(doc)


async def terminal_count(url: str) -> int:
    rows = await fetch(url, "SELECT count(*) AS n FROM workflows "
                            "WHERE state IN ('completed', 'failed')")
    return int(rows[0]["n"])


def actual_outcome(row: dict[str, Any] | None, letters: int) -> Outcome | str:
    if row is not None and letters:
        return f"both a workflow ({row['state']}) and {letters} dead letter(s)"
    if row is not None:
        if row["state"] not in ("completed", "failed"):
            return f"stuck in {row['state']}"
        return Outcome(row["state"], row["error_code"], row["hash"])
    if letters == 1:
        return DEAD_LETTER
    return "lost (no workflow, no dead letter)" if not letters else f"{letters} dead letters"


async def test_valid_but_nasty_requests_end_to_end(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
    tiny_model: Path,
) -> None:
    t_start = time.monotonic()
    content = make_content_root(tmp_path / "content")
    world = PathWorld(str(content.root), tuple(sorted(content.files)), tuple(sorted(content.dirs)))
    oracle = Oracle(content, max_content_bytes=CONTENT_LIMIT, models={TINY})

    cases = draw_cases(CASES, world)
    cases += [Case("generation:installed", {
        "event_id": str(UUID(int=i + 1, version=4)), "event_type": "generation.requested",
        "namespace": "gen-tiny", "correlation_id": str(UUID(int=i + 1, version=4)),
        "occurred_at": "2026-11-23T10:00:00Z", "source": "fuzz-e2e", "payload": payload})
        for i, payload in enumerate(installed_generations(TINY))]
    unique_ids(cases, random.Random(SEED))
    records = [encode(c) for c in cases]
    expected = [oracle.expect(raw) for raw in records]
    t_drawn = time.monotonic()

    endpoints = services.endpoints.with_database(fresh_database_url)
    settings_ = settings_for(endpoints, topic_prefix, content.root,
                             max_content_bytes=CONTENT_LIMIT)
    await prepare(settings_, endpoints)
    env = {
        "STAMPFLOW_MAX_CONTENT_BYTES": str(CONTENT_LIMIT),
        "STAMPFLOW_MODELS": json.dumps({TINY: str(tiny_model)}),
        "STAMPFLOW_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "STAMPFLOW_LOG_LEVEL": "WARNING",
        "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",  # an empty cache, offline
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    orchestrator = NodeProcess("orchestrator", settings_, logs / "orchestrator.log", env)
    reducer = NodeProcess("reducer", settings_, logs / "reducer.log", env)
    control: dict[UUID, bytes] = {}
    letters: list[dict[str, Any]] = []
    dlq = make_consumer(endpoints.bootstrap_servers,
                        [settings_.dlq_topic(settings_.requests_topic)],
                        f"{topic_prefix}-dlq-reader")
    try:
        async with Client(settings_, endpoints, source="fuzz-e2e") as client:
            for i, (case, raw) in enumerate(zip(cases, records, strict=True)):
                ns = case.doc.get("namespace")
                key = ns.encode("utf-8", "surrogatepass") if isinstance(ns, str) and ns \
                    else f"k{i % 7}".encode()
                await client.publish_raw(raw, key, wait=False)
                if i % CONTROL_EVERY == 0:
                    data = f"ordinary request {i}".encode()
                    event_id = UUID(int=random.Random(i).getrandbits(128), version=4)
                    await client.submit_stamp("control", content=data, event_id=event_id,
                                              wait=False)
                    control[event_id] = data
            await client.flush()
        t_published = time.monotonic()
        await dlq.start()
        total = len(records) + len(control)
        deadline = time.monotonic() + 300
        settled = False
        while time.monotonic() < deadline:
            await read_dead_letters(dlq, letters)
            if await terminal_count(fresh_database_url) + len(letters) >= total:
                settled = True
                break
            if orchestrator.proc.poll() is not None or reducer.proc.poll() is not None:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # anything counted twice would show up now
        await read_dead_letters(dlq, letters)
        t_settled = time.monotonic()
        alive = {"orchestrator": orchestrator.proc.poll(), "reducer": reducer.proc.poll()}
        assert alive == {"orchestrator": None, "reducer": None}, (
            f"a node process exited: {alive}; logs in {logs}:\n"
            + _tail(logs / "orchestrator.log") + _tail(logs / "reducer.log"))

        rows = await fetch(fresh_database_url,
                           "SELECT workflow_id, namespace, kind, state, error_code, reason, hash "
                           "FROM workflows")
        by_id = {r["workflow_id"]: r for r in rows}
        letters_by_value = Counter(doc["value"] for doc in letters)
        claimed: set[UUID] = set()
        problems: list[str] = []
        for case, raw, expect in zip(cases, records, expected, strict=True):
            wf_ids = [derive_id(rid, "workflow") for rid in expect.request_ids]
            found = [by_id[w] for w in wf_ids if w in by_id]
            claimed.update(w for w in wf_ids if w in by_id)
            got = actual_outcome(found[0] if found else None, letters_by_value[raw])
            if isinstance(got, str) or not expect.allows(got):
                problems.append(_problem(case, raw, expect, got))
        for event_id, data in control.items():
            row = by_id.get(derive_id(event_id, "workflow"))
            claimed.add(derive_id(event_id, "workflow"))
            if row is None or (row["state"], row["hash"]) != ("completed",
                                                             blake3(data).hexdigest()):
                problems.append(f"ordinary request {event_id}: {row}")
        strays = [r for w, r in by_id.items() if w not in claimed]
        problems += [f"a workflow no record asked for: {r}" for r in strays[:5]]
        known = Counter(records)
        problems += [f"a dead letter for no record: {v[:120]!r}"
                     for v, n in letters_by_value.items() if n > known[v]][:5]
        for r in rows:
            if r["state"] == "failed" and not one_line(r["reason"] or ""):
                problems.append(f"reason is not one line: {r['reason']!r:.300} "
                                f"(workflow {r['workflow_id']})")
        for doc in letters:
            if not one_line(str(doc.get("error", ""))):
                problems.append(f"dead-letter error is not one line: {doc['error']!r:.300}")

        broken_histories = await fetch(fresh_database_url, """
            SELECT w.workflow_id, w.state, w.seq, count(t.seq) AS n, max(t.seq) AS top,
                   (array_agg(t.to_state ORDER BY t.seq DESC))[1] AS last
            FROM workflows w LEFT JOIN workflow_transitions t USING (workflow_id)
            GROUP BY w.workflow_id, w.state, w.seq
            HAVING count(t.seq) <> w.seq OR max(t.seq) <> w.seq
                OR (array_agg(t.to_state ORDER BY t.seq DESC))[1] <> w.state""")
        problems += [f"history does not add up: {r}" for r in broken_histories[:5]]
        multiline = await fetch(fresh_database_url,
                                "SELECT workflow_id, reason FROM workflow_transitions "
                                "WHERE reason IS NOT NULL")
        problems += [f"transition reason is not one line: {r}" for r in multiline
                     if not one_line(r["reason"])][:5]
        anomalies = await fetch(fresh_database_url, "SELECT kind, detail FROM anomalies")
        problems += [f"anomaly: {a}" for a in anomalies[:5]]
        problems += [f"generation: {p}" for p in await _generations_match(
            fresh_database_url, cases, expected, by_id)]
        differences = await reconcile(fresh_database_url)
        problems += [f"stampflow check: {d}" for d in differences]

        for node in (orchestrator, reducer):
            code, took = node.terminate()
            if code != 0:
                problems.append(f"{node.node} exited {code} on SIGTERM after {took:.1f}s")
    finally:
        await dlq.stop()
        orchestrator.kill()
        reducer.kill()

    families = Counter(c.family for c in cases)
    print(f"\nfuzz e2e: seed {SEED}, {len(records)} drawn records + {len(control)} ordinary; "
          f"families {dict(sorted(families.items()))}; expected {summarize(expected)}; "
          f"{len(rows)} workflows, {len(letters)} dead letters; settled={settled}; "
          f"draw+judge {t_drawn - t_start:.0f}s, publish {t_published - t_drawn:.0f}s, "
          f"settle {t_settled - t_published:.0f}s")
    assert len(records) >= CASES
    assert not problems, (
        f"{len(problems)} problem(s) (seed {SEED}; logs in {logs}):\n"
        + "\n".join(_grouped(problems)))


def _problem(case: Case, raw: bytes, expect: Expectation, got: Outcome | str) -> str:
    return (f"[{case.family}] expected {expect.describe()}; got {got}\n"
            f"    record: {raw[:400]!r}{'...' if len(raw) > 400 else ''}")


def _grouped(problems: list[str], per_kind: int = 4) -> list[str]:
    """At most ``per_kind`` problems of each kind, counted. A record's problem is of the kind
    "[family] got <outcome>", any other of the kind named before its first colon."""
    kinds: dict[str, list[str]] = {}
    for p in problems:
        head = p.split("\n", 1)[0]
        if head.startswith("[") and "; got " in head:
            kind = head.split("]", 1)[0] + "] got " + head.split("; got ", 1)[1]
        else:
            kind = head.split(":", 1)[0]
        kinds.setdefault(kind, []).append(p)
    out = []
    for kind, ps in kinds.items():
        out.append(f"--- {len(ps)} x {kind}")
        out += ps[:per_kind]
    return out


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


async def _generations_match(url: str, cases: list[Case], expected: list[Expectation],
                             by_id: dict[UUID, dict[str, Any]]) -> list[str]:
    """The installed model's generations were made as asked: seed, size, steps, model."""
    gens = {g["workflow_id"]: g for g in await fetch(
        url, "SELECT workflow_id, seed, width, height, steps, model FROM generations")}
    problems = []
    for case, expect in zip(cases, expected, strict=True):
        certain = expect.certain
        if case.family != "generation:installed" or certain is None or \
                certain.state != "completed":
            continue
        (request_id,) = expect.request_ids
        wf = derive_id(request_id, "workflow")
        g = gens.get(wf)
        p = case.doc["payload"]
        if g is None:
            problems.append(f"no generations row for {p!r:.200} ({by_id.get(wf)})")
            continue
        asked = (p.get("seed", g["seed"]), p["width"], p["height"], p["num_inference_steps"],
                 p["model"])
        made = (g["seed"], g["width"], g["height"], g["steps"], g["model"])
        if asked != made:
            problems.append(f"asked {asked}, made {made}")
    return problems
