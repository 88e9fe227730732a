"""An independent judge of what stampflow must make of one record on the requests topic.

The fuzz tests decide the expected outcome of every record here, never by asking stampflow's
own validation (``decode``, ``admit``, ``probe_identity``, pydantic models). What is taken
from stampflow is its contract, as data: the exported JSON Schemas of ``contracts.schema`` (what
``stampflow contracts export`` writes for producers in other languages), checked with the
``jsonschema`` package (Draft 2020-12, with a format checker; patterns with ECMA-262's ``$``),
and the inference node's YAML contract for the generation budget. The rules a JSON Schema
cannot express, or that the exported one does not, are restated below in plain Python, each
with the document it comes from:

- JSON (RFC 8259, UTF-8) and I-JSON (RFC 7493: no lone surrogates, no duplicate names);
- a record is *readable* when it is a JSON object whose ``namespace`` matches the namespace
  pattern and whose ``event_id`` is a UUID: such a record ends as a workflow (README: "a request
  that fails validation but whose namespace and id can be read ends as workflow.failed");
  anything less readable ends on ``<topic>.dlq``;
- ``event_type`` names the payload's ``type`` (events.py, Envelope);
- only ``stamp.requested`` and ``generation.requested`` are requests (orchestrator contract,
  ``consumes``); any other valid event fails with ``unexpected_event``;
- ``width * height <= 2048 * 2048`` (events.py, the pixel cap): ``invalid_request``;
- inline content is at most the deployment's content limit: ``too_large``;
- a path must name an existing regular file under the content root (README,
  STAMPFLOW_CONTENT_ROOT): ``outside_root`` when it leads out of the root (an absolute path
  elsewhere included), ``not_a_file`` for a directory, ``not_found`` when nothing is there,
  ``too_large`` for a file over the content limit; an ``s3://`` path is ``outside_root``
  (README, STAMPFLOW_CONTENT_OBJECTS: the tests allow no object prefixes);
- a generation's cost is within the inference contract's ``max_side``, ``max_steps`` and
  ``max_pixel_steps`` (src/contracts/specs/inference.yaml, read here as data; README,
  "Generating images"): ``over_budget``;
- a generation names a registered model (README: the built-ins ``flux-schnell`` and
  ``flux-dev`` and the keys of STAMPFLOW_MODELS), else ``unknown_model``; a registered model
  that is not on disk (the built-ins: the test's Hugging Face cache is empty and offline) fails
  with ``model_not_found``.

Where the contract leaves the outcome open, the expectation holds every acceptable outcome and
says why (``ambiguous``); the tests still require exactly one outcome per record.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from blake3 import blake3
from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from jsonschema.validators import extend

from stampflow import contracts
from stampflow.contracts.schema import schemas

SCHEMAS: dict[str, dict[str, Any]] = schemas()
ENVELOPE_SCHEMA = SCHEMAS["envelope.schema.json"]
PAYLOAD_SCHEMAS: dict[str, dict[str, Any]] = {
    name.removesuffix(".schema.json"): schema for name, schema in SCHEMAS.items()
    if name not in ("envelope.schema.json", "node-contract.schema.json")
}
REQUEST_TYPES = frozenset({"stamp.requested", "generation.requested"})
MAX_PIXELS = 2048 * 2048  # events.py's pixel cap, restated: a schema cannot multiply
BUILT_IN_MODELS = frozenset({"flux-schnell", "flux-dev"})  # README, STAMPFLOW_MODELS
# The inference node's contract, as data: what one generation may cost.
INFERENCE_POLICY: dict[str, Any] = yaml.safe_load(
    (Path(contracts.__file__).parent / "specs" / "inference.yaml").read_text())["io_policy"]

# --- outcomes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one record ends: ``completed`` or ``failed`` (a workflow) or ``dead_letter``."""

    state: str
    code: str | None = None  # the error code of a failed workflow
    hash: str | None = None  # the BLAKE3 of a completed stamp; None: not checked

    def __str__(self) -> str:
        if self.state == "failed":
            return f"failed/{self.code}"
        return self.state


DEAD_LETTER = Outcome("dead_letter")
INVALID = Outcome("failed", "invalid_request")


def failed(code: str) -> Outcome:
    return Outcome("failed", code)


def completed(data: bytes | None = None) -> Outcome:
    return Outcome("completed", None, None if data is None else blake3(data).hexdigest())


