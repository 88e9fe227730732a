"""The exported JSON Schemas say what the models check: thousands of envelopes, valid and
broken, judged by the node's own ``decode`` and by two independent JSON Schema validators
(``jsonschema``, Draft 2020-12 with format checking, and ``fastjsonschema``). Every verdict
must agree, except the documented exceptions below (the README lists them too):

- ``lax spelling`` (the node accepts, the schema refuses): pydantic's lax mode reads a typed
  value from another spelling: numbers and booleans as strings ("512", "true"), 0/1 as
  booleans, booleans as numbers, UUIDs without hyphens, in braces or as URNs, times as Unix
  numbers or with a space for the "T". The schema asks for the canonical JSON type, so a
  producer that follows it is never refused. Recognised here by the node's own re-serialisation
  of the document being schema-valid (only the spelling differed).
- ``lone surrogate`` (the schema accepts, the node refuses): a string holding an unpaired UTF-16
  surrogate escape is not I-JSON (RFC 7493); the node's JSON parser refuses it before any
  validation. A JSON Schema sees strings after parsing and has no portable way to say it.
- ``result workflow_id`` (the schema accepts, the node refuses): an ``inference.result``'s
  ``completed.workflow_id`` must equal its ``workflow_id``. JSON Schema cannot compare two
  values of one instance.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import fastjsonschema
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stampflow.contracts.events import (
    EVENT_TYPES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    Envelope,
    decode,
)
from stampflow.contracts.schema import schemas

ENVELOPE_SCHEMA: dict[str, Any] = schemas()["envelope.schema.json"]
JSONSCHEMA = jsonschema.Draft202012Validator(
    ENVELOPE_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
if JSONSCHEMA.format_checker is None or JSONSCHEMA.format_checker.conforms(
        "2026-01-01 00:00", "date-time"):
    raise RuntimeError("jsonschema does not check date-time: install rfc3339-validator")
# fastjsonschema resolves a relative $id against nothing (it would fetch it): drop it. It knows
# no "uuid" format; RFC 4122's text form is given here, independently of the models.
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                        r"[0-9a-fA-F]{12}\Z")
FAST = fastjsonschema.compile(
    {k: v for k, v in ENVELOPE_SCHEMA.items() if k not in ("$id", "$schema")},
    formats={"uuid": lambda s: bool(_UUID_TEXT.match(s))})


def fast_valid(doc: Any) -> bool:
    try:
        FAST(doc)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def model_valid(raw: bytes) -> bool:
    try:
        decode(raw)
    except ValidationError:
        return False
    return True


@dataclass(frozen=True)
class Verdicts:
    model: bool
    jsonschema: bool
    fast: bool

    @property
    def agree(self) -> bool:
        return self.model == self.jsonschema == self.fast


def verdicts(doc: Any) -> tuple[bytes, Any, Verdicts]:
    """The document as bytes on the wire, as a validator sees it (parsed back), and the verdicts."""
    raw = json.dumps(doc, allow_nan=False).encode()
    seen = json.loads(raw)
    return raw, seen, Verdicts(model_valid(raw), JSONSCHEMA.is_valid(seen), fast_valid(seen))


# --- documented exceptions --------------------------------------------------------------------


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _lax_spelling(raw: bytes) -> bool:
    """The node accepted ``raw`` and its own canonical form of it is schema-valid."""
    canonical = json.loads(decode(raw).to_bytes())
    return JSONSCHEMA.is_valid(canonical) and fast_valid(canonical)


def _result_names_another_workflow(doc: Any) -> bool:
    payload = doc.get("payload") if isinstance(doc, dict) else None
    if not isinstance(payload, dict) or payload.get("type") != "inference.result":
        return False
    completed = payload.get("completed")
    return (isinstance(completed, dict)
            and completed.get("workflow_id") != payload.get("workflow_id"))


def documented(raw: bytes, doc: Any, v: Verdicts) -> str | None:
    """The documented exception a disagreement falls under, or None."""
    if v.jsonschema != v.fast:
        return None  # the two validators must always agree with each other
    if v.model and not v.jsonschema:
        return "lax spelling" if _lax_spelling(raw) else None
    if v.jsonschema and not v.model:
        if _has_lone_surrogate(doc):
            return "lone surrogate"
        if _result_names_another_workflow(doc):
            try:
                Envelope.model_validate_json(raw)
            except ValidationError as err:
                if "completed.workflow_id" in str(err):
                    return "result workflow_id"
    return None


# --- valid envelopes, built from the models ------------------------------------------------------

NASTY = st.sampled_from(["\n", "\u2028", "\U0001F600", "e\u0301", "\x01", "'", "\\", "\ufeff"])


def texts(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Text with no NUL, at its limits often."""
    body = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"),
                   min_size=min_size, max_size=min(max_size, 12))
    longest = st.builds(lambda unit: (unit * max_size)[:max_size], NASTY)
    return st.one_of(body, longest) if max_size >= min_size else body


