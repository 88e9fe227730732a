"""Pure parts of the inference package: grouping, artifact paths, registry errors, OOM split."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest

from stampflow.contracts.events import GenerationRequested, WorkflowFailed, envelope_for
from stampflow.contracts.nodes import builtin_contract, load_contracts
from stampflow.inference.artifacts import ArtifactStore, artifact_path
from stampflow.inference.budget import (
    ModelShape,
    batch_capacity,
    estimate_footprint,
    parameter_count,
    read_model_shape,
)
from stampflow.inference.engine import InferenceEngine, negative_prompt_acts
from stampflow.inference.errors import InvalidRequest, ModelNotFound, UnsupportedConfiguration
from stampflow.inference.jobs import (
    GeneratedImage,
    GenerationJob,
    ItemFailed,
    ItemResult,
    batch_key,
    group_jobs,
    split_in_halves,
    validate_size,
)
from stampflow.inference.registry import (
    LoadedPipeline,
    ModelRegistry,
    ModelSpec,
    resolve_device,
    resolve_dtype,
)
from stampflow.inference.tiny import clip_vocab, t5_vocab
from stampflow.nodes.orchestrator.core import (
    DispatchInference,
    Emit,
    GenerationBudget,
    Limits,
    OrchestratorCore,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


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


# --- registered model names only (issue 11, part 1) --------------------------------------------


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return path


def test_a_request_names_a_registered_model_never_a_folder_or_repo_id(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "tiny")
    registry = ModelRegistry({"tiny": folder})
    assert registry.resolve("tiny").path == folder
    for name in (str(folder), "someone/some-model", "black-forest-labs/FLUX.1-schnell",
                 "../etc", "x\ny"):
        with pytest.raises(ModelNotFound) as info:
            registry.resolve(name)
        assert info.value.code == "unknown_model"
        message = str(info.value)
        assert "not registered" in message and "never a folder or repo id" in message
        assert "\n" not in message
        assert "flux-schnell" in message and "tiny" in message  # what may be asked for


def test_two_names_for_one_folder_resolve_to_one_key(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "tiny")
    (tmp_path / "link").symlink_to(folder)
    registry = ModelRegistry({"a": folder, "b": tmp_path / "link", "c": f"{folder}/../tiny"})
    keys = {registry.resolve(name).key for name in ("a", "b", "c")}
    assert len(keys) == 1


# --- the generation budget at admission (issue 11, part 2) -------------------------------------


def test_the_inference_contract_sets_the_generation_budget() -> None:
    policy = builtin_contract("inference").io_policy
    assert policy.max_pixel_steps == 1024 * 1024 * 8
    assert (policy.max_side, policy.max_steps, policy.max_loaded_pipelines) == (2048, 50, 1)
    assert policy.vram_budget_mb == 40000


def _admit(payload: GenerationRequested, limits: Limits) -> tuple[str, list[object]]:
    core = OrchestratorCore(builtin_contract("orchestrator"), limits)
    rid = uuid4()
    envelope = envelope_for(payload, namespace="a", event_id=rid, correlation_id=rid,
                            causation_id=None, source="test", occurred_at=T0)
    workflow, commands = core.start(envelope, T0)
    return workflow.state, list(commands)


@pytest.mark.parametrize(
    ("size", "steps", "words"),
    [((2048, 2048), 4, ["2048x2048 at 4 steps", "16777216 pixel-steps", "8388608"]),
     ((1024, 1024), 9, ["1024x1024 at 9 steps", "9437184 pixel-steps", "8388608"]),
     ((4096, 1024), 1, ["4096x1024", "side of 4096", "2048"]),
     ((256, 256), 60, ["60 steps", "50"])],
)
def test_a_request_over_budget_fails_at_admission(
    size: tuple[int, int], steps: int, words: list[str]
) -> None:
    limits = Limits.from_contracts(load_contracts(), max_content_bytes=1 << 20)
    payload = GenerationRequested(prompt="p", width=size[0], height=size[1],
                                  num_inference_steps=steps)
    state, commands = _admit(payload, limits)
    assert state == "failed"
    assert not any(isinstance(c, DispatchInference) for c in commands)
    failed = [c.envelope.payload for c in commands if isinstance(c, Emit)][-1]
    assert isinstance(failed, WorkflowFailed) and failed.error_code == "over_budget"
    assert "\n" not in failed.reason
    for word in words:
        assert word in failed.reason, failed.reason


def test_a_request_within_budget_is_admitted() -> None:
    limits = Limits.from_contracts(load_contracts(), max_content_bytes=1 << 20)
    for width, height, steps in ((1024, 1024, 8), (512, 512, 4), (2048, 512, 8), (64, 64, 50)):
        payload = GenerationRequested(prompt="p", width=width, height=height,
                                      num_inference_steps=steps)
        state, commands = _admit(payload, limits)
        assert state == "generating" and isinstance(commands[-1], DispatchInference)
    # without a budget (the default), nothing is refused
    big = GenerationRequested(prompt="p", width=2048, height=2048, num_inference_steps=100)
    assert _admit(big, Limits(max_content_bytes=1))[0] == "generating"


def test_budget_refusal_is_pure_and_names_the_numbers() -> None:
    budget = GenerationBudget(max_pixel_steps=100 * 64 * 64)
    fits = GenerationRequested(prompt="p", width=64, height=64, num_inference_steps=100)
    over = GenerationRequested(prompt="p", width=80, height=64, num_inference_steps=100)
    assert budget.refusal(fits) is None
    assert budget.refusal(over) == (
        "80x64 at 100 steps is 512000 pixel-steps, over this node's budget of 409600")


# --- the VRAM budget (issue 11, part 3): the estimate, with the tiny model's numbers -----------

# What read_model_shape finds in make_tiny_flux's folder (unique parameters per component).
TINY = ModelShape(
    parameters={"transformer": 72384, "text_encoder": 48106, "text_encoder_2": 47488,
                "vae": 86331},
    transformer_width=32, decoder_channels=16, pixels_per_token=256,
)


def test_weights_estimate_follows_the_dtype_and_quantisation() -> None:
    total = 72384 + 48106 + 47488 + 86331
    assert estimate_footprint(TINY, "float32").weights_bytes == total * 4
    assert estimate_footprint(TINY, "bfloat16").weights_bytes == total * 2
    nf4 = estimate_footprint(TINY, "bfloat16", quantized=("transformer", "text_encoder_2"))
    assert nf4.weights_bytes < estimate_footprint(TINY, "bfloat16").weights_bytes
    # FLUX.1-schnell's components at bf16: about 31.4 GiB, under the contract's 40000 MiB
    schnell = ModelShape(
        parameters={"transformer": 11_901_408_320, "text_encoder": 123_060_480,
                    "text_encoder_2": 4_762_310_656, "vae": 83_819_683},
        transformer_width=3072, decoder_channels=256, pixels_per_token=256,
    )
    footprint = estimate_footprint(schnell, "bfloat16")
    assert 31 * 2**30 < footprint.weights_bytes < 32 * 2**30
    budget = 40000 * 2**20
    assert batch_capacity(budget, footprint.weights_bytes,
                          footprint.image_bytes(1024, 1024)) == 2
    assert batch_capacity(budget, footprint.weights_bytes,
                          footprint.image_bytes(512, 512)) >= 8


def test_activation_estimate_grows_with_pixels() -> None:
    footprint = estimate_footprint(TINY, "float32")
    small, large = footprint.image_bytes(64, 64), footprint.image_bytes(256, 256)
    assert 0 < small < large
    assert large - small == pytest.approx(footprint.bytes_per_pixel * (256 * 256 - 64 * 64),
                                          abs=2)
    assert estimate_footprint(TINY, "bfloat16").image_bytes(64, 64) < small


def test_batch_capacity_with_a_tiny_budget() -> None:
    footprint = estimate_footprint(TINY, "float32")
    weights, image = footprint.weights_bytes, footprint.image_bytes(64, 64)
    assert batch_capacity(weights + 3 * image, weights, image) == 3
    assert batch_capacity(weights + 3 * image - 1, weights, image) == 2
    assert batch_capacity(weights + image - 1, weights, image) == 0  # can never fit
    assert batch_capacity(weights - 1, weights, image) == 0
    assert batch_capacity(None, weights, image) is None  # no budget: no cap


def test_safetensors_header_counts_parameters() -> None:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "BF16", "shape": [5], "data_offsets": [48, 58]},
              "c": {"dtype": "F32", "shape": [], "data_offsets": [58, 62]}}
    assert parameter_count(header) == 12 + 5 + 1


def test_read_model_shape_from_a_hand_made_folder(tmp_path: Path) -> None:
    import struct

    folder = _model_folder(tmp_path / "m")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "X"]}))
    for component, shapes in (("transformer", [[10, 10], [10]]), ("vae", [[7]])):
        (folder / component).mkdir()
        tensors = {f"w{i}": {"dtype": "F32", "shape": s, "data_offsets": [0, 0]}
                   for i, s in enumerate(shapes)}
        raw = json.dumps(tensors).encode()
        (folder / component / "weights.safetensors").write_bytes(
            struct.pack("<Q", len(raw)) + raw)
        # a variant copy of the same weights is not counted twice
        (folder / component / "weights.fp16.safetensors").write_bytes(
            struct.pack("<Q", len(raw)) + raw)
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 3, "attention_head_dim": 8}))
    (folder / "vae" / "config.json").write_text(json.dumps(
        {"block_out_channels": [4, 8, 8, 8]}))
    shape = read_model_shape(folder, "FluxPipeline")
    assert shape.parameters == {"transformer": 110, "vae": 7}
    assert (shape.transformer_width, shape.decoder_channels, shape.pixels_per_token) == (
        24, 8, 256)
    (folder / "vae" / "weights.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ModelNotFound, match="weights.safetensors: not a safetensors file"):
        read_model_shape(folder, "FluxPipeline")


# --- a timed-out request stops between steps (issue 11, part 4) --------------------------------


def test_expired_means_past_the_deadline_or_cancelled() -> None:
    import threading

    flag = threading.Event()
    assert not job(deadline=None).expired(10.0)
    assert not job(deadline=11.0).expired(10.0)
    assert job(deadline=10.0).expired(10.0)
    cancellable = job(deadline=None, cancel=flag)
    assert not cancellable.expired(10.0)
    flag.set()
    assert cancellable.expired(10.0)