@dataclass(frozen=True)
class Expectation:
    """What one record must become. ``request_ids``: the ids it may be read under (empty when it
    must be a dead letter). More than one outcome: the contract leaves it open (``ambiguous``)."""

    outcomes: frozenset[Outcome]
    request_ids: frozenset[UUID] = frozenset()
    why: str = ""
    ambiguous: str | None = None

    def allows(self, outcome: Outcome) -> bool:
        return any(_matches(e, outcome) for e in self.outcomes)

    @property
    def certain(self) -> Outcome | None:
        return next(iter(self.outcomes)) if len(self.outcomes) == 1 else None

    def describe(self) -> str:
        text = " | ".join(sorted(str(o) for o in self.outcomes))
        return f"{text} ({self.why}{'; ambiguous: ' + self.ambiguous if self.ambiguous else ''})"


def _matches(expected: Outcome, actual: Outcome) -> bool:
    return (expected.state == actual.state and expected.code == actual.code
            and (expected.hash is None or expected.hash == actual.hash))


# --- the schema, as a JSON Schema validator sees it ---------------------------------------------


def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """``pattern`` with ECMA-262 semantics (JSON Schema's regex dialect): without flags, ``$``
    matches only at the very end, where Python's ``$`` also matches before a final newline
    (``re.search`` is what the jsonschema package uses). Only ``$`` differs in our patterns."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any,
                     ) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    compiled = _PATTERNS.get(pattern) or _PATTERNS.setdefault(pattern, ecma_pattern(pattern))
    if not compiled.search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def strict_base64(text: str) -> bytes | None:
    """RFC 4648 section 4 base64, canonical: the alphabet, padding, zero pad bits (3.5)."""
    if not _BASE64.match(text):
        return None
    data = base64.b64decode(text, validate=True)
    return data if base64.b64encode(data).decode("ascii") == text else None


def lenient_base64(text: str) -> bytes | None:
    """What a lenient (MIME, RFC 2045 6.8) decoder makes of ``text``: characters outside the
    alphabet are ignored. ``None`` when even that fails (bad padding)."""
    try:
        return base64.b64decode(text.encode("utf-8", "surrogatepass"))
    except (binascii.Error, ValueError):
        return None


FORMATS = FormatChecker()


def _is_base64(instance: object) -> bool:
    # "base64" is not a JSON Schema format; the contract means RFC 4648 base64 (the README:
    # "inline bytes (base64)"). Checked strictly; a lenient reading is judged ambiguous below.
    return not isinstance(instance, str) or strict_base64(instance) is not None


FORMATS.checks("base64")(_is_base64)


if FORMATS.conforms("2026-01-01 00:00", "date-time") or FORMATS.conforms("x", "uuid"):
    raise RuntimeError("jsonschema's format checker does not check date-time or uuid: "
                       "install rfc3339-validator (the dev extra has it)")

ContractValidator = extend(Draft202012Validator, validators={"pattern": _pattern_keyword})


def _without_payload(envelope: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(envelope)
    schema["properties"]["payload"] = {"type": "object"}
    return schema


ENVELOPE = ContractValidator(ENVELOPE_SCHEMA, format_checker=FORMATS)
ENVELOPE_FIELDS = ContractValidator(_without_payload(ENVELOPE_SCHEMA), format_checker=FORMATS)
PAYLOADS = {t: ContractValidator(s, format_checker=FORMATS) for t, s in PAYLOAD_SCHEMAS.items()}
NAMESPACE = ecma_pattern(ENVELOPE_SCHEMA["properties"]["namespace"]["pattern"])


def contract_errors(doc: Any) -> list[ValidationError]:
    """The exported schema's complaints about ``doc``, as leaves where possible: the envelope's
    fields, then the payload against the schema of the type it names (the envelope's ``oneOf``
    over the payload types, one at a time). Cross-checked against the whole envelope schema."""
    errors = list(ENVELOPE_FIELDS.iter_errors(doc))
    payload = doc.get("payload") if isinstance(doc, dict) else None
    if isinstance(payload, dict):
        kind = payload.get("type")
        if isinstance(kind, str) and kind in PAYLOADS:
            errors += [_rooted(e, "payload") for e in PAYLOADS[kind].iter_errors(payload)]
        else:
            errors.append(ValidationError(f"payload type {kind!r} is not an event type",
                                          validator="oneOf", path=["payload"]))
    untyped = isinstance(payload, dict) and "type" not in payload  # see Oracle.judge
    if not untyped and ENVELOPE.is_valid(doc) == bool(errors):
        raise AssertionError(f"oracle self-check: split and whole-envelope validation disagree "
                             f"on {doc!r:.300}")
    return errors


def _rooted(err: ValidationError, key: str) -> ValidationError:
    err.path.appendleft(key)
    return err


# --- JSON text -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    doc: Any
    not_ijson: str | None = None  # why a lenient parser was needed, if it was


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _Duplicate("duplicate names in an object")
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def parse(raw: bytes) -> Parsed | None:
    """``raw`` as RFC 8259 / I-JSON; failing that, as a lenient reader (Python's json: other
    UTFs, a BOM, NaN, duplicate names, lone surrogates) would read it, with the reason."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                         object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        strict_error: str = f"{type(err).__name__}: {err}"
    else:
        if not _lone_surrogate(doc):
            return Parsed(doc)
        return Parsed(doc, "a lone surrogate (RFC 7493 2.1)")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return Parsed(doc, strict_error[:120])


