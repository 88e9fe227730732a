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


# What a Kafka producer sends by default at most (max_request_size), and what a broker takes
# by default (message.max.bytes is a little more).
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_KEY_BYTES = 1024
MAX_ERROR_CHARS = 2000
# Room for the record's own framing (offsets, timestamps, headers, batch header).
RECORD_OVERHEAD_BYTES = 512


def dead_letter(
    *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    error: str, node: str, at: datetime, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """The dead-letter document, never over ``max_bytes`` with its key.

    A record of about 0.8 MiB or more does not fit once in base64 inside JSON: the letter then
    keeps a bounded copy of the first bytes and says so (``value_truncated``, ``value_size``).
    The key is cut the same way (:func:`dead_letter_key`).
    """
    value = value or b""
    doc: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": base64.b64encode(dead_letter_key(key)).decode() if key else None,
        "value": "",
        "error": _escape(error)[:MAX_ERROR_CHARS],
        "failed_at": at.isoformat(),
        "node": node,
        "value_size": len(value),
        "value_truncated": False,
        "key_truncated": bool(key) and len(key or b"") > MAX_KEY_BYTES,
    }
    fixed = len(json.dumps(doc).encode()) + len(dead_letter_key(key)) + RECORD_OVERHEAD_BYTES
    room = max(0, (max_bytes - fixed) // 4 * 3)  # base64: 4 characters per 3 bytes
    if len(value) > room:
        value = value[:room]
        doc["value_truncated"] = True
    doc["value"] = base64.b64encode(value).decode()
    return json.dumps(doc).encode()


def dead_letter_key(key: bytes | None) -> bytes:
    """The Kafka key of a dead letter: the original key, cut to :data:`MAX_KEY_BYTES`."""
    return (key or b"")[:MAX_KEY_BYTES]


def parse_dead_letter(raw: bytes) -> dict[str, Any]:
    """The fields of a dead-letter record, with ``key`` and ``value`` decoded to bytes."""
    doc: dict[str, Any] = json.loads(raw)
    doc["value"] = base64.b64decode(doc["value"])
    doc["key"] = base64.b64decode(doc["key"]) if doc.get("key") else None
    return doc


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # every line break str.splitlines knows
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
