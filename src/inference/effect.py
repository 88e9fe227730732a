"""The inference effect node's work: one generation job in, an outcome out.

:class:`stampflow.inference.worker.InferenceWorker` feeds it the jobs its consumer holds (of
any namespace) and publishes the outcomes as ``inference.result`` events.

Requests are collected by an asyncio dynamic batcher (up to ``batching.max_batch_size``
compatible requests, waiting at most ``batching.max_batch_wait_ms``) and run by the
:class:`InferenceEngine` on a single worker thread. Each request has its own timeout
(``timeout_ms``): past it, the request fails with ``timeout`` and its pipeline call stops at
the next step unless other requests in the same call are still live. Transient failures are
retried with backoff behind a circuit breaker. A generated PNG is stored content-addressed and
stamped; the outcome carries its URI.

The contract bounds the cost: a request over ``max_pixel_steps``/``max_side``/``max_steps``
fails with ``over_budget`` (the orchestrator refuses it at admission too), a model name that
is not registered with ``unknown_model``, and ``vram_budget_mb`` and ``max_loaded_pipelines``
configure the registry (``over_vram_budget`` for what can never fit).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from stampflow.contracts.events import GenerationCompleted, GenerationRequested, utc_now
from stampflow.contracts.nodes import IoPolicy
from stampflow.inference.artifacts import ArtifactStore
from stampflow.inference.engine import InferenceEngine
from stampflow.inference.errors import InferenceError, TransientInferenceError
from stampflow.inference.jobs import (
    GeneratedImage,
    GenerationJob,
    ItemResult,
    batch_key,
    group_jobs,
    validate_size,
)
from stampflow.inference.registry import ModelRegistry
from stampflow.nodes.objectstore import ObjectStoreError
from stampflow.nodes.orchestrator.core import (
    EffectFailed,
    GenerationBudget,
    GenerationSucceeded,
    Outcome,
)
from stampflow.nodes.resilience import CircuitBreaker, CircuitOpen, retry
from stampflow.nodes.stamping import StampError, StampingNode

SIZE_MULTIPLE = 16


@dataclass(frozen=True, slots=True)
class JobOwner:
    """Whose generation this is: the workflow and its namespace."""

    workflow_id: UUID
    namespace: str

_Pending = tuple[GenerationJob, "asyncio.Future[ItemResult]"]


class InferenceEffectNode:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        artifacts: ArtifactStore,
        stamping: StampingNode,
        io_policy: IoPolicy,
        engine: InferenceEngine | None = None,
        max_pixels: int | None = None,
        default_namespace: str = "default",
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.registry = registry
        self.artifacts = artifacts
        self.stamping = stamping
        self.io_policy = io_policy
        if io_policy.max_loaded_pipelines is not None:
            registry.max_loaded = io_policy.max_loaded_pipelines
        if io_policy.vram_budget_mb is not None:
            registry.vram_budget_bytes = io_policy.vram_budget_mb * 2**20
        self.engine = engine or InferenceEngine(registry)
        self.budget = GenerationBudget.from_policy(io_policy)
        self.max_pixels = max_pixels
        self.default_namespace = default_namespace
        self.clock = clock
        self.breaker = CircuitBreaker("inference", io_policy.circuit_breaker)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task[None] | None = None

    # --- one job -------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequested, seed: int, owner: JobOwner,
                       ) -> Outcome:
        try:
            validate_size(request.width, request.height, SIZE_MULTIPLE, self.max_pixels)
            refusal = self.budget.refusal(request)
            if refusal is not None:
                return EffectFailed("over_budget", refusal, self.clock())
            self.registry.resolve(request.model)
        except InferenceError as err:
            return EffectFailed(err.code, str(err), self.clock())
        timeout_s = self.io_policy.timeout_ms / 1000.0
        job = GenerationJob(
            prompt=request.prompt, seed=seed, model=request.model, width=request.width,
            height=request.height, num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, true_cfg_scale=request.true_cfg_scale,
            negative_prompt=request.negative_prompt, deadline=time.monotonic() + timeout_s,
            key_id=str(owner.workflow_id),
        )
        try:
            async with asyncio.timeout(timeout_s):
                image = await retry(lambda: self._submit(job), policy=self.io_policy.retry,
                                    breaker=self.breaker, transient=(TransientInferenceError,))
                completed = await asyncio.to_thread(self._store_and_stamp, image, request,
                                                    owner)
        except TimeoutError:
            return EffectFailed("timeout", f"generation for workflow {owner.workflow_id} "
                                f"took longer than {timeout_s:g}s", self.clock())
        except CircuitOpen as err:
            return EffectFailed("circuit_open", str(err), self.clock())
        except (InferenceError, StampError) as err:
            return EffectFailed(err.code, str(err), self.clock())
        except (ObjectStoreError, OSError) as err:  # the artifact store refused or is gone
            return EffectFailed("artifact_store", f"the image could not be stored: {err}",
                                self.clock())
        return GenerationSucceeded(result=completed, at=self.clock())

    async def aclose(self) -> None:
        """Stop the batcher and the worker thread (work in progress finishes first)."""
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
        await asyncio.to_thread(self._executor.shutdown, True)

    # --- batching ------------------------------------------------------------------------------

    async def _submit(self, job: GenerationJob) -> GeneratedImage:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._batch_loop(self._queue),
                                                name="inference-batcher")
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        cancel = threading.Event()  # the worker stops this job's call between steps once set
        self._queue.put_nowait((replace(job, enqueued_at=time.monotonic(), cancel=cancel),
                                future))
        try:
            result = await future
        except asyncio.CancelledError:  # the request timed out (or the node is stopping)
            cancel.set()
            raise
        if isinstance(result, GeneratedImage):
            return result
        if result.transient:
            raise TransientInferenceError(result.reason, code=result.code)
        raise InferenceError(result.reason, code=result.code)

    async def _batch_loop(self, queue: asyncio.Queue[_Pending]) -> None:
        batching = self.io_policy.batching
        loop = asyncio.get_running_loop()
        while True:
            buffer = [await queue.get()]
            key = batch_key(buffer[0][0])
            window_end = loop.time() + batching.max_batch_wait_ms / 1000.0
            while sum(batch_key(job) == key for job, _ in buffer) < batching.max_batch_size:
                if not queue.empty():
                    buffer.append(queue.get_nowait())
                    continue
                remaining = window_end - loop.time()
                if remaining <= 0:
                    break
                try:
                    buffer.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            futures = {id(job): future for job, future in buffer}
            live = [job for job, future in buffer if not future.done()]
            for group in group_jobs(live, batching.max_batch_size):
                try:
                    results = await loop.run_in_executor(self._executor, self.engine.run, group)
                except Exception as err:  # an engine bug must not kill the batcher
                    for job in group:
                        _settle_error(futures[id(job)], err)
                    continue
                for result in results:
                    future = futures[id(result.job)]
                    if not future.done():
                        future.set_result(result)

    # --- after inference -----------------------------------------------------------------------

    def _store_and_stamp(
        self, image: GeneratedImage, request: GenerationRequested, owner: JobOwner
    ) -> GenerationCompleted:
        t0 = time.perf_counter()
        stored = self.artifacts.put(image.png, ".png")
        t1 = time.perf_counter()
        namespace = owner.namespace or self.default_namespace
        stamp = self.stamping.stamp_bytes(image.png, namespace=namespace,
                                          content_type="image/png")
        t2 = time.perf_counter()
        timings: dict[str, float] = {**image.timings_ms, "store": (t1 - t0) * 1000.0,
                                     "stamp": (t2 - t1) * 1000.0}
        return GenerationCompleted(
            workflow_id=owner.workflow_id, artifact_uri=stored.uri, hash=stamp.hash,
            size=stamp.size, seed=image.seed, width=image.width, height=image.height,
            num_inference_steps=request.num_inference_steps, model=request.model,
            device=image.device, prompt_tokens=image.prompt_tokens,
            truncated_tokens=image.truncated_tokens,
            negative_prompt_ignored=image.negative_prompt_ignored,
            batch_size=image.batch_size, timings_ms=timings,
            prompt=request.prompt, negative_prompt=request.negative_prompt,
        )


def _settle_error(future: asyncio.Future[Any], err: Exception) -> None:
    if not future.done():
        future.set_exception(InferenceError(f"inference engine failed: {err}"))