UUIDS = st.uuids().map(str)
TIMES = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                     timezones=st.sampled_from([UTC, None])).map(
    lambda d: (d.replace(tzinfo=UTC) if d.tzinfo is None else d).isoformat())
NAMESPACES = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
SIDES = st.integers(1, 256).map(lambda k: 16 * k)


@st.composite
def generation_requested(draw: st.DrawFn) -> dict[str, Any]:
    width = draw(SIDES)
    height = draw(SIDES.filter(lambda h: h * width <= MAX_PIXELS))
    doc: dict[str, Any] = {"type": "generation.requested",
                           "prompt": draw(texts(MAX_PROMPT_CHARS, 1)),
                           "width": width, "height": height}
    optional = {
        "negative_prompt": st.none() | texts(MAX_PROMPT_CHARS),
        "num_inference_steps": st.integers(1, 100),
        "guidance_scale": st.floats(0, 30),
        "true_cfg_scale": st.floats(1, 30),
        "seed": st.none() | st.integers(0, 2**63 - 1),
        "model": texts(200, 1),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            doc[name] = draw(strategy)
    return doc


@st.composite
def stamp_requested(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "stamp.requested"}
    if draw(st.booleans()):
        doc["path"] = draw(texts(4096, 1))
        if draw(st.booleans()):
            doc["content"] = None
    else:
        import base64
        doc["content"] = base64.b64encode(draw(st.binary(max_size=40))).decode()
        if draw(st.booleans()):
            doc["path"] = None
    if draw(st.booleans()):
        doc["content_type"] = draw(st.none() | texts(255))
    return doc


INT4 = st.integers(1, 2**31 - 1)
INT8 = st.integers(0, 2**63 - 1)
KINDS = st.sampled_from(["stamp", "generation"])


@st.composite
def generation_completed(draw: st.DrawFn, workflow_id: str | None = None) -> dict[str, Any]:
    return {"type": "generation.completed", "workflow_id": workflow_id or draw(UUIDS),
            "artifact_uri": draw(texts(4096)), "hash": draw(st.from_regex(r"\A[0-9a-f]{64}\Z")),
            "size": draw(INT8), "seed": draw(INT8), "width": draw(st.integers(16, 4096)),
            "height": draw(st.integers(16, 4096)), "num_inference_steps": draw(
                st.integers(1, 100)), "model": draw(texts(200)), "device": draw(texts(200)),
            "prompt_tokens": draw(st.integers(0, 2**31 - 1)),
            "timings_ms": draw(st.dictionaries(texts(8), st.floats(0, 1e9), max_size=3))}


@st.composite
def inference_result(draw: st.DrawFn) -> dict[str, Any]:
    workflow_id = draw(UUIDS)
    doc: dict[str, Any] = {"type": "inference.result", "workflow_id": workflow_id,
                           "state": draw(texts(200, 1)), "seq": draw(INT4),
                           "started_at": draw(TIMES)}
    if draw(st.booleans()):
        doc["completed"] = draw(generation_completed(workflow_id))
    else:
        doc["error_code"] = draw(texts(200, 1))
        doc["reason"] = draw(st.none() | texts(2000))
    return doc


PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "stamp.requested": stamp_requested(),
    "generation.requested": generation_requested(),
    "workflow.transitioned": st.fixed_dictionaries({
        "type": st.just("workflow.transitioned"), "workflow_id": UUIDS, "workflow_kind": KINDS,
        "seq": INT4, "from_state": st.none() | texts(200), "to_state": texts(200),
        "trigger": texts(200)}, optional={"reason": st.none() | texts(2000)}),
    "stamp.created": st.fixed_dictionaries({
        "type": st.just("stamp.created"), "workflow_id": UUIDS,
        "hash": st.from_regex(r"\A[0-9a-f]{64}\Z"), "size": INT8,
        "content_type": texts(255), "stamped_at": TIMES},
        optional={"algorithm": st.just("blake3"), "source": st.none() | texts(4096)}),
    "generation.completed": generation_completed(),
    "workflow.completed": st.fixed_dictionaries({
        "type": st.just("workflow.completed"), "workflow_id": UUIDS, "workflow_kind": KINDS,
        "duration_ms": st.floats(0, 1e12)}),
    "workflow.failed": st.fixed_dictionaries({
        "type": st.just("workflow.failed"), "workflow_id": UUIDS, "workflow_kind": KINDS,
        "error_code": texts(200), "reason": texts(2000)}),
    "inference.job": st.fixed_dictionaries({
        "type": st.just("inference.job"), "workflow_id": UUIDS, "state": texts(200, 1),
        "seq": INT4, "started_at": TIMES, "seed": INT8,
        "request": generation_requested()}),
    "inference.result": inference_result(),
}
assert set(PAYLOADS) == set(EVENT_TYPES)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    event_type = draw(st.sampled_from(sorted(PAYLOADS)))
    doc: dict[str, Any] = {
        "event_id": draw(UUIDS), "event_type": event_type, "namespace": draw(NAMESPACES),
        "correlation_id": draw(UUIDS), "occurred_at": draw(TIMES),
        "source": draw(texts(200, 1)), "payload": draw(PAYLOADS[event_type])}
    if draw(st.booleans()):
        doc["causation_id"] = draw(st.none() | UUIDS)
    if draw(st.booleans()):
        doc["event_version"] = 1
    return doc


