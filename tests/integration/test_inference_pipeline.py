"""The real tiny FLUX model, built locally and loaded through the registry: the same code path
as a real model. No services needed."""

from __future__ import annotations

import asyncio
import gc
import math
import shutil
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stampflow.contracts.events import GenerationCompleted, GenerationRequested
from stampflow.contracts.nodes import BatchingPolicy, IoPolicy, builtin_contract
from stampflow.inference.artifacts import ArtifactStore
from stampflow.inference.budget import estimate_footprint, read_model_shape
from stampflow.inference.effect import InferenceEffectNode, JobOwner
from stampflow.inference.engine import InferenceEngine, decode_png
from stampflow.inference.jobs import GeneratedImage, GenerationJob, ItemFailed
from stampflow.inference.registry import ModelRegistry
from stampflow.nodes.orchestrator.core import EffectFailed, GenerationSucceeded
from stampflow.nodes.stamping import StampingNode
from tests.unit.test_inference import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_dir(tiny_flux_model: Path) -> Path:
    return tiny_flux_model


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


def _workflow() -> JobOwner:
    return JobOwner(uuid.uuid4(), "test")


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
            node.generate(_request(f"a cat {i}"), seed=i, owner=w)
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
        outcome = await node.generate(_request(), seed=1, owner=_workflow())
    finally:
        await node.aclose()
    assert isinstance(outcome, EffectFailed)
    assert outcome.error_code == "timeout"
    assert "took longer than 0.001s" in outcome.reason


async def test_effect_missing_model_and_bad_size(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path)
    try:
        t0 = time.monotonic()
        missing = await node.generate(_request(model="nope"), seed=1, owner=_workflow())
        node.max_pixels = 32 * 32
        too_big = await node.generate(_request(), seed=1, owner=_workflow())
        assert time.monotonic() - t0 < 1.0  # refused before any model work
    finally:
        await node.aclose()
    assert isinstance(missing, EffectFailed) and missing.error_code == "unknown_model"
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


# --- issue 11: generation cost is bounded ------------------------------------------------------


def _loaded_count(module: torch.nn.Module) -> int:
    """Parameters, each shared tensor once (T5 ties its two embeddings)."""
    return sum({p.data_ptr(): p.numel() for p in module.parameters()}.values())


def test_two_names_for_one_model_load_once(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tiny_dir)
    registry = ModelRegistry({"tiny": tiny_dir, "alias": tmp_path / "link"}, device="cpu")
    first = registry.load("tiny")
    assert registry.load("alias").pipeline is first.pipeline
    assert registry.load("tiny").pipeline is first.pipeline
    assert len(registry.loads) == 1


