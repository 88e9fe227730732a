"""Query parameters, checked: a bad value is :class:`BadRequest`, one line naming it (400).

Pure: no I/O. Cursors are opaque to clients: ``base64url("<created_at ISO>|<workflow id>")``,
the last row of a page in the order (created_at DESC, workflow_id DESC).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from stampflow.contracts.events import NAMESPACE_PATTERN

KINDS = ("stamp", "generation")
OUTCOMES = ("stamped", "duplicate", "generated", "failed")
LOGICAL_TOPICS = ("requests", "events")
HASH = re.compile(r"[0-9a-f]{64}\Z")
MAX_LIMIT = 200


class BadRequest(ValueError):
    """A parameter that cannot be used: ``str(err)`` is one line naming it and why."""


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: datetime
    workflow_id: UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.workflow_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str, name: str = "cursor") -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            at, _, wid = raw.partition("|")
            created = datetime.fromisoformat(at)
            if created.tzinfo is None:
                raise ValueError("no time zone")
            return cls(created, UUID(wid))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadRequest(f"{name}: not a cursor this console made") from None


@dataclass(frozen=True, slots=True)
class WorkflowFilter:
    namespace: str | None = None
    kind: str | None = None
    state: str | None = None
    outcome: str | None = None
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until

    def query_items(self) -> list[tuple[str, str]]:
        """The filter as query parameters (for links to the next page)."""
        items = [(k, v) for k, v in (("namespace", self.namespace), ("kind", self.kind),
                                      ("state", self.state), ("outcome", self.outcome)) if v]
        items += [(k, v.isoformat()) for k, v in (("since", self.since),
                                                   ("until", self.until)) if v]
        return items


def _blank(value: str | None) -> str | None:
    return value if value else None


def namespace(value: str | None) -> str | None:
    value = _blank(value)
    if value is not None and not NAMESPACE_PATTERN.fullmatch(value):
        raise BadRequest(f"namespace: {value[:80]!r} is not a namespace (lowercase letters, "
                         "digits, '_' and '-', at most 63 characters)")
    return value


def one_of(name: str, value: str | None, allowed: Collection[str]) -> str | None:
    value = _blank(value)
    if value is not None and value not in allowed:
        raise BadRequest(f"{name}: {value[:80]!r} is not one of {', '.join(sorted(allowed))}")
    return value


def timestamp(name: str, value: str | None) -> datetime | None:
    """ISO 8601; without a time zone it is UTC (an HTML datetime-local field sends none)."""
    value = _blank(value)
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: {value[:80]!r} is not an ISO 8601 time "
                         "(2026-01-31T12:00 or 2026-01-31T12:00:00+00:00)") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def limit(value: str | None, default: int = 50) -> int:
    value = _blank(value)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"limit: {value[:80]!r} is not a whole number") from None
    if not 1 <= n <= MAX_LIMIT:
        raise BadRequest(f"limit: {n} is not between 1 and {MAX_LIMIT}")
    return n


def workflow_filter(states: Collection[str], *, namespace_: str | None, kind: str | None,
                    state: str | None, outcome: str | None, since: str | None,
                    until: str | None) -> WorkflowFilter:
    f = WorkflowFilter(namespace(namespace_), one_of("kind", kind, KINDS),
                       one_of("state", state, states), one_of("outcome", outcome, OUTCOMES),
                       timestamp("since", since), timestamp("until", until))
    if f.since is not None and f.until is not None and f.since >= f.until:
        raise BadRequest("since: must be earlier than until")
    return f


def cursor(value: str | None, name: str = "cursor") -> Cursor | None:
    value = _blank(value)
    return None if value is None else Cursor.decode(value, name)


def workflow_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise BadRequest(f"workflow id: {value[:80]!r} is not a UUID") from None


def content_hash(value: str) -> str:
    if not HASH.fullmatch(value):
        raise BadRequest(f"hash: {value[:80]!r} is not 64 lowercase hex characters")
    return value


def logical_topic(value: str) -> str:
    if value not in LOGICAL_TOPICS:
        raise BadRequest(f"topic: {value[:80]!r} is not one of {', '.join(LOGICAL_TOPICS)}")
    return value


def non_negative(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"{name}: {value[:80]!r} is not a whole number") from None
    if n < 0 or n > 2**62:
        raise BadRequest(f"{name}: {n} is out of range")
    return n
