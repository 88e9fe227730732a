"""Dead-letter records: what a node publishes to ``<topic>.dlq`` for a message it can't use.

The record keeps the original bytes (base64), where they came from (topic, partition, offset,
key) and the error, so an operator can inspect a poison message and re-drive it after a fix.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any

from pydantic import ValidationError


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def dead_letter(
    *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    error: str, node: str, at: datetime,
) -> bytes:
    doc: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": base64.b64encode(key).decode() if key else None,
        "value": base64.b64encode(value or b"").decode(),
        "error": error,
        "failed_at": at.isoformat(),
        "node": node,
    }
    return json.dumps(doc).encode()


def parse_dead_letter(raw: bytes) -> dict[str, Any]:
    """The fields of a dead-letter record, with ``key`` and ``value`` decoded to bytes."""
    doc: dict[str, Any] = json.loads(raw)
    doc["value"] = base64.b64decode(doc["value"])
    doc["key"] = base64.b64decode(doc["key"]) if doc.get("key") else None
    return doc


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
MAX_FIELD_CHARS = 120


def one_line(err: ValidationError) -> str:
    """A validation error as one line: the first field, its problem, and how many more.

    Field names and tags come from the sender: control characters are escaped (a newline in a
    key must not split a log line) and an over-long field name is cut.
    """
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(message)"
    if len(where) > MAX_FIELD_CHARS:
        where = where[:MAX_FIELD_CHARS] + "..."
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return _escape(f"{where}: {first['msg']}{more}")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