def test_the_pipeline_cache_is_keyed_by_repo_snapshot(tiny_dir: Path, tmp_path: Path) -> None:
    """A hub repo id and a folder naming the same cached snapshot are one model."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-flux"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    registry = ModelRegistry({"hub": "someone/tiny-flux", "folder": snapshot}, device="cpu",
                             cache_dir=cache)
    assert registry.resolve("hub").key == registry.resolve("folder").key
    assert registry.load("hub").pipeline is registry.load("folder").pipeline
    assert len(registry.loads) == 1


def test_the_pipeline_cache_is_a_bounded_lru(tiny_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    registry = ModelRegistry({"a": tiny_dir, "b": copy}, device="cpu")  # holds 1 by default
    first = weakref.ref(registry.load("a").pipeline)
    registry.load("b")
    gc.collect()
    assert first() is None  # evicted and released
    assert registry.loaded() == [str(copy.resolve())]
    registry.load("a")
    assert len(registry.loads) == 3
    two = ModelRegistry({"a": tiny_dir, "b": copy}, device="cpu", max_loaded=2)
    kept = weakref.ref(two.load("a").pipeline)
    two.load("b")
    two.load("a")  # a is now the most recently used
    gc.collect()
    assert kept() is not None and len(two.loads) == 2


def test_the_effect_node_holds_as_many_pipelines_as_its_contract_says(
    tiny_dir: Path, tmp_path: Path
) -> None:
    node = _node(tiny_dir, tmp_path, max_loaded_pipelines=3)
    assert node.registry.max_loaded == 3
    assert _node(tiny_dir, tmp_path).registry.max_loaded == 1


def test_the_shape_read_from_files_matches_the_loaded_model(tiny_dir: Path) -> None:
    shape = read_model_shape(tiny_dir, "FluxPipeline")
    pipe = ModelRegistry({"tiny": tiny_dir}, device="cpu").load("tiny").pipeline
    assert shape.parameters == {name: _loaded_count(getattr(pipe, name))
                                for name in ("text_encoder", "text_encoder_2", "transformer",
                                             "vae")}
    assert shape == TINY  # the numbers the unit tests use
    assert shape.transformer_width == (pipe.transformer.config.num_attention_heads
                                       * pipe.transformer.config.attention_head_dim)


async def test_effect_refuses_a_folder_or_repo_id_as_model(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path)
    try:
        by_path = await node.generate(_request(model=str(tiny_dir)), seed=1, owner=_workflow())
        by_repo = await node.generate(_request(model="someone/model"), seed=1,
                                      owner=_workflow())
    finally:
        await node.aclose()
    for outcome in (by_path, by_repo):
        assert isinstance(outcome, EffectFailed), outcome
        assert outcome.error_code == "unknown_model"
        assert "not registered" in outcome.reason and "never a folder" in outcome.reason
    assert node.registry.loads == []


async def test_effect_refuses_a_request_over_the_pixel_step_budget(
    tiny_dir: Path, tmp_path: Path
) -> None:
    node = _node(tiny_dir, tmp_path, max_pixel_steps=64 * 64 * 2)
    try:
        outcome = await node.generate(_request(num_inference_steps=3), seed=1,
                                      owner=_workflow())
    finally:
        await node.aclose()
    assert isinstance(outcome, EffectFailed) and outcome.error_code == "over_budget"
    assert "64x64 at 3 steps is 12288 pixel-steps" in outcome.reason


async def test_a_request_that_can_never_fit_the_vram_budget_fails(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # 1 MiB holds the tiny model's weights (1017236 bytes in float32) but no 256x256 image
    node = _node(tiny_dir, tmp_path, vram_budget_mb=1)
    try:
        outcome = await node.generate(_request(width=256, height=256), seed=1,
                                      owner=_workflow())
    finally:
        await node.aclose()
    assert isinstance(outcome, EffectFailed), outcome
    assert outcome.error_code == "over_vram_budget"
    assert "256x256" in outcome.reason and "1 MiB" in outcome.reason
    assert "\n" not in outcome.reason


def test_weights_over_the_vram_budget_are_never_loaded(tiny_dir: Path) -> None:
    registry = ModelRegistry({"tiny": tiny_dir}, device="cpu", vram_budget_bytes=500_000)
    result = InferenceEngine(registry).run([_job("a cat", 1)])[0]
    assert isinstance(result, ItemFailed) and result.code == "over_vram_budget"
    assert "1017236 bytes of weights" in result.reason and "500000" in result.reason
    assert registry.loads == []


async def test_the_vram_budget_splits_a_batch(tiny_dir: Path, tmp_path: Path) -> None:
    footprint = estimate_footprint(TINY, "float32")
    need = footprint.weights_bytes + 2.5 * footprint.image_bytes(256, 256)
    node = _node(tiny_dir, tmp_path, vram_budget_mb=math.ceil(need / 2**20),
                 batching=BatchingPolicy(max_batch_size=8, max_batch_wait_ms=200))
    try:
        outcomes = await asyncio.gather(*(
            node.generate(_request(f"a cat {i}", width=256, height=256), seed=i,
                          owner=_workflow()) for i in range(3)))
    finally:
        await node.aclose()
    assert all(isinstance(o, GenerationSucceeded) for o in outcomes), outcomes
    assert node.engine.calls == [2, 1]


def test_a_deadline_stops_the_pipeline_between_steps(tiny_dir: Path) -> None:
    clock = _StepClock()  # one second per reading
    engine = InferenceEngine(ModelRegistry({"tiny": tiny_dir}, device="cpu"), clock=clock)
    steps = _count_steps(engine.registry.load("tiny").pipeline)
    result = engine.run([_job("a cat", 1, num_inference_steps=50, deadline=6.0)])[0]
    assert isinstance(result, ItemFailed) and result.code == "timeout"
    assert "stopped after" in result.reason and "of 50 steps" in result.reason
    assert 0 < len(steps) < 50
    assert engine.steps_run == [len(steps)]


def test_a_batch_stops_only_when_every_item_is_past_its_deadline(tiny_dir: Path) -> None:
    clock = _StepClock()
    engine = InferenceEngine(ModelRegistry({"tiny": tiny_dir}, device="cpu"), clock=clock)
    steps = _count_steps(engine.registry.load("tiny").pipeline)
    early = _job("a cat", 1, num_inference_steps=20, deadline=6.0)
    late = _job("a dog", 2, num_inference_steps=20, deadline=1000.0)
    results = engine.run([early, late])
    assert len(steps) == 20  # the late item kept the call going to its end
    assert all(isinstance(r, GeneratedImage) for r in results)
    both_early = [_job("a cat", 1, num_inference_steps=20, deadline=clock.now + 6.0),
                  _job("a dog", 2, num_inference_steps=20, deadline=clock.now + 7.0)]
    steps.clear()
    stopped = engine.run(both_early)
    assert [r.code for r in stopped if isinstance(r, ItemFailed)] == ["timeout", "timeout"]
    assert 0 < len(steps) < 20


async def test_a_timed_out_request_frees_the_worker(tiny_dir: Path, tmp_path: Path) -> None:
    node = _node(tiny_dir, tmp_path, timeout_ms=500, max_steps=None, max_pixel_steps=None)
    steps = _count_steps(node.registry.load("tiny").pipeline)  # loaded before the clock runs
    try:
        slow = await node.generate(_request(width=512, height=512, num_inference_steps=100),
                                   seed=1, owner=_workflow())
        assert isinstance(slow, EffectFailed) and slow.error_code == "timeout"
        t0 = time.monotonic()
        quick = await node.generate(_request(), seed=2, owner=_workflow())
        quick_s = time.monotonic() - t0
    finally:
        await node.aclose()
    assert isinstance(quick, GenerationSucceeded), quick
    assert len(steps) - 2 < 100  # the slow call stopped early (the quick one made 2)
    assert quick_s < 5.0


class _StepClock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _count_steps(pipe: object) -> list[int]:
    """Count denoising steps: one transformer forward per step (no true CFG here)."""
    calls: list[int] = []
    pipe.transformer.register_forward_hook(  # type: ignore[attr-defined]
        lambda *_: calls.append(1))
    return calls


async def test_a_request_that_finds_the_worker_idle_does_not_wait_for_a_batch(
    tiny_dir: Path, tmp_path: Path,
) -> None:
    """With the shipped contract, a lone request starts at once: requests that arrive while
    the engine is busy form the next batch by themselves, so a window would only add latency
    (it added 50-60 ms to every lone request)."""
    node = _node(tiny_dir, tmp_path)  # the built-in contract's batching, unchanged
    try:
        await node.generate(_request("warm up"), seed=0, owner=_workflow())  # loads the model
        waits = []
        for i in range(5):
            outcome = await node.generate(_request(f"alone {i}"), seed=i, owner=_workflow())
            assert isinstance(outcome, GenerationSucceeded), outcome
            waits.append(outcome.result.timings_ms["queue_wait"])
    finally:
        await node.aclose()
    assert sorted(waits)[2] < 20.0, waits  # the median, in ms

    # while the engine is busy, what arrives meanwhile still goes out as one batch
    node = _node(tiny_dir, tmp_path)
    try:
        await node.generate(_request("warm up"), seed=0, owner=_workflow())
        outcomes = await asyncio.gather(*(
            node.generate(_request(f"burst {i}"), seed=i, owner=_workflow())
            for i in range(5)))
    finally:
        await node.aclose()
    sizes = sorted(o.result.batch_size for o in outcomes if isinstance(o, GenerationSucceeded))
    assert len(sizes) == 5 and sizes[-1] >= 4, sizes
