"""Pure parts of the inference package: grouping, artifact paths, registry errors, OOM split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.artifacts import ArtifactStore, artifact_path
from inference.engine import (
    GeneratedImage,
    GenerationJob,
    InferenceEngine,
    ItemFailed,
    ItemResult,
    batch_key,
    group_jobs,
    negative_prompt_acts,
    split_in_halves,
    validate_size,
)
from inference.errors import InvalidRequest, ModelNotFound, UnsupportedConfiguration
from inference.registry import (
    LoadedPipeline,
    ModelRegistry,
    ModelSpec,
    resolve_device,
    resolve_dtype,
)
from inference.tiny import clip_vocab, t5_vocab


def job(prompt: str = "a cat", **kw: object) -> GenerationJob:
    fields: dict[str, object] = {"prompt": prompt, "seed": 1, "model": "m", "width": 64,
                                 "height": 64, "num_inference_steps": 2}
    fields.update(kw)
    return GenerationJob(**fields)  # type: ignore[arg-type]


# --- grouping ---------------------------------------------------------------------------------


def test_compatible_jobs_share_a_group_in_order() -> None:
    jobs = [job(f"p{i}", seed=i) for i in range(5)]
    assert group_jobs(jobs, 8) == [jobs]


def test_groups_are_capped_at_max_batch_size() -> None:
    jobs = [job(f"p{i}") for i in range(5)]
    assert [len(g) for g in group_jobs(jobs, 2)] == [2, 2, 1]


@pytest.mark.parametrize(
    "change",
    [{"model": "other"}, {"width": 128}, {"height": 128}, {"num_inference_steps": 3},
     {"guidance_scale": 3.5}, {"true_cfg_scale": 2.0}, {"negative_prompt": "blurry"}],
)
def test_incompatible_jobs_are_split(change: dict[str, object]) -> None:
    a, b, c = job("a"), job("b", **change), job("c")
    assert batch_key(a) != batch_key(b)
    assert group_jobs([a, b, c], 8) == [[a, c], [b]]


def test_different_negative_prompts_still_batch_together() -> None:
    a, b = job(negative_prompt="x"), job(negative_prompt="y")
    assert group_jobs([a, b], 8) == [[a, b]]


def test_group_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch_size 0"):
        group_jobs([job()], 0)


def test_split_in_halves() -> None:
    jobs = [job(str(i)) for i in range(5)]
    first, second = split_in_halves(jobs)
    assert (len(first), len(second)) == (3, 2)
    assert first + second == jobs


def test_negative_prompt_acts_only_with_cfg() -> None:
    assert not negative_prompt_acts(job(negative_prompt="x"), has_true_cfg=True)
    assert negative_prompt_acts(job(negative_prompt="x", true_cfg_scale=2.0), has_true_cfg=True)
    assert negative_prompt_acts(job(negative_prompt="x", guidance_scale=7.0), has_true_cfg=False)
    assert not negative_prompt_acts(job(true_cfg_scale=2.0), has_true_cfg=True)


def test_validate_size() -> None:
    validate_size(64, 48, 16, None)
    with pytest.raises(InvalidRequest, match="size 72x64: .* multiples of 16"):
        validate_size(72, 64, 16, None)
    with pytest.raises(InvalidRequest, match="exceeds this node's cap of 1024"):
        validate_size(64, 64, 16, 1024)


# --- artifacts --------------------------------------------------------------------------------


def test_artifact_path_is_content_addressed(tmp_path: Path) -> None:
    digest = "ab" + "cd" + "0" * 60
    assert artifact_path(tmp_path, digest) == tmp_path / "ab" / "cd" / f"{digest}.png"
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        artifact_path(tmp_path, "../etc/passwd")
    with pytest.raises(ValueError, match="suffix"):
        artifact_path(tmp_path, digest, "/x")


def test_store_put_is_idempotent_and_atomic(tmp_path: Path) -> None:
    import blake3

    store = ArtifactStore(tmp_path)
    data = b"\x89PNG fake"
    first = store.put(data)
    second = store.put(data)
    digest = blake3.blake3(data).hexdigest()
    assert first == second
    assert first.hash == digest
    assert first.path == tmp_path.resolve() / digest[:2] / digest[2:4] / f"{digest}.png"
    assert first.uri.startswith("file://") and first.uri.endswith(f"{digest}.png")
    assert store.get(digest) == data
    assert [p.name for p in first.path.parent.iterdir()] == [f"{digest}.png"]  # no temp left


def test_store_get_missing_names_the_hash(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="artifact 0{64}: not in the store"):
        ArtifactStore(tmp_path).get("0" * 64)


# --- registry ---------------------------------------------------------------------------------


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    registry = ModelRegistry({"tiny": missing})
    with pytest.raises(ModelNotFound, match=f"model 'tiny': folder {missing} does not exist"):
        registry.resolve("tiny")


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="has no model_index.json"):
        ModelRegistry({"tiny": tmp_path}).resolve("tiny")


def test_repo_not_in_cache_names_the_repo(tmp_path: Path) -> None:
    registry = ModelRegistry(cache_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="repo 'black-forest-labs/FLUX.1-schnell' is not in"):
        registry.resolve("flux-schnell")


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="model 'nope': not registered"):
        ModelRegistry().resolve("nope")


def test_unknown_pipeline_class(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    registry = ModelRegistry({"x": ModelSpec(str(tmp_path), pipeline_class="NoSuchPipeline")},
                             device="cpu")
    with pytest.raises(UnsupportedConfiguration, match="pipeline class 'NoSuchPipeline'"):
        registry.load("x")
    registry = ModelRegistry({"x": ModelSpec(str(tmp_path), pipeline_class="AutoencoderKL")},
                             device="cpu")
    with pytest.raises(UnsupportedConfiguration, match="not a diffusers pipeline class"):
        registry.load("x")


def test_nf4_needs_cuda(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    registry = ModelRegistry({"x": ModelSpec(str(tmp_path), quantization="nf4")}, device="cpu")
    with pytest.raises(UnsupportedConfiguration, match="model 'x': NF4 quantisation needs CUDA"):
        registry.load("x")


def test_device_and_dtype_policy() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(UnsupportedConfiguration, match="device 'cuda': CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"


# --- tiny tokenizer vocabularies --------------------------------------------------------------


def test_tiny_vocabularies_are_fixed_and_fit() -> None:
    vocab, merges = clip_vocab()
    assert vocab == clip_vocab()[0]
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) <= 1000 and len(set(merges)) == len(merges)
    pieces = t5_vocab()
    assert [p for p, _ in pieces[:4]] == ["<pad>", "</s>", "<unk>", "▁"]
    assert len(pieces) <= 1000


# --- OOM splitting (fault injection below the pipeline call) -----------------------------------


class _OomEngine(InferenceEngine):
    """Pretends memory holds at most ``fits`` items; a job with prompt 'huge' never fits."""

    def __init__(self, fits: int) -> None:
        super().__init__(ModelRegistry())
        self.fits = fits
        self.attempts: list[int] = []

    def _run_batch(self, loaded: LoadedPipeline, jobs: list[GenerationJob],
                   started: float) -> list[ItemResult]:
        import torch

        self.attempts.append(len(jobs))
        if len(jobs) > self.fits or any(j.prompt == "huge" for j in jobs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [GeneratedImage(j, b"", j.width, j.height, j.seed, 1, 0, False, {}, len(jobs),
                               "cuda") for j in jobs]


def _loaded() -> LoadedPipeline:
    return LoadedPipeline("m", object(), "FluxPipeline", Path("."), "cuda", "bfloat16")


def test_oom_splits_in_halves_until_it_fits() -> None:
    engine = _OomEngine(fits=2)
    jobs = [job(str(i)) for i in range(5)]
    results = engine._run_splitting(_loaded(), jobs, 0.0)
    assert [r.job for r in results] == jobs
    assert all(isinstance(r, GeneratedImage) for r in results)
    assert engine.attempts == [5, 3, 2, 1, 2]


def test_only_the_item_that_cannot_fit_alone_fails() -> None:
    engine = _OomEngine(fits=8)
    jobs = [job("a"), job("huge"), job("c"), job("d")]
    results = engine._run_splitting(_loaded(), jobs, 0.0)
    failed = [r for r in results if isinstance(r, ItemFailed)]
    assert [r.job.prompt for r in failed] == ["huge"]
    assert failed[0].code == "out_of_memory"
    assert "64x64 at 2 steps does not fit in cuda memory alone" in failed[0].reason
    assert [r.job for r in results] == jobs
