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

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from stampflow.app import prepare
from stampflow.contracts.events import derive_id
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import fetch, settings_for
from tests.integration.fuzz_run import grouped, run_records
from tests.oracle import ContentRoot, Expectation, Oracle, summarize
from tests.schema_strategies import (
    Case,
    PathWorld,
    installed_generations,
    nasty_requests,
    reproducible_draws,
)

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

    with reproducible_draws():
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


@pytest.fixture
def tiny_model(tiny_flux_model: Path) -> Path:
    return tiny_flux_model


async def test_valid_but_nasty_requests_end_to_end(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
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
    run = await run_records(records, expected, [c.family for c in cases], settings=settings_,
                            endpoints=endpoints, env=env, logs=logs,
                            control_every=CONTROL_EVERY, source="fuzz-e2e")
    run.problems += await _generations_match(fresh_database_url, cases, expected)

    families = Counter(c.family for c in cases)
    print(f"\nfuzz e2e: seed {SEED}, {len(records)} drawn records + {len(run.control)} "
          f"ordinary; families {dict(sorted(families.items()))}; expected "
          f"{summarize(expected)}; {run.summary()}; draw+judge {t_drawn - t_start:.0f}s")
    assert len(records) >= CASES
    if run.problems:
        pytest.fail(f"{len(run.problems)} problem(s) (seed {SEED}; logs in {logs}):\n"
                    + grouped(run.problems), pytrace=False)


async def _generations_match(url: str, cases: list[Case], expected: list[Expectation],
                             ) -> list[str]:
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
        g = gens.get(derive_id(request_id, "workflow"))
        p = case.doc["payload"]
        if g is None:
            problems.append(f"generation: no generations row for {p!r:.200}")
            continue
        asked = (p.get("seed", g["seed"]), p["width"], p["height"], p["num_inference_steps"],
                 p["model"])
        made = (g["seed"], g["width"], g["height"], g["steps"], g["model"])
        if asked != made:
            problems.append(f"generation: asked {asked}, made {made}")
    return problems
