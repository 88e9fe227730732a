"""Event contracts: one envelope, a payload union discriminated by ``type``.

Every message on a stampflow topic is an :class:`Envelope` serialised as JSON. The Kafka key
is the workflow id (the request's own id for a request), so one namespace spreads over every
partition while each workflow's events keep their order inside one (:meth:`Envelope.key`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID, uuid5

import blake3
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

EVENT_VERSION: Literal[1] = 1

# In the exported JSON Schemas, a pattern that ends in ``$`` also says "no final newline": in
# ECMA-262 (JSON Schema's dialect) ``$`` matches only at the very end, but Python's ``re`` (the
# jsonschema package), Java and .NET also let it match before a final newline.
NO_FINAL_NEWLINE: dict[str, Any] = {"not": {"pattern": "\n$"}}
Namespace = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", strict=True),
    Field(json_schema_extra=NO_FINAL_NEWLINE),
]
Blake3Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$"),
                      Field(json_schema_extra=NO_FINAL_NEWLINE)]
# Anchored with \Z: with ``$``, ``re.match`` also accepts a trailing newline.
NAMESPACE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")

# Every string that can reach PostgreSQL. A text column refuses the NUL character
# (CharacterNotInRepertoireError), so it is refused here, at admission, with the field named;
# lone surrogates never get this far (pydantic refuses them in JSON and in Python input).
# The pattern travels into the exported JSON Schemas.
PG_TEXT_PATTERN = r"^[^\x00]*$"
Text = Annotated[str, StringConstraints(pattern=PG_TEXT_PATTERN)]

# PostgreSQL's integer column types, for fields a hostile producer could set out of range.
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1

WorkflowKind = Literal["stamp", "generation"]

# Generation limits: what a request may ask for. The effect node's contract may set lower ones.
MAX_PROMPT_CHARS = 2000
MAX_PIXELS = 2048 * 2048
MIN_SIDE, MAX_SIDE = 16, 4096
MIN_STEPS, MAX_STEPS = 1, 100


def _type_required(schema: dict[str, Any]) -> None:
    """In the exported JSON Schema, a payload's ``type`` is required: the envelope's union is
    discriminated by it, and the model refuses a payload without it."""
    if "type" in schema.get("properties", {}):
        required = schema.setdefault("required", [])
        if "type" not in required:
            required.insert(0, "type")


class Frozen(BaseModel):
    """Base of every contract model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_type_required)


# Base64 as RFC 4648 writes it, checked strictly: a character outside the alphabet or missing
# padding is refused (a lenient decoder dropped them silently: "-_-_" was stamped as empty
# content). The JSON Schema says the same with a pattern.
# Canonical too: the bits that padding leaves over are zero ("YR==" is refused, "YQ==" is "a").
BASE64_PATTERN = (r"^(?:[A-Za-z0-9+/]{4})*"
                  r"(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$")


def _strict_base64(value: object) -> bytes:
    if isinstance(value, str):
        if not value.isascii():
            raise ValueError("base64 is ASCII only")
        value = value.encode("ascii")
    if not isinstance(value, bytes | bytearray):
        raise ValueError("expected base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise ValueError(f"not strict base64: {err}") from None
    # Only the last quantum can carry padding, and with it bits a decoder would drop.
    tail = 1 if value.endswith(b"==") else 2 if value.endswith(b"=") else 0
    if tail and base64.b64encode(raw[-tail:]) != bytes(value[-4:]):
        raise ValueError("not canonical base64: the padding bits are not zero")
    return raw


Base64Content = Annotated[
    bytes,
    PlainValidator(_strict_base64),
    PlainSerializer(lambda raw: base64.b64encode(raw), return_type=bytes),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN,
                    **NO_FINAL_NEWLINE}),
]


# --- requests -----------------------------------------------------------------------------------


class StampRequested(Frozen):
    """Stamp one piece of content: a file under the content root, or inline bytes (base64)."""

    # "Exactly one of path and content" in the exported JSON Schema too (a null counts as
    # absent, as in the model).
    model_config = ConfigDict(json_schema_extra=lambda schema: _stamp_schema(schema))

    type: Literal["stamp.requested"] = "stamp.requested"
    path: Text | None = Field(default=None, min_length=1, max_length=4096)
    content: Base64Content | None = None
    content_type: Text | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> StampRequested:
        if (self.path is None) == (self.content is None):
            raise ValueError("give exactly one of 'path' or 'content'")
        return self


def _stamp_schema(schema: dict[str, Any]) -> None:
    _type_required(schema)
    schema["oneOf"] = [
        {"required": ["path"], "properties": {"path": {"type": "string"}}},
        {"required": ["content"], "properties": {"content": {"type": "string"}}},
    ]


