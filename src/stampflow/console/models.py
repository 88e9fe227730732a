"""The JSON API's response models: what the OpenAPI document describes (/api/openapi.json)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Me(Model):
    role: str
    may_replay: bool


class ActivityBar(Model):
    start: datetime
    created: int
    failed: int


class Namespace(Model):
    namespace: str
    workflows: int
    completed: int
    failed: int
    in_flight: int
    duplicates: int
    stamps: int
    total_bytes: int
    generations: int
    total_pixels: int
    compute_seconds: float
    anomalies: int
    first_activity: datetime | None
    last_activity: datetime | None
    activity: list[ActivityBar] = []


class Namespaces(Model):
    bucket_seconds: int | None
    since: datetime | None
    namespaces: list[Namespace]


class Workflow(Model):
    workflow_id: UUID
    namespace: str
    kind: str
    state: str
    outcome: str | None
    hash: str | None
    error_code: str | None
    reason: str | None
    seq: int
    created_at: datetime
    updated_at: datetime
    duration_ms: float | None


class WorkflowPage(Model):
    items: list[Workflow]
    # Pass as ``cursor`` for the next (older) page; null on the last page.
    next_cursor: str | None
    # Pass as ``newer_than`` to get only workflows created since this page (live updates).
    newest_cursor: str | None


class Transition(Model):
    seq: int
    from_state: str | None
    to_state: str
    trigger: str
    reason: str | None
    occurred_at: datetime
    recorded_at: datetime
    # Milliseconds since the previous transition (null for the first).
    after_ms: float | None = None


class Stamp(Model):
    namespace: str
    hash: str
    algorithm: str
    size: int
    content_type: str
    source: str | None
    first_workflow_id: UUID
    stamped_at: datetime


class Image(Model):
    """One generated image, as the gallery lists it."""

    workflow_id: UUID
    namespace: str
    hash: str
    size: int
    seed: int
    width: int
    height: int
    steps: int
    model: str
    compute_seconds: float
    created_at: datetime
    # The console's URL of the image (served through the console, cached by hash).
    image_url: str


class Generation(Image):
    """One generated image with everything recorded about its making (a workflow's page)."""

    device: str
    batch_size: int
    prompt_tokens: int
    truncated_tokens: int
    negative_prompt_ignored: bool
    prompt: str | None = None  # None for generations recorded before prompts were kept
    negative_prompt: str | None = None


class WorkflowDetail(Model):
    workflow: Workflow
    transitions: list[Transition]
    stamp: Stamp | None
    generation: Generation | None


class ImagePage(Model):
    items: list[Image]
    next_cursor: str | None


class Failure(Model):
    namespace: str
    workflow_id: UUID
    kind: str
    error_code: str | None
    reason: str | None
    updated_at: datetime


class Anomaly(Model):
    id: int
    namespace: str
    workflow_id: UUID | None
    event_id: UUID
    kind: str
    detail: str
    recorded_at: datetime


class EarlierReplay(Model):
    replayed_to: str
    replayed_at: datetime
    by_role: str
    times: int


class DeadLetter(Model):
    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    topic: str
    partition: int
    offset: int
    error: str
    failed_at: str
    node: str
    key: str | None
    # The first bytes of the original record, as Python's repr of bytes.
    value_preview: str
    value_size: int
    replayed: EarlierReplay | None


class DeadLetters(Model):
    topic: str
    items: list[DeadLetter]
