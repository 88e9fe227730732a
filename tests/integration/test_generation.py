"""Generation requests end to end: Kafka -> orchestrator -> the real diffusers pipeline (a tiny
FLUX built here) -> artifact store + stamp -> generation.completed -> PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
from blake3 import blake3

from stampflow.contracts.events import GenerationRequested, derive_id
from stampflow.contracts.nodes import load_contracts
from stampflow.inference.engine import decode_png
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    aggregates,
    fetch,
    finished_count,
    reconcile,
    running_stack,
    settings_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def tiny_model(tiny_flux_model: Path) -> Path:
    return tiny_flux_model


def small(prompt: str, **kw: object) -> GenerationRequested:
    return GenerationRequested(prompt=prompt, width=64, height=64, num_inference_steps=2,
                               model="tiny", **kw)  # type: ignore[arg-type]


async def test_generation_requests_end_to_end(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
    tiny_model: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path, models={"tiny": str(tiny_model)},
                            artifact_root=tmp_path / "artifacts")
    async with running_stack(settings, endpoints) as stack:
        c = stack.client
        ok_ids = [await c.submit_generation("art", small("a red cat", seed=7)),
                  await c.submit_generation("art", small("a blue dog")),  # seed from the id
                  await c.submit_generation("art", small("a red cat", seed=7))]  # same image
        await c.submit_generation("art", GenerationRequested(prompt="x", model="missing-model",
                                                             width=64, height=64))
        # a folder is never a model name, even the registered model's own folder
        await c.submit_generation("art", GenerationRequested(prompt="x", model=str(tiny_model),
                                                             width=64, height=64))
        over = await c.submit_generation("art", GenerationRequested(
            prompt="x", model="tiny", width=2048, height=2048, num_inference_steps=4))
        bad = {"event_id": str(uuid4()), "event_type": "generation.requested",
               "namespace": "art", "correlation_id": str(uuid4()),
               "occurred_at": "2026-01-01T00:00:00Z", "source": "t",
               "payload": {"type": "generation.requested", "prompt": "p", "width": 500}}
        await c.publish_raw(json.dumps(bad).encode(), b"art")
        await wait_for(lambda: _done(fresh_database_url, 7), 120, "7 generation workflows")
    rows = await fetch(fresh_database_url,
                       "SELECT workflow_id, state, outcome, error_code, reason, hash "
                       "FROM workflows ORDER BY created_at")
    by_id = {r["workflow_id"]: r for r in rows}
    done = [by_id[derive_id(i, "workflow")] for i in ok_ids]
    assert [r["state"] for r in done] == ["completed"] * 3
    # Same seed and prompt: the same picture. The same bytes only if both ran in the same batch
    # position (batched kernels round differently: README, "Generating images").
    stored = {r["hash"]: await asyncio.to_thread(
        (settings.artifact_root / r["hash"][:2] / r["hash"][2:4] / f"{r['hash']}.png").read_bytes)
        for r in done}
    pixels = [(decode_png(stored[r["hash"]]) * 255).round().astype(int) for r in done]
    assert abs(pixels[0] - pixels[2]).max() <= 2
    assert abs(pixels[0] - pixels[1]).mean() > 10  # another seed: another picture
    failed = sorted((r["error_code"], r["reason"]) for r in rows if r["state"] == "failed")
    assert [code for code, _ in failed] == ["invalid_request", "over_budget", "unknown_model",
                                            "unknown_model"]
    assert "multiple of 16" in failed[0][1]
    assert "2048x2048 at 4 steps is 16777216 pixel-steps" in failed[1][1]
    assert "'missing-model': not registered" in failed[2][1] + failed[3][1]
    assert f"{str(tiny_model)!r}: not registered" in failed[2][1] + failed[3][1]
    refused = await fetch(fresh_database_url,
                          "SELECT array_agg(to_state ORDER BY seq) AS s FROM "
                          "workflow_transitions WHERE workflow_id = $1",
                          derive_id(over, "workflow"))
    assert refused[0]["s"] == ["received", "failed"]  # refused at admission, never generating
    agg = (await aggregates(fresh_database_url))["art"]
    assert (agg["workflows"], agg["completed"], agg["failed"], agg["generations"]) == (7, 3, 4, 3)
    assert agg["total_pixels"] == 3 * 64 * 64
    assert agg["compute_seconds"] > 0
    assert agg["stamps"] == len({r["hash"] for r in done})  # each distinct PNG stamped once
    transitions = await fetch(fresh_database_url,
                              "SELECT array_agg(to_state ORDER BY seq) AS s FROM "
                              "workflow_transitions WHERE workflow_id = $1",
                              done[0]["workflow_id"])
    assert transitions[0]["s"] == ["received", "generating", "stamping", "completed"]
    gens = await fetch(fresh_database_url, "SELECT seed, width, height, model FROM generations")
    assert sorted((g["seed"], g["model"]) for g in gens)[0] == (7, "tiny") and len(gens) == 3
    assert await reconcile(fresh_database_url) == []
    stamps = await fetch(fresh_database_url, "SELECT hash, source, size FROM stamps")
    for stamp in stamps:
        path = Path(urlsplit(stamp["source"]).path)
        data = await asyncio.to_thread(path.read_bytes)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert blake3(data).hexdigest() == stamp["hash"] and len(data) == stamp["size"]


async def test_a_generation_that_times_out_fails_clearly(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
    tiny_model: Path,
) -> None:
    endpoints = services.endpoints.with_database(fresh_database_url)
    settings = settings_for(endpoints, topic_prefix, tmp_path, models={"tiny": str(tiny_model)},
                            artifact_root=tmp_path / "artifacts")
    contracts = load_contracts()
    inference = contracts["inference"]
    contracts["inference"] = inference.model_copy(update={
        "io_policy": inference.io_policy.model_copy(update={"timeout_ms": 1})})
    async with running_stack(settings, endpoints, contracts=contracts) as stack:
        await stack.client.submit_generation("slow", small("too slow"))
        await wait_for(lambda: _done(fresh_database_url, 1), 60, "the workflow")
    rows = await fetch(fresh_database_url, "SELECT state, error_code, reason FROM workflows")
    assert [(r["state"], r["error_code"]) for r in rows] == [("failed", "timeout")]
    assert "\n" not in rows[0]["reason"]


async def _done(url: str, n: int) -> bool:
    return await finished_count(url) >= n
