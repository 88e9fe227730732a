"""Run fuzz records through `stampflow run orchestrator` and `stampflow run reducer` processes and
hold what they made against what tests/oracle.py expects. Shared by the running-node fuzz and
the end-to-end fuzz of valid-but-nasty requests.

Checks, per record: exactly one terminal workflow or exactly one dead letter, and one the
oracle allows (state, error code, a stamp's hash). Over the whole run: no workflow nor dead
letter that no record asked for; ordinary traffic completed with the right hash; every reason
(workflow, transition, dead letter) one line; every workflow's history whole (seq 1..n, the last
transition into its state); no anomalies; `stampflow check` clean; both processes alive at the
end and exiting 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

from blake3 import blake3

from stampflow.bus import make_consumer
from stampflow.client import Client
from stampflow.contracts.events import derive_id
from stampflow.services import Endpoints
from stampflow.settings import Settings
from stampflow.testing.stack import NodeProcess, fetch, reconcile
from tests.oracle import DEAD_LETTER, Expectation, Outcome, one_line

CONTROL_IDS = UUID("6b1d5e8a-58c4-4f0e-9a51-0c8f3d7e2a10")  # uuid5 namespace of ordinary ids


@dataclass
class Run:
    """What the nodes made of the records, and every problem found with it."""

    problems: list[str] = field(default_factory=list)
    workflows: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    letters: list[dict[str, Any]] = field(default_factory=list)
    control: dict[UUID, bytes] = field(default_factory=dict)
    settled: bool = False
    publish_s: float = 0.0
    settle_s: float = 0.0

    def summary(self) -> str:
        return (f"{len(self.workflows)} workflows, {len(self.letters)} dead letters, "
                f"settled={self.settled}; publish {self.publish_s:.0f}s, "
                f"settle {self.settle_s:.0f}s")


def record_key(record: bytes, i: int) -> bytes:
    """The Kafka key: the namespace the record claims, when it claims a string, else rotating."""
    try:
        namespace = json.loads(record).get("namespace")
    except (ValueError, AttributeError, RecursionError):
        namespace = None
    if isinstance(namespace, str) and namespace:
        return namespace.encode("utf-8", "surrogatepass")
    return f"k{i % 7}".encode()


async def run_records(
    records: Sequence[bytes], expected: Sequence[Expectation], labels: Sequence[str], *,
    settings: Settings, endpoints: Endpoints, env: dict[str, str], logs: Path,
    control_every: int, source: str, timeout_s: float = 300.0,
) -> Run:
    """Publish ``records`` (one ordinary stamp request after every ``control_every``), run the
    nodes as processes until every record is accounted for, and judge the outcome."""
    run = Run()
    taken: set[UUID] = set()
    for expect in expected:
        if expect.request_ids & taken:
            raise AssertionError(f"two records share a request id: {sorted(expect.request_ids)}")
        taken |= expect.request_ids
    await asyncio.to_thread(logs.mkdir, exist_ok=True)
    orchestrator = NodeProcess("orchestrator", settings, logs / "orchestrator.log", env)
    inference = NodeProcess("inference", settings, logs / "inference.log", env)
    reducer = NodeProcess("reducer", settings, logs / "reducer.log", env)
    nodes = (orchestrator, inference, reducer)
    dlq = make_consumer(endpoints.bootstrap_servers,
                        [settings.dlq_topic(settings.requests_topic)],
                        f"{settings.consumer_group_prefix}-fuzz-dlq-reader")
    try:
        t0 = time.monotonic()
        async with Client(settings, endpoints, source=source) as client:
            for i, raw in enumerate(records):
                await client.publish_raw(raw, record_key(raw, i), wait=False)
                if i % control_every == 0:
                    data = f"ordinary request {i}".encode()
                    # Not from random.Random(i): hypothesis's uuids() are Random(seed) bits,
                    # and a small seed is a likely draw, so a record could share the id.
                    event_id = uuid5(CONTROL_IDS, str(i))
                    assert event_id not in taken, f"ordinary request {i} has a record's id"
                    await client.submit_stamp("control", content=data, event_id=event_id,
                                              wait=False)
                    run.control[event_id] = data
            await client.flush()
        t1 = time.monotonic()
        run.publish_s = t1 - t0
        await dlq.start()
        total = len(records) + len(run.control)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await _read_letters(dlq, run.letters)
            if await _terminal_count(settings) + len(run.letters) >= total:
                run.settled = True
                break
            if any(n.proc.poll() is not None for n in nodes):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # anything published twice would show up now
        await _read_letters(dlq, run.letters)
        run.settle_s = time.monotonic() - t1
        exited = {n.node: n.proc.poll() for n in nodes if n.proc.poll() is not None}
        if exited:
            run.problems.append(f"node process exited: {exited}; logs in {logs}:\n"
                                + "".join(_tail(logs / f"{n.node}.log") for n in nodes))
        url = _database_url(settings)
        rows = await fetch(url, "SELECT workflow_id, namespace, kind, state, error_code, reason, "
                                "hash FROM workflows")
        run.workflows = {r["workflow_id"]: r for r in rows}
        run.problems += _judge(records, expected, labels, run)
        run.problems += await _whole(url, run)
        for node in nodes:
            if node.proc.poll() is None:
                code, took = node.terminate()
                if code != 0:
                    run.problems.append(f"SIGTERM: {node.node} exited {code} after {took:.1f}s")
    finally:
        await dlq.stop()
        for node in nodes:
            node.kill()
    return run


def _database_url(settings: Settings) -> str:
    assert settings.database_url is not None
    return settings.database_url.get_secret_value()


async def _read_letters(consumer: Any, into: list[dict[str, Any]]) -> None:
    batch = await consumer.getmany(timeout_ms=100)
    for records in batch.values():
        for record in records:
            doc = json.loads(record.value)
            doc["value"] = base64.b64decode(doc["value"])
            into.append(doc)


async def _terminal_count(settings: Settings) -> int:
    rows = await fetch(_database_url(settings), "SELECT count(*) AS n FROM workflows "
                                                "WHERE state IN ('completed', 'failed')")
    return int(rows[0]["n"])


def _actual(row: dict[str, Any] | None, letters: int) -> Outcome | str:
    if row is not None and letters:
        return f"both a workflow ({row['state']}) and {letters} dead letter(s)"
    if row is not None:
        if row["state"] not in ("completed", "failed"):
            return f"stuck in {row['state']}"
        return Outcome(row["state"], row["error_code"], row["hash"])
    if letters == 1:
        return DEAD_LETTER
    return "lost (no workflow, no dead letter)" if not letters else f"{letters} dead letters"


def _judge(records: Sequence[bytes], expected: Sequence[Expectation], labels: Sequence[str],
           run: Run) -> list[str]:
    problems: list[str] = []
    unclaimed = Counter(doc["value"] for doc in run.letters)
    copies = Counter(records)  # identical records (no readable id) each claim one letter
    claimed: set[UUID] = set()
    for raw, expect, label in zip(records, expected, labels, strict=True):
        found = [w for w in (derive_id(r, "workflow") for r in expect.request_ids)
                 if w in run.workflows]
        claimed.update(found)
        if copies[raw] == 1:
            mine = unclaimed[raw]
        else:
            mine = 1 if unclaimed[raw] > 0 and not found else 0
        unclaimed[raw] -= mine
        got = _actual(run.workflows[found[0]] if found else None, mine)
        if isinstance(got, str) or not expect.allows(got):
            seen = run.workflows[found[0]] if found else None
            detail = "" if seen is None else (
                f"\n    workflow {seen['workflow_id']}: hash {seen['hash']}, "
                f"reason {seen['reason']!r:.200}; expected hashes "
                f"{sorted(str(o.hash) for o in expect.outcomes)}")
            problems.append(f"[{label}] expected {expect.describe()}; got {got}{detail}\n"
                            f"    record: {raw[:400]!r}{'...' if len(raw) > 400 else ''}")
    for event_id, data in run.control.items():
        wf = derive_id(event_id, "workflow")
        claimed.add(wf)
        row = run.workflows.get(wf)
        if row is None or (row["state"], row["hash"]) != ("completed", blake3(data).hexdigest()):
            problems.append(f"ordinary request {event_id}: {row}")
    problems += [f"a workflow no record asked for: {r}"
                 for w, r in run.workflows.items() if w not in claimed][:5]
    problems += [f"a dead letter for no record, or one too many: {v[:200]!r}"
                 for v, n in unclaimed.items() if n > 0][:5]
    problems += [f"reason is not one line: {r['reason']!r:.300} ({r['workflow_id']})"
                 for r in run.workflows.values()
                 if r["state"] == "failed" and not one_line(r["reason"] or "")]
    problems += [f"dead-letter error is not one line: {d.get('error')!r:.300}"
                 for d in run.letters if not one_line(str(d.get("error", "")))]
    return problems


async def _whole(url: str, run: Run) -> list[str]:
    problems: list[str] = []
    histories = await fetch(url, """
        SELECT w.workflow_id, w.state, w.seq, count(t.seq) AS n, max(t.seq) AS top,
               (array_agg(t.to_state ORDER BY t.seq DESC))[1] AS last
        FROM workflows w LEFT JOIN workflow_transitions t USING (workflow_id)
        GROUP BY w.workflow_id, w.state, w.seq
        HAVING count(t.seq) <> w.seq OR max(t.seq) <> w.seq
            OR (array_agg(t.to_state ORDER BY t.seq DESC))[1] <> w.state""")
    problems += [f"history does not add up: {r}" for r in histories[:5]]
    reasons = await fetch(url, "SELECT workflow_id, reason FROM workflow_transitions "
                               "WHERE reason IS NOT NULL")
    problems += [f"transition reason is not one line: {r}" for r in reasons
                 if not one_line(r["reason"])][:5]
    anomalies = await fetch(url, "SELECT namespace, kind, detail FROM anomalies")
    problems += [f"anomaly: {a}" for a in anomalies[:5]]
    problems += [f"stampflow check: {d}" for d in await reconcile(url)]
    return problems


def grouped(problems: list[str], per_kind: int = 4) -> str:
    """At most ``per_kind`` problems of each kind, counted. A record's problem is of the kind
    "[label] got <outcome>", any other of the kind named before its first colon."""
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
    return "\n".join(out)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
