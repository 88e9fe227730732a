"""Hypothesis strategies for request records: arbitrary bytes, arbitrary JSON, and valid
requests with one field mutated, removed or added. Shared by the decode fuzz (unit) and the
running-node fuzz (integration)."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False) | st.text(max_size=40))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
NASTY_STRINGS = st.sampled_from([
    "", " ", "\x00", "..", "../../etc/passwd", "/etc/passwd", "ns/../x", "NS", "-ns", "a" * 64,
    "a" * 5000, "\u202e\u0000", "null", "1e309", "stamp.requested", "generation.requested",
    "workflow.failed", "2026-13-45T25:61:00Z", "not-a-uuid", "00000000-0000-0000-0000-000000000000",
]) | st.text(max_size=80)
ANY_VALUE = JSON | NASTY_STRINGS | st.integers() | st.just(10**400)

ENVELOPE_FIELDS = ("event_id", "event_type", "event_version", "namespace", "correlation_id",
                   "causation_id", "occurred_at", "source", "payload")
STAMP_FIELDS = ("type", "path", "content", "content_type")
GENERATION_FIELDS = ("type", "prompt", "negative_prompt", "width", "height",
                     "num_inference_steps", "guidance_scale", "true_cfg_scale", "seed", "model")


@st.composite
def valid_requests(draw: st.DrawFn, namespaces: st.SearchStrategy[str] | None = None,
                   ) -> dict[str, Any]:
    event_id = str(draw(st.uuids()))
    namespace = draw(namespaces or st.from_regex(r"fz[a-z0-9_-]{0,6}", fullmatch=True))
    if draw(st.booleans()):
        payload: dict[str, Any] = {"type": "stamp.requested"}
        if draw(st.booleans()):
            payload["content"] = base64.b64encode(draw(st.binary(max_size=64))).decode()
        else:
            payload["path"] = draw(st.sampled_from(["a.txt", "missing.bin", "../x", "/etc/hosts",
                                                    "sub/dir/file"]))
        event_type = "stamp.requested"
    else:
        payload = {"type": "generation.requested", "prompt": draw(st.text(min_size=1,
                                                                          max_size=30)),
                   "width": 64, "height": 64, "num_inference_steps": 1,
                   "model": "not-installed"}
        event_type = "generation.requested"
    return {"event_id": event_id, "event_type": event_type, "namespace": namespace,
            "correlation_id": event_id, "occurred_at": "2026-11-23T10:00:00Z",
            "source": "fuzz", "payload": payload}


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    doc = draw(valid_requests())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target = doc
        fields: tuple[str, ...] = ENVELOPE_FIELDS
        if draw(st.booleans()) and isinstance(doc.get("payload"), dict):
            target = doc["payload"]
            fields = (STAMP_FIELDS if target.get("type") == "stamp.requested"
                      else GENERATION_FIELDS)
        how = draw(st.sampled_from(["set", "drop", "extra"]))
        if how == "set":
            target[draw(st.sampled_from(fields))] = draw(ANY_VALUE)
        elif how == "drop":
            target.pop(draw(st.sampled_from(fields)), None)
        else:
            target[draw(st.text(min_size=1, max_size=10))] = draw(ANY_VALUE)
    return json.dumps(doc).encode()


RECORDS = (
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | mutated_requests()
    | valid_requests().map(lambda d: json.dumps(d).encode())
    | st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"namespace": "a", "event_id": ' * 200,
                       b"\xff\xfe", b"{}", b"null", b"", b'{"payload": {"type": []}}'])
)
