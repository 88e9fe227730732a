"""Dead letters stay under the broker's message limit; oversized records are not parsed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from stampflow.nodes.deadletter import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_KEY_BYTES,
    RECORD_OVERHEAD_BYTES,
    dead_letter,
    dead_letter_key,
    parse_dead_letter,
)
from stampflow.nodes.orchestrator.admission import Unreadable, admit

AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("size", [0, 1, 700_000, 786_000, 800_000, 1_000_000, 5_000_000])
def test_a_dead_letter_never_exceeds_the_message_limit(size: int) -> None:
    """A record of 0.8-1 MiB became a letter over the limit (base64 inside JSON): the publish
    failed with MessageSizeTooLargeError, retried forever."""
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    key = b"k" * 5000
    doc = dead_letter(topic="t.requests.v1", partition=3, offset=42, key=key, value=value,
                      error="bad\n" * 2000, node="orchestrator", at=AT)
    assert len(doc) + len(dead_letter_key(key)) + RECORD_OVERHEAD_BYTES <= (
        DEFAULT_MAX_MESSAGE_BYTES)
    letter = parse_dead_letter(doc)
    assert letter["value_size"] == size
    assert value.startswith(letter["value"])
    assert letter["value_truncated"] is (len(letter["value"]) < size)
    assert letter["key"] == key[:MAX_KEY_BYTES] and letter["key_truncated"] is True
    assert "\n" not in letter["error"]
    if size <= 700_000:
        assert letter["value"] == value  # small letters keep every byte


def test_a_small_letter_is_whole_and_says_so() -> None:
    doc = json.loads(dead_letter(topic="t", partition=0, offset=1, key=None, value=b"{",
                                 error="e", node="n", at=AT))
    assert doc["value_truncated"] is False and doc["key"] is None and doc["value_size"] == 1


def test_an_oversized_record_is_refused_before_it_is_parsed() -> None:
    raw = b'{"event_id": "' + b"x" * 2000 + b'"}'
    answer = admit(raw, max_bytes=1000)
    assert isinstance(answer, Unreadable)
    assert answer.reason == f"record of {len(raw)} bytes exceeds the limit of 1000 bytes"
