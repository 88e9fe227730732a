"""The torch runner that executes one group of jobs in one pipeline call (the pure batching
core, jobs and results are in :mod:`stampflow.inference.jobs`).

Compatible jobs (same model, size, steps, guidance, true CFG, negative-prompt-or-not) share a
pipeline call; each item keeps its own ``torch.Generator(device).manual_seed(seed)``, so a
batched item equals the same item run alone (to float rounding). With a VRAM budget, a group
is cut into calls of as many images as the estimate lets fit beside the weights; a size of
which not even one image fits fails with ``over_vram_budget``. A CUDA out-of-memory error
still splits the batch in halves and retries; only an item that cannot fit alone fails.

Deadlines are checked between denoising steps (``callback_on_step_end``): a call stops as soon
as *every* item in it is past its deadline or cancelled, and those items fail with
``timeout``. An item that expires while others in its call are still live rides along to the
end of the call (its caller has already given up on it); stopping it alone would mean
re-running the others from the first step.

:meth:`InferenceEngine.run` blocks: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import inspect
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stampflow.inference.budget import batch_capacity, estimate_footprint, mib
from stampflow.inference.errors import InferenceError, InvalidRequest, TransientInferenceError
from stampflow.inference.jobs import (
    GeneratedImage,
    GenerationJob,
    ItemFailed,
    ItemResult,
    batch_key,
    split_in_halves,
    validate_size,
)
from stampflow.inference.registry import LoadedPipeline, ModelRegistry

CLIP_TOKENS = 77  # text tokens of pipelines without max_sequence_length


class _Stopped(Exception):
    """Raised from the step callback to leave a pipeline call whose items all expired."""


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int  # the longest tokenisation over the pipeline's tokenizers, specials included
    truncated: int  # tokens beyond the limit of the tokenizer that cuts most


# --- torch runner -----------------------------------------------------------------------------


class InferenceEngine:
    """Runs groups of compatible jobs on pipelines from ``registry``.

    ``max_sequence_length`` is passed to pipelines that take it (FLUX's T5 prompt length).
    ``keep_arrays`` keeps each decoded float image on the result (tests compare them).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_sequence_length: int = 512,
        keep_arrays: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.max_sequence_length = max_sequence_length
        self.keep_arrays = keep_arrays
        self.clock = clock
        self.calls: list[int] = []  # the batch size of every pipeline call made, in order
        self.steps_run: list[int] = []  # the denoising steps each of those calls ran

    def run(self, jobs: Sequence[GenerationJob]) -> list[ItemResult]:
        """Run one compatible group (see :func:`group_jobs`); one result per job, in order."""
        if not jobs:
            return []
        keys = {batch_key(job) for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs of {len(keys)} different batch keys cannot share a call")
        started = self.clock()
        results: dict[int, ItemResult] = {}
        live = _drop_expired(jobs, started, results)
        if live:
            try:
                loaded = self.registry.load(live[0].model)
            except InferenceError as err:
                for job in live:
                    results[id(job)] = ItemFailed(job, err.code, str(err), err.transient)
            else:
                for result in self._run_within_budget(loaded, live, started):
                    results[id(result.job)] = result
        return [results[id(job)] for job in jobs]

    def image_bytes(self, loaded: LoadedPipeline, width: int, height: int) -> int | None:
        """Estimated activation memory of one image on ``loaded``; None when unknown."""
        if loaded.shape is None:
            return None
        params = _call_parameters(loaded.pipeline)
        tokens = self.max_sequence_length if "max_sequence_length" in params else CLIP_TOKENS
        footprint = estimate_footprint(loaded.shape, loaded.dtype, text_tokens=tokens)
        return footprint.image_bytes(width, height)

    def _run_within_budget(
        self, loaded: LoadedPipeline, jobs: list[GenerationJob], started: float
    ) -> list[ItemResult]:
        """Cut ``jobs`` into calls that fit the VRAM budget; refuse a size that never fits."""
        first = jobs[0]
        budget = self.registry.vram_budget_bytes
        image = self.image_bytes(loaded, first.width, first.height)
        resident = self.registry.resident_bytes()
        capacity = batch_capacity(budget, resident, image) if image is not None else None
        if capacity == 0:
            reason = (f"{first.width}x{first.height}: one image needs about {mib(image or 0)} "
                      f"of activations beside {mib(resident)} of weights, over the VRAM "
                      f"budget of {mib(budget or 0)}")
            return [ItemFailed(job, "over_vram_budget", reason) for job in jobs]
        size = capacity or len(jobs)
        results: dict[int, ItemResult] = {}
        for i in range(0, len(jobs), size):
            chunk = jobs[i:i + size]
            if i:  # a later call: what expired while the earlier ones ran is not started
                chunk = _drop_expired(chunk, self.clock(), results)
            for result in self._run_splitting(loaded, chunk, started) if chunk else []:
                results[id(result.job)] = result
        return [results[id(job)] for job in jobs]

    def _run_splitting(
        self, loaded: LoadedPipeline, jobs: list[GenerationJob], started: float
    ) -> list[ItemResult]:
        import torch

        try:
            return list(self._run_batch(loaded, jobs, started))
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                job = jobs[0]
                return [ItemFailed(job, "out_of_memory",
                                   f"{job.width}x{job.height} at {job.num_inference_steps} "
                                   f"steps does not fit in {loaded.device} memory alone")]
            first, second = split_in_halves(jobs)
            return (self._run_splitting(loaded, first, started)
                    + self._run_splitting(loaded, second, started))
        except InferenceError as err:
            return [ItemFailed(job, err.code, str(err), err.transient) for job in jobs]

    def _run_batch(
        self, loaded: LoadedPipeline, jobs: list[GenerationJob], started: float
    ) -> list[ItemResult]:
        import numpy as np
        import torch

        pipe = loaded.pipeline
        first = jobs[0]
        params = _call_parameters(pipe)
        validate_size(first.width, first.height, _size_multiple(pipe), None)
        acts = negative_prompt_acts(first, "true_cfg_scale" in params)
        counts = [count_tokens(pipe, job.prompt, self._sequence_limit(params)) for job in jobs]
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": [torch.Generator(loaded.device).manual_seed(job.seed) for job in jobs],
            "output_type": "np",
        }
        if "true_cfg_scale" in params:
            kwargs["true_cfg_scale"] = first.true_cfg_scale
        if "max_sequence_length" in params:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if acts:
            kwargs["negative_prompt"] = [job.negative_prompt or "" for job in jobs]
        steps = [0]  # steps finished, counted by the callback
        watched = "callback_on_step_end" in params
        if watched:
            def on_step_end(_pipe: Any, step: int, _t: Any, _tensors: Any) -> dict[str, Any]:
                steps[0] = step + 1
                now = self.clock()
                if all(job.expired(now) for job in jobs):
                    raise _Stopped
                return {}

            kwargs["callback_on_step_end"] = on_step_end
        t0 = self.clock()
        try:
            with torch.inference_mode():
                output = pipe(**kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except _Stopped:
            self.calls.append(len(jobs))
            self.steps_run.append(steps[0])
            reason = (f"deadline passed: the pipeline call was stopped after {steps[0]} of "
                      f"{first.num_inference_steps} steps")
            return [ItemFailed(job, "timeout", reason) for job in jobs]
        except (ValueError, TypeError) as err:
            raise InvalidRequest(
                f"model {first.model!r}: pipeline refused the request: {_one_line(err)}"
            ) from err
        except RuntimeError as err:
            raise TransientInferenceError(
                f"model {first.model!r}: pipeline call failed: {_one_line(err)}"
            ) from err
        inference_ms = (self.clock() - t0) * 1000.0
        self.calls.append(len(jobs))
        self.steps_run.append(steps[0] if watched else first.num_inference_steps)
        images = np.asarray(output.images, dtype=np.float32)
        results: list[ItemResult] = []
        for job, count, image in zip(jobs, counts, images, strict=True):
            e0 = self.clock()
            png = encode_png(image)
            encode_ms = (self.clock() - e0) * 1000.0
            results.append(GeneratedImage(
                job=job, png=png, width=int(image.shape[1]), height=int(image.shape[0]),
                seed=job.seed, prompt_tokens=count.tokens, truncated_tokens=count.truncated,
                negative_prompt_ignored=job.negative_prompt is not None and not acts,
                timings_ms={"queue_wait": max(0.0, (started - job.enqueued_at) * 1000.0),
                            "inference": inference_ms, "encode": encode_ms},
                batch_size=len(jobs), device=loaded.device,
                array=image if self.keep_arrays else None,
            ))
        return results

    def _sequence_limit(self, params: frozenset[str]) -> int | None:
        return self.max_sequence_length if "max_sequence_length" in params else None


def _drop_expired(
    jobs: Sequence[GenerationJob], now: float, results: dict[int, ItemResult]
) -> list[GenerationJob]:
    """The jobs still live at ``now``; each expired one gets its timeout in ``results``."""
    live: list[GenerationJob] = []
    for job in jobs:
        if job.expired(now):
            results[id(job)] = ItemFailed(job, "timeout",
                                          "deadline passed before inference started")
        else:
            live.append(job)
    return live


def negative_prompt_acts(job: GenerationJob, has_true_cfg: bool) -> bool:
    """Does the negative prompt change anything? FLUX: only with true_cfg_scale > 1; pipelines
    with classic CFG (Stable Diffusion): only with guidance_scale > 1."""
    if job.negative_prompt is None:
        return False
    return job.true_cfg_scale > 1.0 if has_true_cfg else job.guidance_scale > 1.0


def count_tokens(pipe: Any, prompt: str, second_limit: int | None) -> TokenCount:
    """Tokens in ``prompt`` per tokenizer of ``pipe`` (no truncation) and how many are cut.

    ``tokenizer`` is cut at its ``model_max_length`` (77 for CLIP); ``tokenizer_2`` at
    ``second_limit`` when given (FLUX's max_sequence_length), else at its own maximum.
    """
    tokens = truncated = 0
    for attr in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, attr, None)
        if tokenizer is None:
            continue
        limit = second_limit if attr == "tokenizer_2" and second_limit else (
            tokenizer.model_max_length)
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        tokens = max(tokens, n)
        truncated = max(truncated, n - int(limit))
    return TokenCount(tokens, max(0, truncated))


def encode_png(image: Any) -> bytes:
    """A float HxWx3 image in [0, 1] as PNG bytes (deterministic for equal input)."""
    import numpy as np
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Any:
    """PNG bytes → float32 HxWx3 array in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _call_parameters(pipe: Any) -> frozenset[str]:
    return frozenset(inspect.signature(pipe.__call__).parameters)


def _size_multiple(pipe: Any) -> int:
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    # FLUX packs 2x2 latent patches: sizes must be multiples of 2x the VAE factor.
    return factor * 2 if type(pipe).__name__.startswith("Flux") else factor


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__
