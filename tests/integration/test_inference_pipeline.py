"""The real tiny FLUX model, built locally and loaded through the registry: the same code path
as a real model. No services needed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.events import GenerationCompleted, GenerationRequested
from contracts.nodes import BatchingPolicy, IoPolicy, builtin_contract
from inference.artifacts import ArtifactStore
from inference.effect import InferenceEffectNode
from inference.engine import GeneratedImage, GenerationJob, InferenceEngine, decode_png
from inference.registry import ModelRegistry
from inference.tiny import make_tiny_flux
from nodes.fsm import Workflow
from nodes.orchestrator.core import EffectFailed, GenerationSucceeded
from nodes.stamping import StampingNode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(prompt: str, seed: int, **kw: object) -> GenerationJob:
    fields: dict[str, object] = {"prompt": prompt, "seed": seed, "model": "tiny", "width": 64,
                                 "height": 64, "num_inference_steps": 2}
    fields.update(kw)
    return GenerationJob(**fields)  # type: ignore[arg-type]


def _engine(tiny_dir: Path) -> InferenceEngine:
    return InferenceEngine(ModelRegistry({"tiny": tiny_dir}, device="cpu"), keep_arrays=True)


def _ok(result: object) -> GeneratedImage:
    assert isinstance(result, GeneratedImage), result
    return result


def test_tiny_model_makes_a_png(tiny_dir: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size < 5_000_000
    image = _ok(_engine(tiny_dir).run([_job("a red cat", 7)])[0])
    assert image.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (image.width, image.height, image.seed, image.batch_size) == (64, 64, 7, 1)
    assert decode_png(image.png).shape == (64, 64, 3)
    assert image.device == "cpu" and image.prompt_tokens > 0 and image.truncated_tokens == 0
    assert set(image.timings_ms) == {"queue_wait", "inference", "encode"}


def test_same_seed_same_bytes_different_seed_different_bytes(tiny_dir: Path) -> None:
    first = _ok(_engine(tiny_dir).run([_job("a red cat", 7)])[0])
    again = _ok(_engine(tiny_dir).run([_job("a red cat", 7)])[0])  # a fresh load from disk
    other = _ok(_engine(tiny_dir).run([_job("a red cat", 8)])[0])
    assert first.png == again.png
    assert first.png != other.png


def test_batched_equals_unbatched(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    jobs = [_job(f"a {c} cat", seed) for c, seed in (("red", 1), ("blue", 2), ("green", 3))]
    batched = [_ok(r) for r in engine.run(jobs)]
    alone = [_ok(engine.run([j])[0]) for j in jobs]
    assert engine.calls == [3, 1, 1, 1]
    for b, a in zip(batched, alone, strict=True):
        assert b.batch_size == 3
        assert np.abs(b.array - a.array).max() < 1e-4
    assert np.abs(batched[0].array - batched[1].array).max() > 1e-3  # items differ


def test_truncation_and_ignored_negative_prompt_are_reported(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    long = _ok(engine.run([_job("a red cat " + "sky " * 100, 1)])[0])
    assert long.prompt_tokens > 77 and long.truncated_tokens == long.prompt_tokens - 77
    ignored = _ok(engine.run([_job("a cat", 1, negative_prompt="blurry")])[0])
    assert ignored.negative_prompt_ignored
    used = _ok(engine.run([_job("a cat", 1, negative_prompt="blurry", true_cfg_scale=2.0)])[0])
    assert not used.negative_prompt_ignored
    assert used.png != ignored.png


# --- the effect node end to end ---------------------------------------------------------------


def _node(tiny_dir: Path, tmp_path: Path, **policy: object) -> InferenceEffectNode:
    base = builtin_contract("inference").io_policy
    io_policy = IoPolicy.model_validate({**base.model_dump(), **policy})
    registry = ModelRegistry({"tiny": tiny_dir}, device="cpu")
    return InferenceEffectNode(
        registry=registry, artifacts=ArtifactStore(tmp_path / "artifacts"),
        stamping=StampingNode(tmp_path, max_bytes=10_000_000), io_policy=io_policy,
    )


def _workflow() -> Workflow:
    return Workflow(uuid.uuid4(), "generation", "generating", context={"namespace": "test"})


def _request(prompt: str = "a red cat", **kw: object) -> GenerationRequested:
    fields: dict[str, object] = {"prompt": prompt, "width": 64, "height": 64,
                                 "num_inference_steps": 2, "model": "tiny"}
    fields.update(kw)
    return GenerationRequested.model_validate(fields)


async def test_effect_batches_concurrent_requests(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path, batching=BatchingPolicy(max_batch_size=8,
                                                             max_batch_wait_ms=200))
    try:
        workflows = [_workflow() for _ in range(4)]
        outcomes = await asyncio.gather(*(
            node.generate(_request(f"a cat {i}"), seed=i, workflow=w)
            for i, w in enumerate(workflows)))
    finally:
        await node.aclose()
    results: list[GenerationCompleted] = []
    for outcome, workflow in zip(outcomes, workflows, strict=True):
        assert isinstance(outcome, GenerationSucceeded), outcome
        results.append(outcome.result)
        assert outcome.result.workflow_id == workflow.workflow_id
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    assert node.engine.calls == [4]
    assert [r.seed for r in results] == [0, 1, 2, 3]
    for r in results:
        _check_artifact(r)
    assert len({r.hash for r in results}) == 4


def _check_artifact(r: GenerationCompleted) -> None:
    path = Path(r.artifact_uri.removeprefix("file://"))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert path.name == f"{r.hash}.png" and r.size == len(data)
    assert path.parent.name == r.hash[2:4] and path.parent.parent.name == r.hash[:2]
    assert (r.width, r.height, r.num_inference_steps, r.model) == (64, 64, 2, "tiny")
    assert {"queue_wait", "inference", "encode", "store", "stamp"} <= set(r.timings_ms)


async def test_effect_timeout(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path, timeout_ms=1)
    try:
        outcome = await node.generate(_request(), seed=1, workflow=_workflow())
    finally:
        await node.aclose()
    assert isinstance(outcome, EffectFailed)
    assert outcome.error_code == "timeout"
    assert "took longer than 0.001s" in outcome.reason


async def test_effect_missing_model_and_bad_size(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path)
    try:
        t0 = time.monotonic()
        missing = await node.generate(_request(model="nope"), seed=1, workflow=_workflow())
        node.max_pixels = 32 * 32
        too_big = await node.generate(_request(), seed=1, workflow=_workflow())
        assert time.monotonic() - t0 < 1.0  # refused before any model work
    finally:
        await node.aclose()
    assert isinstance(missing, EffectFailed) and missing.error_code == "model_not_found"
    assert "model 'nope'" in missing.reason and "\n" not in missing.reason
    assert isinstance(too_big, EffectFailed) and too_big.error_code == "invalid_request"
    assert "size 64x64" in too_big.reason


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_determinism_and_vram_budget(tiny_dir: Path) -> None:
    budget_mb = builtin_contract("inference").io_policy.vram_budget_mb
    assert budget_mb is not None
    torch.cuda.reset_peak_memory_stats()
    engine = InferenceEngine(ModelRegistry({"tiny": tiny_dir}, device="cuda"), keep_arrays=True)
    jobs = [_job("a red cat", seed) for seed in (1, 2, 3, 4)]
    first = [_ok(r) for r in engine.run(jobs)]
    again = [_ok(r) for r in engine.run(jobs)]
    assert [r.png for r in first] == [r.png for r in again]
    assert all(r.device == "cuda" for r in first)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    assert peak_mb < budget_mb