def _pixel_cap_schema() -> list[dict[str, Any]]:
    """The pixel cap (``width * height <= MAX_PIXELS``) for JSON Schema, which cannot multiply:
    sides are multiples of 16, so a staircase of "if width >= w then height <= h" says it
    exactly, one step for each width from which the tallest allowed height drops. An absent
    side is its default (512), which no step constrains."""
    steps: list[dict[str, Any]] = []
    tallest = MAX_SIDE
    for width in range(MIN_SIDE, MAX_SIDE + 1, 16):
        height = min(MAX_SIDE, MAX_PIXELS // width // 16 * 16)
        if height < tallest:
            steps.append({"if": {"required": ["width"], "properties": {
                              "width": {"type": "integer", "minimum": width}}},
                          "then": {"properties": {"height": {"maximum": height}}}})
            tallest = height
    return steps


def _generation_schema(schema: dict[str, Any]) -> None:
    _type_required(schema)
    schema["allOf"] = _pixel_cap_schema()


class GenerationRequested(Frozen):
    """Generate an image. Without a seed, one is derived from the request's event id."""

    # The pixel cap in the exported JSON Schema too.
    model_config = ConfigDict(json_schema_extra=lambda schema: _generation_schema(schema))

    type: Literal["generation.requested"] = "generation.requested"
    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: Text | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    height: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    num_inference_steps: int = Field(default=4, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float = Field(default=0.0, ge=0.0, le=30.0)
    true_cfg_scale: float = Field(default=1.0, ge=1.0, le=30.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    model: Text = Field(default="flux-schnell", min_length=1, max_length=200)

    @model_validator(mode="after")
    def _pixel_cap(self) -> GenerationRequested:
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(
                f"width*height = {self.width * self.height} exceeds the cap of {MAX_PIXELS} pixels"
            )
        return self


# --- results ------------------------------------------------------------------------------------


class WorkflowTransitioned(Frozen):
    """One FSM transition of one workflow. ``seq`` counts transitions from 1."""

    type: Literal["workflow.transitioned"] = "workflow.transitioned"
    workflow_id: UUID
    workflow_kind: WorkflowKind
    seq: int = Field(ge=1, le=INT4_MAX)
    from_state: Text | None = Field(max_length=200)
    to_state: Text = Field(max_length=200)
    trigger: Text = Field(max_length=200)
    reason: Text | None = Field(default=None, max_length=2000)


class StampCreated(Frozen):
    type: Literal["stamp.created"] = "stamp.created"
    workflow_id: UUID
    hash: Blake3Hex
    algorithm: Literal["blake3"] = "blake3"
    size: int = Field(ge=0, le=INT8_MAX)
    content_type: Text = Field(max_length=255)
    stamped_at: AwareDatetime
    source: Text | None = Field(default=None, max_length=4096)  # the request's path, if any


class GenerationCompleted(Frozen):
    type: Literal["generation.completed"] = "generation.completed"
    workflow_id: UUID
    artifact_uri: Text = Field(max_length=4096)
    hash: Blake3Hex
    size: int = Field(ge=0, le=INT8_MAX)
    seed: int = Field(ge=0, le=INT8_MAX)
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    num_inference_steps: int = Field(ge=MIN_STEPS, le=MAX_STEPS)
    model: Text = Field(max_length=200)
    device: Text = Field(max_length=200)
    prompt_tokens: int = Field(ge=0, le=INT4_MAX)
    truncated_tokens: int = Field(default=0, ge=0, le=INT4_MAX)
    negative_prompt_ignored: bool = False
    batch_size: int = Field(default=1, ge=1, le=INT4_MAX)
    # What was asked for, so operators see it beside the picture (absent from older events).
    prompt: Text | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    negative_prompt: Text | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    timings_ms: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict)


class WorkflowCompleted(Frozen):
    type: Literal["workflow.completed"] = "workflow.completed"
    workflow_id: UUID
    workflow_kind: WorkflowKind
    duration_ms: float = Field(ge=0, allow_inf_nan=False)


class WorkflowFailed(Frozen):
    type: Literal["workflow.failed"] = "workflow.failed"
    workflow_id: UUID
    workflow_kind: WorkflowKind
    error_code: Text = Field(max_length=200)
    reason: Text = Field(max_length=2000)


# --- between the orchestrator and the inference node ----------------------------------------


class InferenceJob(Frozen):
    """One generation for the inference node, on the inference-jobs topic.

    The orchestrator publishes it once the workflow has entered ``state``, the FSM state that
    waits for an ``inference.result`` (the contract's ``waits``). It carries what the
    orchestrator needs back to resume the workflow, so any orchestrator can take the result:
    the workflow's id, its ``state`` and ``seq`` at dispatch, and when it started. The
    envelope's ``correlation_id`` is the request's id, its namespace the workflow's."""

    type: Literal["inference.job"] = "inference.job"
    workflow_id: UUID
    state: Text = Field(min_length=1, max_length=200)
    seq: int = Field(ge=1, le=INT4_MAX)
    started_at: AwareDatetime
    seed: int = Field(ge=0, lt=2**63)
    request: GenerationRequested


class InferenceResult(Frozen):
    """What the inference node did with one job, on the inference-results topic: exactly one
    of ``completed`` (the image, stored and stamped) or ``error_code`` with ``reason``. The
    job's ``workflow_id``, ``state``, ``seq`` and ``started_at`` come back unchanged."""

    # "Exactly one of completed and error_code" in the exported JSON Schema too (null counts
    # as absent). That completed.workflow_id is the job's, JSON Schema cannot say.
    model_config = ConfigDict(json_schema_extra=lambda schema: _result_schema(schema))

    type: Literal["inference.result"] = "inference.result"
    workflow_id: UUID
    state: Text = Field(min_length=1, max_length=200)
    seq: int = Field(ge=1, le=INT4_MAX)
    started_at: AwareDatetime
    completed: GenerationCompleted | None = None
    error_code: Text | None = Field(default=None, min_length=1, max_length=200)
    reason: Text | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one_outcome(self) -> InferenceResult:
        if (self.completed is None) == (self.error_code is None):
            raise ValueError("give exactly one of 'completed' or 'error_code'")
        if self.completed is not None and self.completed.workflow_id != self.workflow_id:
            raise ValueError("completed.workflow_id is not the job's workflow_id")
        return self


def _result_schema(schema: dict[str, Any]) -> None:
    _type_required(schema)
    schema["oneOf"] = [
        {"required": ["completed"], "properties": {"completed": {"type": "object"}}},
        {"required": ["error_code"], "properties": {"error_code": {"type": "string"}}},
    ]


Payload: TypeAlias = Annotated[
    StampRequested
    | GenerationRequested
    | WorkflowTransitioned
    | StampCreated
    | GenerationCompleted
    | WorkflowCompleted
    | WorkflowFailed
    | InferenceJob
    | InferenceResult,
    Field(discriminator="type"),
]

PAYLOAD_MODELS: tuple[type[Frozen], ...] = (
    StampRequested,
    GenerationRequested,
    WorkflowTransitioned,
    StampCreated,
    GenerationCompleted,
    WorkflowCompleted,
    WorkflowFailed,
    InferenceJob,
    InferenceResult,
)
EVENT_TYPES: dict[str, type[Frozen]] = {
    model.model_fields["type"].default: model for model in PAYLOAD_MODELS
}
MODELS_BY_NAME: dict[str, type[Frozen]] = {model.__name__: model for model in PAYLOAD_MODELS}

REQUEST_TYPES = frozenset({"stamp.requested", "generation.requested"})
INFERENCE_TYPES = frozenset({"inference.job", "inference.result"})
RESULT_TYPES = frozenset(EVENT_TYPES) - REQUEST_TYPES - INFERENCE_TYPES


def _envelope_schema(schema: dict[str, Any]) -> None:
    """``event_type`` is one of the event types and names the payload's ``type``: said in the
    exported JSON Schema too."""
    types = sorted(EVENT_TYPES)
    schema["properties"]["event_type"]["enum"] = types
    schema["allOf"] = [
        {"if": {"properties": {"event_type": {"const": t}}, "required": ["event_type"]},
         "then": {"properties": {"payload": {"properties": {"type": {"const": t}}}}}}
        for t in types
    ]


class Envelope(Frozen):
    """What travels on every topic. ``event_type`` repeats the payload's ``type``."""

    model_config = ConfigDict(json_schema_extra=_envelope_schema)

    event_id: UUID
    event_type: str
    event_version: Literal[1] = 1
    namespace: Namespace
    correlation_id: UUID
    causation_id: UUID | None = None
    occurred_at: AwareDatetime
    source: Text = Field(min_length=1, max_length=200)
    payload: Payload

    @model_validator(mode="after")
    def _type_matches_payload(self) -> Envelope:
        if self.event_type != self.payload.type:
            raise ValueError(
                f"event_type {self.event_type!r} does not match payload type "
                f"{self.payload.type!r}"
            )
        return self

    def key(self) -> bytes:
        """The Kafka key: the workflow's id, or for a request (which has no workflow yet) its
        own event id. A namespace's traffic spreads over every partition; one workflow's
        events, its inference job and its result each stay in one partition, in order."""
        workflow_id = getattr(self.payload, "workflow_id", None)
        return str(workflow_id if workflow_id is not None else self.event_id).encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


_ENVELOPE = TypeAdapter(Envelope)


def decode(raw: bytes) -> Envelope:
    """Parse and validate one message. Raises pydantic's ValidationError on any problem."""
    return _ENVELOPE.validate_json(raw)


def storable(text: str, limit: int) -> str:
    """``text`` as PostgreSQL can store it in a text field: NUL escaped, cut to ``limit``
    characters. For reasons that quote what an effect or a database said."""
    return text.replace("\x00", "\\x00")[:limit]


def utc_now() -> datetime:
    return datetime.now(UTC)


_MS_BITS = 48  # a UUIDv7's Unix milliseconds: the top 48 of its 128 bits
_LOW_BITS = 128 - _MS_BITS
_VERSION_MASK = ~(0xF << 76) & ((1 << 128) - 1)
_VARIANT_MASK = ~(0x3 << 62) & ((1 << 128) - 1)
_VARIANT_RFC = 0x2 << 62
_TIME_ORDERED = frozenset({7, 8})


def _stamp_version(value: int, version: int) -> UUID:
    return UUID(int=(value & _VERSION_MASK & _VARIANT_MASK) | version << 76 | _VARIANT_RFC)


def new_event_id() -> UUID:
    """A new request id: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds then 74 random bits.

    Ids made later sort later, and so do the workflow and event ids :func:`derive_id` makes
    from them: PostgreSQL's indexes keyed by those ids then grow at their right edge, and the
    reducer's inserts and lookups stay in the few pages it touched last, however large the
    history is (with random ids each new workflow touched a random page of each index).
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return _stamp_version((ms << _LOW_BITS) | (rand & ((1 << _LOW_BITS) - 1)), 7)


def derive_id(parent: UUID, *parts: object) -> UUID:
    """A deterministic child id: the same parent and parts always give the same UUID.

    Workflow and event ids are derived from the request's event id this way, so a request
    re-delivered after a crash produces exactly the same ids, and the reducer counts it once.

    A time-ordered parent (UUIDv7, or a child of one) gives a UUIDv8 that keeps the parent's 48
    bits of milliseconds, followed by 74 bits of the BLAKE3 of the parent and the parts: the
    child sorts with its parent. Any other parent (a producer's UUIDv4, ...) gives the UUIDv5
    of the parts under the parent, as stampflow always derived them.
    """
    name = ":".join(str(part) for part in parts)
    if parent.version not in _TIME_ORDERED:
        return uuid5(parent, name)
    digest = int.from_bytes(blake3.blake3(parent.bytes + name.encode()).digest(10), "big")
    return _stamp_version((parent.int >> _LOW_BITS << _LOW_BITS) | digest, 8)


def derive_seed(request_id: UUID) -> int:
    """The generation seed used when a request gives none: stable for a given request id."""
    return uuid5(request_id, "seed").int % (2**63)


def envelope_for(
    payload: Any,
    *,
    namespace: str,
    event_id: UUID,
    correlation_id: UUID,
    causation_id: UUID | None,
    source: str,
    occurred_at: datetime | None = None,
) -> Envelope:
    return Envelope(
        event_id=event_id,
        event_type=payload.type,
        namespace=namespace,
        correlation_id=correlation_id,
        causation_id=causation_id,
        occurred_at=occurred_at or utc_now(),
        source=source,
        payload=payload,
    )


def envelope_of_validated(
    payload: Any,
    *,
    namespace: str,
    event_id: UUID,
    correlation_id: UUID,
    causation_id: UUID | None,
    source: str,
    occurred_at: datetime,
) -> Envelope:
    """:func:`envelope_for` without validating again what is valid already: ``payload`` a
    validated model, ``namespace`` taken from a validated envelope, ``occurred_at`` aware.
    For the events a node builds from what it consumed (about 5 µs an event saved; a reader
    still validates every message it decodes). The tests compare it with envelope_for."""
    return Envelope.model_construct(
        event_id=event_id, event_type=payload.type, event_version=1, namespace=namespace,
        correlation_id=correlation_id, causation_id=causation_id, occurred_at=occurred_at,
        source=source, payload=payload)


def probe_identity(raw: bytes) -> tuple[str, UUID] | None:
    """Best effort: the namespace and event id of a message that failed validation.

    A request whose namespace and id can be read fails as ``workflow.failed`` with a reason;
    anything less readable goes to the dead-letter topic. Never raises.
    """
    try:
        doc = json.loads(raw)
        namespace = doc["namespace"]
        event_id = UUID(str(doc["event_id"]))
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.match(namespace):
        return None
    return namespace, event_id
