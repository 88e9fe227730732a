"""The batching core, pure: what one image job is, which jobs may share a pipeline call, and
what a call returns per job. No torch here; :mod:`stampflow.inference.engine` runs the groups.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from stampflow.inference.errors import InvalidRequest

__all__ = ["BatchKey", "GeneratedImage", "GenerationJob", "ItemFailed", "ItemResult",
           "batch_key", "group_jobs", "split_in_halves", "validate_size"]

@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One image to make. ``deadline`` and ``enqueued_at`` are ``time.monotonic()`` seconds."""

    prompt: str
    seed: int
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float = 0.0
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    deadline: float | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    key_id: str = ""  # the caller's handle (e.g. the workflow id), carried through untouched
    cancel: threading.Event | None = field(default=None, compare=False)  # set: caller gave up

    def expired(self, now: float) -> bool:
        """Past its deadline at ``now``, or cancelled by its caller."""
        return ((self.deadline is not None and self.deadline <= now)
                or (self.cancel is not None and self.cancel.is_set()))


class BatchKey(NamedTuple):
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    has_negative_prompt: bool


def batch_key(job: GenerationJob) -> BatchKey:
    return BatchKey(job.model, job.width, job.height, job.num_inference_steps,
                    job.guidance_scale, job.true_cfg_scale, job.negative_prompt is not None)


def group_jobs(jobs: Sequence[GenerationJob], max_batch_size: int) -> list[list[GenerationJob]]:
    """Split ``jobs`` into compatible groups of at most ``max_batch_size``.

    Groups come in the order of their first job; jobs keep their order inside a group.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size {max_batch_size} is not at least 1")
    by_key: dict[BatchKey, list[GenerationJob]] = {}
    for job in jobs:
        by_key.setdefault(batch_key(job), []).append(job)
    return [group[i:i + max_batch_size]
            for group in by_key.values() for i in range(0, len(group), max_batch_size)]


def validate_size(width: int, height: int, multiple: int, max_pixels: int | None) -> None:
    """Raise :class:`InvalidRequest` for a size the pipeline cannot make."""
    if width % multiple or height % multiple:
        raise InvalidRequest(
            f"size {width}x{height}: width and height must be multiples of {multiple}"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidRequest(
            f"size {width}x{height}: {width * height} pixels exceeds this node's cap of "
            f"{max_pixels}"
        )


def split_in_halves(jobs: Sequence[GenerationJob]) -> tuple[list[GenerationJob], ...]:
    middle = (len(jobs) + 1) // 2
    return list(jobs[:middle]), list(jobs[middle:])


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    job: GenerationJob
    png: bytes
    width: int
    height: int
    seed: int
    prompt_tokens: int
    truncated_tokens: int
    negative_prompt_ignored: bool
    timings_ms: dict[str, float]
    batch_size: int
    device: str
    array: Any = None  # float32 HxWx3 in [0, 1] when the engine keeps arrays


@dataclass(frozen=True, slots=True)
class ItemFailed:
    job: GenerationJob
    code: str
    reason: str
    transient: bool = False


ItemResult = GeneratedImage | ItemFailed
