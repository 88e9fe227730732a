"""What the orchestrator makes of a record's bytes, before any workflow runs. Pure.

Three answers, and every input gets exactly one of them:
- :class:`Admitted`: a valid request; its workflow runs.
- :class:`Refused`: readable enough to name its namespace and request id, but not a valid
  request; the workflow is created and fails at once with ``code`` and a one-line ``reason``.
- :class:`Unreadable`: not even that; the record goes to the dead-letter topic with ``reason``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from uuid import UUID

from pydantic import ValidationError

from stampflow.contracts.events import REQUEST_TYPES, Envelope, WorkflowKind, decode, probe_identity
from stampflow.nodes.deadletter import one_line


@dataclass(frozen=True, slots=True)
class Admitted:
    request: Envelope


@dataclass(frozen=True, slots=True)
class Refused:
    namespace: str
    request_id: UUID
    kind: WorkflowKind
    code: str  # invalid_request | unexpected_event
    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    reason: str


Admission = Admitted | Refused | Unreadable


# Without a limit from the caller: inline content of 64 MiB in base64, plus the envelope.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024 * 4 // 3 + 64 * 1024


def admit(raw: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Admission:
    """Exactly one answer for any bytes. The size is checked before anything is parsed."""
    if len(raw) > max_bytes:
        return Unreadable(f"record of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        request = decode(raw)
    except ValidationError as err:
        reason = one_line(err)
        identity = probe_identity(raw)
        if identity is None:
            return Unreadable(reason)
        namespace, request_id = identity
        return Refused(namespace, request_id, kind_of(peek_type(raw)), "invalid_request", reason)
    if request.event_type not in REQUEST_TYPES:
        return Refused(request.namespace, request.event_id, kind_of(request.event_type),
                       "unexpected_event", f"{request.event_type} is not a request; expected "
                       f"one of {sorted(REQUEST_TYPES)}")
    return Admitted(request)


def admit_result(raw: bytes, max_bytes: int) -> Envelope | Unreadable:
    """An inference node's result, or why it cannot be one. No workflow can be failed for an
    unreadable result (nothing vouches for its workflow), so any problem is Unreadable and
    the record goes to the dead-letter topic."""
    if len(raw) > max_bytes:
        return Unreadable(f"record of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        result = decode(raw)
    except ValidationError as err:
        return Unreadable(one_line(err))
    if result.event_type != "inference.result":
        return Unreadable(f"{result.event_type} is not an inference.result")
    return result


def peek_type(raw: bytes) -> str:
    """The event type a message claims, as far as it can be read ("" when it cannot)."""
    try:
        doc = json.loads(raw)
        return str(doc.get("event_type") or doc.get("payload", {}).get("type") or "")
    except (ValueError, AttributeError, TypeError, RecursionError):
        return ""


def kind_of(event_type: str) -> WorkflowKind:
    return "generation" if event_type.startswith(("generation", "inference")) else "stamp"
