"""10,000 hypothesis-made records against running nodes, among valid requests: every record
ends as exactly one dead letter or exactly one terminal workflow, the one an independent oracle
expects; the valid traffic is counted exactly; the nodes keep running.

Which records must become workflows, and how those end, is decided by tests/oracle.py (json
and jsonschema against the exported envelope schema, plus the rules restated there), never by
the orchestrator's own ``admit()``. The nodes run as `stampflow run` processes: alive at the
end (``poll() is None``) and exiting 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from stampflow.app import prepare
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import settings_for
from tests.fuzz import RECORDS
from tests.integration.fuzz_run import grouped, run_records
from tests.oracle import DEAD_LETTER, ContentRoot, Expectation, Oracle, summarize
from tests.schema_strategies import reproducible_draws

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ_CASES = int(os.environ.get("STAMPFLOW_FUZZ_CASES", "10000"))


def fuzz_records(n: int) -> list[bytes]:
    """``n`` records drawn by hypothesis from the shared strategies, reproducibly."""
    drawn: list[bytes] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(RECORDS)
    def collect(raw: bytes) -> None:
        drawn.append(raw)

    with reproducible_draws():
        collect()
    return drawn


def distinct_requests(raws: list[bytes], oracle: Oracle, n: int,
                      ) -> tuple[list[bytes], list[Expectation]]:
    """A request id names one request (README, "Exactly once"); hypothesis reuses ids, so a
    record whose id (as any reader might take it) was drawn before gets a fresh one, its other
    fields as drawn. Ids are read by the oracle, not by the orchestrator."""
    rng = random.Random(11)
    records: list[bytes] = []
    expected: list[Expectation] = []
    seen: set[UUID] = set()
    for raw in raws:
        expect = oracle.expect(raw)
        if expect.request_ids & seen:
            doc = json.loads(raw)
            doc["event_id"] = str(UUID(int=rng.getrandbits(128), version=4))
            raw = json.dumps(doc).encode()
            expect = oracle.expect(raw)
            if expect.request_ids & seen:
                continue
        seen |= expect.request_ids
        records.append(raw)
        expected.append(expect)
        if len(records) == n:
            break
    return records, expected


async def test_ten_thousand_fuzz_records_against_running_nodes(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    content = ContentRoot(tmp_path / "content")
    content.add_file("a.txt", b"a file the fuzz's paths name\n")  # tests/fuzz.py's paths
    content.add_file("sub/dir/file", b"and one further down\n")
    oracle = Oracle(content, max_content_bytes=64 * 1024 * 1024)  # no model is installed
    records, expected = distinct_requests(fuzz_records(int(FUZZ_CASES * 1.05)), oracle,
                                          FUZZ_CASES)
    assert len(records) == FUZZ_CASES
    letters = sum(e.outcomes == {DEAD_LETTER} for e in expected)
    workflows = sum(DEAD_LETTER not in e.outcomes for e in expected)
    assert letters > 100 and workflows > 100, (letters, workflows)  # both outcomes reached
    t_judged = time.monotonic()

    endpoints = services.endpoints.with_database(fresh_database_url)
    settings_ = settings_for(endpoints, topic_prefix, content.root)
    await prepare(settings_, endpoints)
    env = {"STAMPFLOW_LOG_LEVEL": "WARNING",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # an empty cache, offline
    logs = tmp_path / "logs"
    labels = ["json" if raw[:1] in b"{[" else "bytes" for raw in records]
    run = await run_records(records, expected, labels, settings=settings_,
                            endpoints=endpoints, env=env, logs=logs, control_every=20,
                            source="fuzz-node")
    control = Counter(r["state"] for r in run.workflows.values() if r["namespace"] == "control")
    print(f"\nfuzz node: {len(records)} records (derandomized) + {len(run.control)} ordinary; "
          f"expected {summarize(expected)}; {run.summary()}; judged in "
          f"{t_judged - t0:.0f}s")
    assert control["completed"] >= len(run.control)
    if run.problems:
        pytest.fail(f"{len(run.problems)} problem(s) (logs in {logs}):\n"
                    + grouped(run.problems), pytrace=False)