# --- mutations ---------------------------------------------------------------------------------

_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
# Values a hostile or careless producer might put anywhere: wrong types, bounds, lax spellings,
# malformed formats, NUL, a lone surrogate, over-long strings.
HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 15, 16, 17, 4096, 4112, 1.5, 512.0, -0.0, 2**31 - 1, 2**31,
    2**63 - 1, 2**63, 1e300, "", " ", "1", "512", "1.5", "true", "yes", "null", "x", "\x00",
    "a\x00b", "\ud800", "acme\n", "ACME", "-acme", "a" * 63, "a" * 64, "a" * 201, "a" * 256,
    "a" * 2001, "a" * 4097, "\U0001F600" * 200, "\U0001F600" * 201, [], {}, ["x"], {"x": 1},
    _UUID, _UUID.upper(), _UUID.replace("-", ""), "{" + _UUID + "}", "urn:uuid:" + _UUID,
    _UUID[:-1], _UUID + "\n", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01",
    "2026-01-01 00:00:00Z", "2026-01-01t00:00:00z", "2026-02-30T00:00:00Z",
    "2026-12-31T23:59:60Z", "0000-01-01T00:00:00Z", "2026-01-01T00:00:00+14:00",
    "2026-01-01T00:00:00.123456789-01:30", "2026-01-01T24:00:00Z", 1_700_000_000,
    "0" * 64, "0" * 63, "0" * 64 + "\n", "A" * 64, "YQ==", "YR==", "YQ", "-_-_", "YQ==\n",
    "stamp", "generation", "blake3", "sha256",
    *sorted(EVENT_TYPES), "stamp.Requested", "unknown.event",
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _objects(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if isinstance(doc, dict) else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _objects(value, (*prefix, key))
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid envelope, or one with one to three mutations; the label says which."""
    doc = copy.deepcopy(draw(envelopes()))
    labels = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add",
                                     "stamp-source", "outcome", "pixels", "type"]))
        labels.append(kind)
        payload = doc.get("payload") if isinstance(doc.get("payload"), dict) else None
        if kind == "replace":
            paths = _paths(doc)
            path = draw(st.sampled_from(paths))
            _parent(doc, path)[path[-1]] = draw(st.sampled_from(HOSTILE))
            labels[-1] += ":" + ".".join(map(str, path))
        elif kind == "delete":
            paths = [p for p in _paths(doc) if isinstance(_parent(doc, p), dict)]
            path = draw(st.sampled_from(paths))
            del _parent(doc, path)[path[-1]]
            labels[-1] += ":" + ".".join(map(str, path))
        elif kind == "add":
            target = _at(doc, draw(st.sampled_from([(), *_objects(doc)])))
            target[draw(st.sampled_from(["extra", "path", "content", "completed", "error_code",
                                         "reason", "seed", "workflow_id"]))] = draw(
                st.sampled_from(HOSTILE))
        elif kind == "stamp-source" and payload is not None:
            payload.pop("path", None)
            payload.pop("content", None)
            for name in draw(st.sets(st.sampled_from(["path", "content"]))):
                payload[name] = draw(st.sampled_from([None, "a", "YQ==", ""]))
        elif kind == "outcome" and payload is not None:
            payload.pop("completed", None)
            payload.pop("error_code", None)
            if draw(st.booleans()):
                payload["completed"] = draw(generation_completed(
                    draw(st.sampled_from([payload.get("workflow_id"), _UUID]))))
            if draw(st.booleans()):
                payload["error_code"] = draw(st.sampled_from([None, "oom", ""]))
        elif kind == "pixels" and payload is not None:
            target = payload.get("request", payload)
            if isinstance(target, dict):
                target["width"] = draw(SIDES)
                target["height"] = draw(SIDES)
        elif kind == "type":
            new = draw(st.sampled_from(sorted(EVENT_TYPES)))
            if draw(st.booleans()) and payload is not None:
                payload["type"] = new
            else:
                doc["event_type"] = new
    return " ".join(labels) or "valid", doc


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def check(label: str, doc: dict[str, Any]) -> str:
    raw, seen, v = verdicts(doc)
    if v.agree:
        return "agree"
    exception = documented(raw, seen, v)
    assert exception is not None, (
        f"{label}: node {'accepts' if v.model else 'refuses'}, jsonschema "
        f"{'accepts' if v.jsonschema else 'refuses'}, fastjsonschema "
        f"{'accepts' if v.fast else 'refuses'}: {raw[:600]!r}")
    return exception


@fuzz(1500)
@given(envelopes())
def test_every_valid_envelope_is_schema_valid(doc: dict[str, Any]) -> None:
    raw, seen, v = verdicts(doc)
    assert v.model, raw[:300]
    assert v.jsonschema and v.fast, (v, raw[:600])


@fuzz(4000)
@given(mutated())
def test_the_schema_and_the_node_agree_on_mutated_envelopes(case: tuple[str, Any]) -> None:
    check(*case)


# --- each rule, once, by hand: the cases the brief names, and each documented exception ------


def _envelope(payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"event_id": str(uuid4()), "event_type": payload.get("type", "stamp.requested"),
            "namespace": "acme", "correlation_id": str(uuid4()),
            "occurred_at": "2026-01-01T00:00:00Z", "source": "t", "payload": payload, **fields}


STAMP = {"type": "stamp.requested"}
GEN = {"type": "generation.requested", "prompt": "p"}
WF = str(uuid4())
DONE = {"type": "generation.completed", "workflow_id": WF, "artifact_uri": "file:///a",
        "hash": "0" * 64, "size": 1, "seed": 1, "width": 64, "height": 64,
        "num_inference_steps": 2, "model": "m", "device": "cpu", "prompt_tokens": 1}
RESULT = {"type": "inference.result", "workflow_id": WF, "state": "generating", "seq": 2,
          "started_at": "2026-01-01T00:00:00Z"}

REFUSED_BY_BOTH: dict[str, dict[str, Any]] = {
    "both path and content": _envelope({**STAMP, "path": "a", "content": "YQ=="}),
    "neither path nor content": _envelope(STAMP),
    "both null": _envelope({**STAMP, "path": None, "content": None}),
    "bad namespace": _envelope({**STAMP, "path": "a"}, namespace="Acme"),
    "namespace with a trailing newline": _envelope({**STAMP, "path": "a"}, namespace="acme\n"),
    "namespace too long": _envelope({**STAMP, "path": "a"}, namespace="a" * 64),
    "hash with a trailing newline": _envelope({**DONE, "hash": "0" * 64 + "\n"}),
    "content with a trailing newline": _envelope({**STAMP, "content": "YQ==\n"}),
    "non-canonical base64": _envelope({**STAMP, "content": "YR=="}),
    "bad types": _envelope({**GEN, "width": [512]}),
    "over-long prompt": _envelope({**GEN, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}),
    "over-long path": _envelope({**STAMP, "path": "x" * 4097}),
    "NUL in a text": _envelope({**STAMP, "path": "a\x00"}),
    "wrong discriminator": _envelope({**GEN, "type": "stamp.requested"},
                                     event_type="generation.requested"),
    "unknown discriminator": _envelope({**GEN, "type": "image.requested"}),
    "event_type not the payload's": _envelope({**STAMP, "path": "a"},
                                              event_type="generation.requested"),
    "extra field in the envelope": _envelope({**STAMP, "path": "a"}, extra=1),
    "extra field in the payload": _envelope({**STAMP, "path": "a", "extra": 1}),
    "over the pixel cap": _envelope({**GEN, "width": 4096, "height": 1040}),
    "over the pixel cap, width defaulted": _envelope({**GEN, "height": 4096 + 16}),
    "result with both outcomes": _envelope({**RESULT, "completed": DONE, "error_code": "x"}),
    "result with neither outcome": _envelope(RESULT),
    "year 0": _envelope({**STAMP, "path": "a"}, occurred_at="0000-01-01T00:00:00Z"),
    "no time zone": _envelope({**STAMP, "path": "a"}, occurred_at="2026-01-01T00:00:00"),
    "not a UUID": _envelope({**STAMP, "path": "a"}, event_id="0f8fad5b"),
}
ACCEPTED_BY_BOTH: dict[str, dict[str, Any]] = {
    "path": _envelope({**STAMP, "path": "a"}),
    "content, path null": _envelope({**STAMP, "content": "YQ==", "path": None}),
    "at the pixel cap": _envelope({**GEN, "width": 4096, "height": 1024}),
    "at the pixel cap, square": _envelope({**GEN, "width": 2048, "height": 2048}),
    "512.0 is an integer": _envelope({**GEN, "width": 512.0}),
    "result completed": _envelope({**RESULT, "completed": DONE, "error_code": None}),
    "result failed": _envelope({**RESULT, "error_code": "oom", "reason": "r"}),
    "prompt of 2000 astral characters": _envelope({**GEN, "prompt": "\U0001F600" * 2000}),
}
EXCEPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "numeric string": ("lax spelling", _envelope({**GEN, "width": "512"})),
    "UUID without hyphens": ("lax spelling", _envelope(GEN, event_id=uuid4().hex)),
    "UUID URN": ("lax spelling", _envelope(GEN, event_id=uuid4().urn)),
    "Unix time": ("lax spelling", _envelope(GEN, occurred_at=1_700_000_000)),
    "space for T": ("lax spelling", _envelope(GEN, occurred_at="2026-01-01 00:00:00Z")),
    "boolean as a number": ("lax spelling", _envelope({**GEN, "guidance_scale": True})),
    "lone surrogate": ("lone surrogate", _envelope({**GEN, "prompt": "\ud800"})),
    "result for another workflow": ("result workflow_id", _envelope(
        {**RESULT, "completed": {**DONE, "workflow_id": str(uuid4())}})),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BY_BOTH))
def test_refused_by_the_node_and_by_both_validators(name: str) -> None:
    assert verdicts(REFUSED_BY_BOTH[name])[2] == Verdicts(False, False, False)


@pytest.mark.parametrize("name", sorted(ACCEPTED_BY_BOTH))
def test_accepted_by_the_node_and_by_both_validators(name: str) -> None:
    assert verdicts(ACCEPTED_BY_BOTH[name])[2] == Verdicts(True, True, True)


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_each_documented_exception_is_real(name: str) -> None:
    """If one of these starts to agree, the exception is gone: take it out of the lists (here
    and in the README)."""
    kind, doc = EXCEPTIONS[name]
    raw, seen, v = verdicts(doc)
    assert not v.agree, f"{name} no longer disagrees: remove the documented exception"
    assert documented(raw, seen, v) == kind


def test_every_time_the_models_make_is_schema_valid() -> None:
    """The node's own output (Python datetimes, UUIDs) is what the schema describes."""
    now = datetime.now(UTC)
    for when in (now, now.astimezone(UTC).replace(microsecond=0),
                 now.astimezone(timezone_plus(5, 30)), datetime(1, 1, 2, tzinfo=UTC)):
        doc = json.loads(Envelope.model_validate(_envelope(
            {**STAMP, "path": "a"}, occurred_at=when.isoformat(),
            event_id=str(UUID(int=0)))).to_bytes())
        assert JSONSCHEMA.is_valid(doc) and fast_valid(doc), doc


def timezone_plus(hours: int, minutes: int) -> Any:
    from datetime import timezone
    return timezone(timedelta(hours=hours, minutes=minutes))