# --- lenient readings the contract does not rule out ---------------------------------------

_NUMBER_TEXT = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*\Z")


def _lax_uuid(value: Any) -> UUID | None:
    """A UUID a lenient reader could take from ``value`` (hex without hyphens, braces, urn:,
    a number whose digits are 32 hex digits), when it is not in the contract's form."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    try:
        return UUID(str(value))
    except ValueError:
        return None


def _lax_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if _NUMBER_TEXT.match(value):
        return True  # a Unix time as text
    try:
        datetime.fromisoformat(value.strip())
    except ValueError:
        return False
    return True


def _lax(err: ValidationError) -> bool:
    """Could a lenient JSON reader (coercing as most do) take this value for a valid one?

    Such values are outside the contract, so refusing them is right; but the contract does not
    say a reader must refuse them, so coercing them is not a bug of the node either."""
    v, keyword, instance = err.validator, err.validator_value, err.instance
    if v in ("anyOf", "oneOf") and err.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in err.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        return any(all(_lax(s) for s in subs) for subs in branches.values())
    if v == "type" and keyword in ("integer", "number"):
        if isinstance(instance, bool):
            return True
        return isinstance(instance, str) and bool(_NUMBER_TEXT.match(instance))
    if v == "type" and keyword == "string" and err.schema.get("format") == "date-time":
        return isinstance(instance, int | float) and not isinstance(instance, bool)  # Unix time
    if v == "const":
        return instance is True and keyword == 1
    # UUIDs and times are said by pattern (and "no final newline") as well as by format.
    fmt = err.schema.get("format") if v in ("format", "pattern", "not") else None
    if fmt == "uuid":
        return _lax_uuid(instance) is not None
    if fmt == "date-time":
        return _lax_datetime(instance)
    if v == "format" and keyword == "base64":
        return isinstance(instance, str) and lenient_base64(instance) is not None
    return False


def _lax_errors(err: ValidationError) -> list[ValidationError]:
    if err.validator in ("anyOf", "oneOf") and err.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in err.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        for subs in branches.values():
            if all(_lax(s) for s in subs):
                return [leaf for s in subs for leaf in _lax_errors(s)]
    return [err]


def _coerced(err: ValidationError) -> Any:
    v, keyword, instance = err.validator, err.validator_value, err.instance
    if v == "type" and keyword == "string":
        return "2026-01-01T00:00:00Z"
    if v == "type":
        if isinstance(instance, bool):
            return int(instance)
        number = float(instance)
        return int(number) if keyword == "integer" and number.is_integer() else number
    if v == "const":
        return 1
    fmt = err.schema.get("format") if v in ("format", "pattern", "not") else None
    if fmt == "uuid":
        return str(_lax_uuid(instance))
    if fmt == "date-time":
        return "2026-01-01T00:00:00Z"
    if v == "format" and keyword == "base64":
        return base64.b64encode(lenient_base64(instance) or b"").decode("ascii")
    raise AssertionError(f"no coercion for {err}")


def _set(doc: Any, path: Iterable[Any], value: Any) -> None:
    keys = list(path)
    for key in keys[:-1]:
        doc = doc[key]
    doc[keys[-1]] = value


# --- the judge -------------------------------------------------------------------------------


@dataclass
class ContentRoot:
    """The content root's inventory, as the test built it (no symlinks inside)."""

    root: Path
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> content
    dirs: set[str] = field(default_factory=set)

    def add_file(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[rel] = data
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dirs.add("/".join(parts[:i]))

    def add_dir(self, rel: str) -> None:
        (self.root / rel).mkdir(parents=True, exist_ok=True)
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            self.dirs.add("/".join(parts[:i]))


class Oracle:
    def __init__(self, content: ContentRoot, *, max_content_bytes: int,
                 models: Iterable[str] = ()) -> None:
        self.content = content
        self.root = os.path.realpath(content.root)
        self.max_content_bytes = max_content_bytes
        self.models = frozenset(models)
        self.default_model: str = PAYLOAD_SCHEMAS["generation.requested"]["properties"][
            "model"]["default"]

    # -- one record --

    def expect(self, raw: bytes) -> Expectation:
        parsed = parse(raw)
        if parsed is None:
            return Expectation(frozenset({DEAD_LETTER}), why="not JSON")
        doc = parsed.doc
        if not isinstance(doc, dict):
            return Expectation(frozenset({DEAD_LETTER}), why="not a JSON object")
        namespace, event_id = doc.get("namespace"), doc.get("event_id")
        if not (isinstance(namespace, str) and NAMESPACE.search(namespace)):
            return Expectation(frozenset({DEAD_LETTER}), why="namespace unreadable")
        if isinstance(event_id, str) and FORMATS.conforms(event_id, "uuid"):
            ids, lax_id = frozenset({UUID(event_id)}), False
        elif (lax := _lax_uuid(event_id)) is not None:
            ids, lax_id = frozenset({lax}), True
        else:
            return Expectation(frozenset({DEAD_LETTER}), why="event_id unreadable")
        # A value no JSON reader can represent faithfully (a lone surrogate, NaN) leaves only a
        # dead letter or a refusal; a BOM or duplicate names leave the lenient reading open.
        unrepresentable = parsed.not_ijson is not None and (
            "lone surrogate" in parsed.not_ijson or "is not JSON" in parsed.not_ijson)
        outcomes, why, ambiguous = ((frozenset(), "not I-JSON", None) if unrepresentable
                                    else self.judge(doc))
        notes = [ambiguous] if ambiguous else []
        if lax_id:
            outcomes |= {DEAD_LETTER, INVALID}
            notes.append(f"event_id {event_id!r:.60} is a UUID only to a lenient reader")
        if parsed.not_ijson:
            outcomes |= {DEAD_LETTER, INVALID}  # not (I-)JSON to a strict reader
            notes.append(f"not I-JSON ({parsed.not_ijson})")
        return Expectation(frozenset(outcomes), ids, why, "; ".join(notes) or None)

    def judge(self, doc: dict[str, Any]) -> tuple[frozenset[Outcome], str, str | None]:
        """A readable record: (acceptable outcomes, the deciding rule, why ambiguous)."""
        payload = doc.get("payload")
        if isinstance(payload, dict) and "type" not in payload:
            # The schema gives every payload's "type" a default and requires it nowhere, so its
            # oneOf takes a payload without one as whichever type it fits; the discriminator
            # beside it (an OpenAPI keyword) selects by "type", which is then missing.
            fits = [t for t, v in PAYLOADS.items() if v.is_valid(payload)]
            if len(fits) == 1:
                more, why, _ = self.judge({**doc, "payload": {**payload, "type": fits[0]}})
                return (frozenset({INVALID}) | more, "payload without a type",
                        f"the schema's oneOf takes it as {fits[0]} (then: {why}), its "
                        "discriminator needs the type")
        errors = contract_errors(doc)
        if errors:
            if all(_lax(e) for e in errors):
                fixed = copy.deepcopy(doc)
                for err in errors:
                    for leaf in _lax_errors(err):
                        _set(fixed, leaf.absolute_path, _coerced(leaf))
                more, why, _ = self.judge(fixed)
                shown = "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message:.80}"
                                  for e in errors)
                return (frozenset({INVALID}) | more, f"contract: {shown}",
                        f"only a lenient reader takes it (then: {why})")
            first = errors[0]
            return (frozenset({INVALID}),
                    f"contract: {'.'.join(map(str, first.absolute_path)) or '(record)'}: "
                    f"{first.message:.120}", None)
        payload = doc["payload"]
        if doc["event_type"] != payload["type"]:
            return frozenset({INVALID}), "event_type is not the payload's type", None
        if payload["type"] not in REQUEST_TYPES:
            return frozenset({failed("unexpected_event")}), "not a request", None
        if payload["type"] == "generation.requested":
            return self._generation(payload)
        return self._stamp(payload)

    # -- requests --

    def _generation(self, payload: dict[str, Any]) -> tuple[frozenset[Outcome], str, None]:
        props = PAYLOAD_SCHEMAS["generation.requested"]["properties"]
        width = payload.get("width", props["width"]["default"])
        height = payload.get("height", props["height"]["default"])
        steps = payload.get("num_inference_steps", props["num_inference_steps"]["default"])
        if width * height > MAX_PIXELS:
            return frozenset({INVALID}), f"{width}x{height} over the pixel cap", None
        side, most_steps = INFERENCE_POLICY.get("max_side"), INFERENCE_POLICY.get("max_steps")
        pixel_steps = INFERENCE_POLICY.get("max_pixel_steps")
        if ((side is not None and max(width, height) > side)
                or (most_steps is not None and steps > most_steps)
                or (pixel_steps is not None and width * height * steps > pixel_steps)):
            return (frozenset({failed("over_budget")}),
                    f"{width}x{height} at {steps} steps over the node's budget", None)
        model = payload.get("model", self.default_model)
        if model in self.models:
            return frozenset({completed()}), f"model {model!r} is installed", None
        if model in BUILT_IN_MODELS:
            return frozenset({failed("model_not_found")}), "a built-in model not on disk", None
        return frozenset({failed("unknown_model")}), "no model of that name", None

    def _stamp(self, payload: dict[str, Any]) -> tuple[frozenset[Outcome], str, str | None]:
        content = payload.get("content")
        if content is not None:
            data = strict_base64(content)
            assert data is not None  # the format check passed
            if len(data) > self.max_content_bytes:
                return (frozenset({failed("too_large")}),
                        f"{len(data)} bytes over the limit of {self.max_content_bytes}", None)
            return frozenset({completed(data)}), f"inline content of {len(data)} bytes", None
        return self._path(payload["path"])

    def _path(self, path: str) -> tuple[frozenset[Outcome], str, str | None]:
        if path[:5].lower() == "s3://":
            # An object URI (README, STAMPFLOW_CONTENT_OBJECTS): the tests' deployments allow
            # no object prefixes, so every s3:// path is refused.
            return frozenset({failed("outside_root")}), "an s3:// path, no objects allowed", None
        joined = path if path.startswith("/") else f"{self.root}/{path}"
        # Under the root by name (".." taken lexically), and by where the path really leads
        # (symlinks outside the root followed: /proc/self/root/<root>/a.txt is a.txt).
        candidates = [posixpath.normpath(joined), os.path.realpath(joined)]
        inside = [c for c in candidates if c == self.root or c.startswith(self.root + "/")]
        outcomes: set[Outcome] = set()
        notes: list[str] = []
        if len(inside) < len(candidates):
            outcomes.add(failed("outside_root"))
        if not inside:
            return frozenset(outcomes), "path leads out of the root", None
        if len(inside) < len(candidates):
            notes.append("under the root by one reading of the path and not by the other")
        rel = posixpath.relpath(inside[0], self.root)
        by_name = self._kind(rel)
        # The kernel's view of the same string: "missing/../a.txt", "a.txt/" or a path over
        # PATH_MAX name nothing to open(2), though lexically they name a file.
        try:
            mode = os.stat(joined).st_mode
        except (OSError, ValueError):
            by_kernel = "missing"
        else:
            by_kernel = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
            if by_kernel == "file" and by_name != "file":
                raise AssertionError(f"oracle: {path!r:.80} opens a file the test did not make")
        outcomes |= {self._path_outcome(by_name, rel), self._path_outcome(by_kernel, rel)}
        if by_name != by_kernel:
            notes.append(f"resolved by name it is {by_name}, by the kernel {by_kernel}")
        why = f"path names {by_name} {rel!r:.60}"
        return frozenset(outcomes), why, ("; ".join(notes) + ": the contract does not say "
                                          "which") if notes else None

    def _kind(self, rel: str) -> str:
        if rel == "." or rel in self.content.dirs:
            return "dir"
        return "file" if rel in self.content.files else "missing"

    def _path_outcome(self, kind: str, rel: str) -> Outcome:
        if kind == "file":
            data = self.content.files[rel]
            return completed(data) if len(data) <= self.max_content_bytes else failed("too_large")
        if kind == "dir":
            return failed("not_a_file")
        return failed("not_found")


# --- checks on what the nodes wrote ------------------------------------------------------------

LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # str.splitlines() boundaries


def one_line(text: str) -> bool:
    """One line for any reader: no character ``str.splitlines`` (Unicode) breaks a line at."""
    return bool(text) and not LINE_BREAKS.intersection(text) and "\x00" not in text


def summarize(expectations: Iterable[Expectation]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in expectations:
        key = "ambiguous" if len(e.outcomes) > 1 else str(e.certain)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
