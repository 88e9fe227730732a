"""Hypothesis strategies for requests built from stampflow's exported JSON Schemas, leaning on
the worst values each field allows: control characters, the longest strings, astral-plane
characters, combining marks, bidi controls, line and paragraph separators, zero-width
characters, numbers at their bounds, the largest inline content, hostile paths.

Every field's values come from its exported schema: ``hypothesis_jsonschema.from_schema`` for
typical values, and :func:`extremes` (bounds, lengths and patterns read from the same schema)
for the worst ones. Objects are assembled here from the schema's ``properties`` and
``required`` rather than by ``from_schema`` on the whole object: hypothesis-jsonschema 0.23.1's
object strategy fails with this hypothesis (``'many' object has no attribute 'more'``).

The strategies make records, not verdicts: what each record must become is decided by
``tests.oracle``. Most records are valid to the contract; a share (``broken``) break exactly
one rule, so the nodes meet refusals, dead letters and the contract's grey zones too.
"""

from __future__ import annotations

import base64
import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from tests.oracle import (
    ENVELOPE_SCHEMA,
    FORMATS,
    INFERENCE_POLICY,
    MAX_PIXELS,
    PAYLOAD_SCHEMAS,
    ecma_pattern,
)

STAMP = PAYLOAD_SCHEMAS["stamp.requested"]
GENERATION = PAYLOAD_SCHEMAS["generation.requested"]
UUIDS = st.uuids().map(str)
# A few bytes of base64 for typical content; the large ones come from ``content_bytes``.
CUSTOM_FORMATS = {"uuid": UUIDS,
                  "base64": st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())}

# Short pieces that, repeated to a field's limit, make its worst strings. No NUL: the contract
# refuses it in every text field (a ``broken`` record carries it instead).
NASTY_UNITS: tuple[str, ...] = (
    "\x01", "\x1f", "\x7f", "\t", "\n", "\r\n", "\x1b[31m", "\x85", "\u2028", "\u2029",
    "\u200b", "\u200d", "\ufeff", "\u202e", "\u200f", "\u061c", "\u2066", "e\u0301", "\u0301",
    "Z\u0351\u0352\u0353\u0354", "\U0001F600", "\U0001F469\u200d\U0001F4BB", "\U0010FFFF",
    "\ufffd", "\uffff", "\ufdd0", "\U000E0041", "\u0130", "\u00df", "\ufb03", "\u00a0", "\u3000",
    "'", '"', "\\", "%00", "%n", "{{x}}", "$(id)", "'; DROP TABLE workflows; --", "../", "/",
    "~", "*?[", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u05e2\u05d1\u05e8\u05d9\u05ea",
    "\U0001D518", "\ud7ff", "\ue000",
)
ASTRAL = "\U0001F600"
TEXT_PATTERN: str = ENVELOPE_SCHEMA["properties"]["source"]["pattern"]  # ^[^\x00]*$
PATH_SCHEMA = next(b for b in STAMP["properties"]["path"]["anyOf"] if b.get("type") == "string")


@contextmanager
def reproducible_draws() -> Iterator[None]:
    """Hypothesis also draws constants it finds in the local modules loaded so far (here the
    src/ packages), so the same seed would draw differently depending on which modules a test
    run happened to import (one file, or the whole suite) and on every constant anyone adds to
    src/. Inside this block it draws only its own global constants: a seed means one draw.
    A hypothesis without that machinery is left as it is."""
    try:
        from hypothesis.internal.conjecture import providers
        empty = type(providers._local_constants)()
        saved = providers._get_local_constants
        cache = providers.CONSTANTS_CACHE.cache
    except (ImportError, AttributeError, TypeError):
        yield
        return
    cache.clear()
    providers._get_local_constants = lambda: empty  # type: ignore[assignment]
    try:
        yield
    finally:
        providers._get_local_constants = saved  # type: ignore[assignment]
        cache.clear()


def fill(unit: str, length: int) -> str:
    """``unit`` repeated and cut to exactly ``length`` code points (a combining sequence may be
    cut in two at the end: that is a worst case too)."""
    return (unit * (length // len(unit) + 1))[:length]


def _units() -> st.SearchStrategy[str]:
    return st.sampled_from(NASTY_UNITS) | st.text(
        st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6)


def _valid(schema: dict[str, Any], value: Any) -> bool:
    pattern = schema.get("pattern")
    if pattern is not None and not ecma_pattern(pattern).search(value):
        return False
    fmt = schema.get("format")
    return fmt is None or FORMATS.conforms(value, fmt)


def extremes(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The worst values ``schema`` allows, read from its bounds, lengths and patterns."""
    if "anyOf" in schema:
        return st.one_of([extremes(s) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", -(2**63))
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**63) - 1)
        step = schema.get("multipleOf", 1)
        low, high = -(-low // step) * step, high // step * step
        return st.sampled_from(sorted({low, low + step, high - step, high}))
    if kind == "number":
        low, high = schema.get("minimum", -1e308), schema.get("maximum", 1e308)
        return st.sampled_from([low, high, math.nextafter(low, math.inf),
                                math.nextafter(high, -math.inf), low + 5e-324, (low + high) / 2,
                                int(low), int(high)])
    if kind == "string":
        if schema.get("format") == "uuid":
            return st.sampled_from(["00000000-0000-0000-0000-000000000000",
                                    "ffffffff-ffff-ffff-ffff-ffffffffffff"]) | UUIDS.map(str.upper)
        if schema.get("format") == "date-time":
            return st.sampled_from([
                "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999-23:59",
                "1970-01-01T00:00:00Z", "2026-11-23t10:00:00.123456789z",
                "2038-01-19T03:14:08+00:00", "2000-02-29T23:59:59.000001-00:00"])
        if "format" in schema:
            return from_schema(schema, custom_formats=CUSTOM_FORMATS)
        shortest, longest = schema.get("minLength", 0), schema.get("maxLength", 4096)
        if "pattern" in schema and schema["pattern"] != TEXT_PATTERN:
            # A narrow pattern (the namespace): the shortest and the longest words it takes,
            # of a few shapes.
            words = []
            for head, tail in (("a", "a"), ("z", "-"), ("9", "_"), ("0", "_-")):
                fits = [w for w in (head + fill(tail, n) for n in range(128))
                        if _valid(schema, w)]
                words += [fits[0], fits[-1]] if fits else []
            drawn = from_schema(schema, custom_formats=CUSTOM_FORMATS)
            return st.sampled_from(sorted(set(words))) | drawn if words else drawn
        lengths = st.sampled_from(sorted({max(shortest, 1), longest, max(shortest, longest - 1)}))
        strings = st.builds(fill, _units(), lengths)
        if shortest == 0:
            strings |= st.just("")
        return strings.filter(lambda s: _valid(schema, s))
    raise AssertionError(f"no extremes for {schema}")


_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {}


def typical(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """hypothesis-jsonschema's values for ``schema``. The text pattern ``^[^\\x00]*$`` becomes
    its own ``allow_x00=False`` (the same strings, drawn without the regex machinery, which
    took most of the drawing time)."""
    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()
                    if not (k == "pattern" and v == TEXT_PATTERN)}
        if isinstance(node, list):
            return [plain(v) for v in node]
        return node
    return from_schema(plain(schema), custom_formats=CUSTOM_FORMATS, allow_x00=False)


def field_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Typical values (hypothesis-jsonschema) and worst values, half and half."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _FIELD_VALUES:
        _FIELD_VALUES[key] = typical(schema) | extremes(schema)
    return _FIELD_VALUES[key]


def _limit(schema: dict[str, Any], key: str) -> Any:
    for branch in schema.get("anyOf", [schema]):
        if key in branch:
            return branch[key]
    raise KeyError(key)


# --- content and paths -------------------------------------------------------------------------
# Structure (which family, which field, which mistake) comes from a ``random.Random`` seeded by
# one hypothesis draw per record, so the mix follows the stated weights (hypothesis favours the
# first alternatives and small integers); the values themselves are hypothesis draws.


def content_bytes(rng: random.Random, limit: int) -> bytes:
    """Inline content: mostly small; one in forty at the content limit (one byte under, at,
    one over)."""
    roll = rng.random()
    if roll < 1 / 40:
        return rng.randbytes(rng.choice([limit - 1, limit, limit + 1]))
    if roll < 0.1:
        return rng.choice([b"", b"\x00", b"\xff\xfe", "\u2028".encode(), b"%PDF-1.7\n",
                           b"\x89PNG\r\n\x1a\n", b"\xef\xbb\xbf<?xml", b"{}"])
    return rng.randbytes(rng.randint(1, 64))


@dataclass(frozen=True)
class PathWorld:
    """What the path strategy may aim at: the content root and the names made in it."""

    root: str
    names: tuple[str, ...]
    dirs: tuple[str, ...]


PATH_MAX = 4096  # Linux's, and the schema's maxLength for a path


def long_paths(world: PathWorld) -> list[str]:
    """Long paths, each cut to PATH_MAX: a fixed number of them whatever the root's length, so
    that the draws do not depend on where the test's temporary directory is."""
    root_name = world.root.rstrip("/").rsplit("/", 1)[-1]
    return [p[:PATH_MAX] for p in [
        "./" * ((PATH_MAX - 5) // 2) + "a.txt",               # PATH_MAX with the root on top
        "a/" * (PATH_MAX // 2),                               # 2048 levels of nothing
        "../" * 1365 + "etc/hosts",                           # climbs far out
        "x" * PATH_MAX,                                       # one name, 16 times NAME_MAX
        ASTRAL * (PATH_MAX // 4),                             # 1024 code points, 4 KiB
        ASTRAL * PATH_MAX,                                    # 4096 code points, 16 KiB
        "sub/../" * 584 + "a.txt",                            # long way back to a real file
        f"../{root_name}/" * 100 + "a.txt",                   # out and back in, a hundred times
        world.root + "/" + "./" * max(0, (PATH_MAX - len(world.root) - 7) // 2) + "a.txt",
    ]]


@st.composite
def path_values(draw: st.DrawFn, rng: random.Random, world: PathWorld) -> str:
    """Paths as hostile clients write them: ``../`` escapes, absolute paths in and out of the
    root, ``.`` and empty segments, NAME_MAX and PATH_MAX, nasty names, trailing slashes."""
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(world.names)
    if roll < 0.30:
        return rng.choice(long_paths(world))
    if roll < 0.40:  # anything the schema allows
        return str(draw(field_values(PATH_SCHEMA)))
    root_name = world.root.rstrip("/").rsplit("/", 1)[-1]
    segments = []
    for _ in range(rng.randint(1, 6)):
        pick = rng.random()
        if pick < 0.4:
            segments.append(rng.choice(world.names + world.dirs))
        elif pick < 0.75:
            segments.append(rng.choice(["..", ".", "", "missing", "x" * 255, "x" * 256,
                                        ASTRAL * 63, ASTRAL * 64, "etc", "hosts", "\u202e",
                                        "e\u0301.txt", "\u00e9.txt", "sub", "dir"]))
        else:
            segments.append(draw(_units()))
    prefix = rng.choice(["", "", "", "", "/", "./", "../", "../../../../", world.root + "/",
                         f"../{root_name}/", "//", "/proc/self/root" + world.root + "/",
                         "/etc/", "~/"])
    suffix = rng.choice(["", "", "", "", "/", "/.", "/..", "\n", " ", "\u2028"])
    path = (prefix + "/".join(segments) + suffix) or "."
    return path[:PATH_MAX]


# --- requests ------------------------------------------------------------------------------------

REQUEST_FIELDS = ("event_id", "namespace", "correlation_id", "causation_id", "occurred_at",
                  "source", "event_version")
REQUESTS = frozenset({"stamp.requested", "generation.requested"})


@dataclass
class Case:
    """One drawn request: its family (for the summary), the document, and how it is written."""

    family: str
    doc: dict[str, Any]
    ascii_only: bool = True


@st.composite
def objects(draw: st.DrawFn, rng: random.Random, schema: dict[str, Any],
            skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """An object valid to ``schema`` (except for the pixel cap and the stamp's one-of, which
    the callers see to): its required properties and about half of the optional ones, each
    from :func:`field_values` (nested maps from their ``additionalProperties``)."""
    doc: dict[str, Any] = {}
    for name, sub in schema["properties"].items():
        if name in skip or (name not in schema.get("required", []) and rng.random() < 0.5):
            continue
        if sub.get("type") == "object":
            doc[name] = draw(st.dictionaries(st.text(max_size=12), field_values(
                sub["additionalProperties"]), max_size=3))
        else:
            doc[name] = draw(field_values(sub))
    return doc


@st.composite
def stamp_payload(draw: st.DrawFn, rng: random.Random, world: PathWorld, limit: int,
                  ) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": "stamp.requested"}
    if rng.random() < 0.5:
        payload["content"] = base64.b64encode(content_bytes(rng, limit)).decode()
        if rng.random() < 0.3:
            payload["path"] = None
    else:
        payload["path"] = draw(path_values(rng, world))
        if rng.random() < 0.3:
            payload["content"] = None
    if rng.random() < 0.5:
        payload["content_type"] = draw(field_values(STAMP["properties"]["content_type"]))
    return payload


MODEL_NAMES = (
    "flux-schnell", "flux-dev", ".", "..", "/", "~", "~root", "a/b", "../../etc", "/etc/passwd",
    "\u2028", "black-forest-labs/FLUX.1-schnell", "x" * 200, "tests", "src/contracts",
)


@st.composite
def generation_payload(draw: st.DrawFn, rng: random.Random, installed: frozenset[str],
                       ) -> dict[str, Any]:
    """A generation for a model that is not installed: extremes are cheap when the node refuses
    them before any pipeline runs (the installed model gets :func:`installed_generations`)."""
    payload = {**draw(objects(rng, GENERATION, skip=frozenset({"type"}))),
               "type": "generation.requested"}
    if rng.random() < 0.3:
        payload["model"] = rng.choice(MODEL_NAMES)
    if rng.random() < 0.2:  # at the inference contract's budget, and one past it
        payload["width"], payload["height"], payload["num_inference_steps"] = rng.choice(
            budget_edges())
    default = GENERATION["properties"]["model"]["default"]
    if payload.get("model", default) in installed:
        payload["model"] = "not-" + payload["model"]
    return payload


def budget_edges() -> list[tuple[int, int, int]]:
    """(width, height, steps) at the inference contract's caps and one step past them."""
    side, steps = INFERENCE_POLICY["max_side"], INFERENCE_POLICY["max_steps"]
    pixel_steps = INFERENCE_POLICY["max_pixel_steps"]
    unit = GENERATION["properties"]["width"]["multipleOf"]
    edges = [(side, unit, 1), (side + unit, unit, 1), (unit, unit, steps), (unit, unit, steps + 1)]
    for n in (1, 2, 4, 8):
        w = min(side, pixel_steps // n // unit // unit * unit)
        h = pixel_steps // n // w // unit * unit
        edges += [(w, h, n), (w, h + unit, n)]
    return edges


def installed_generations(model: str) -> list[dict[str, Any]]:
    """A handful of generations the installed (tiny) model really runs, at the schema's bounds:
    the largest seed, the smallest and the largest side (at the pixel cap), the most steps,
    the highest guidance and true-CFG scale with a negative prompt, prompts at full length."""
    props = GENERATION["properties"]
    top_seed = _limit(props["seed"], "exclusiveMaximum") - 1
    most_chars = props["prompt"]["maxLength"]
    lo_side, hi_side = props["width"]["minimum"], props["width"]["maximum"]
    most_steps = INFERENCE_POLICY["max_steps"]
    # Small sides: the PNG is stamped, and its random-weight noise must stay under the test's
    # content limit (a larger image fails with too_large, correctly, but says nothing new).
    cases: list[dict[str, Any]] = [
        {"prompt": fill(ASTRAL, most_chars), "width": lo_side, "height": lo_side,
         "num_inference_steps": props["num_inference_steps"]["minimum"], "seed": top_seed,
         "guidance_scale": props["guidance_scale"]["maximum"]},
        {"prompt": fill("e\u0301\u202e\u2028", most_chars), "width": lo_side, "height": lo_side,
         "num_inference_steps": most_steps, "seed": 0},
        {"prompt": "a red cat", "negative_prompt": fill("\u200b\U0001F469\u200d\U0001F4BB",
                                                        most_chars),
         "true_cfg_scale": props["true_cfg_scale"]["maximum"], "width": 2 * lo_side,
         "height": lo_side, "num_inference_steps": 2, "seed": top_seed - 1},
        {"prompt": "p", "width": 3 * lo_side, "height": lo_side, "num_inference_steps": 1,
         "guidance_scale": 5e-324, "true_cfg_scale": math.nextafter(1.0, 2.0), "seed": 1},
        # Refused before any pipeline runs: over the node's side cap, at the pixel cap; and
        # one step over the node's step cap.
        {"prompt": "\x01\x7f\x85", "width": hi_side, "height": MAX_PIXELS // hi_side,
         "num_inference_steps": 1},
        {"prompt": "q", "width": lo_side, "height": lo_side, "num_inference_steps": most_steps + 1},
    ]
    return [{"type": "generation.requested", "model": model, **c} for c in cases]


def _request(payload: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "event_type": payload["type"], "payload": payload}


@st.composite
def broken(draw: st.DrawFn, rng: random.Random, base: dict[str, Any],
           ) -> tuple[str, dict[str, Any]]:
    """``base`` (a request) with one rule broken: the mistakes a producer in another language
    makes, the NUL the contract refuses in every text field, and values outside the contract
    that a lenient reader could take for valid ones."""
    doc = {**base, "payload": dict(base["payload"])}
    payload = doc["payload"]
    how = rng.choice(["nul"] * 6 + [
        "too_long", "lone_surrogate", "out_of_range", "pixel_cap", "sources", "event_type",
        "extra_field", "base64", "unreadable", "lax"])
    if how in ("nul", "too_long", "lone_surrogate"):
        texts = [("payload", k) for k in ("path", "content_type", "prompt", "negative_prompt",
                                          "model") if isinstance(payload.get(k), str)]
        texts.append(("", "source"))
        where, key = rng.choice(texts)
        target = payload if where else doc
        text: str = target[key]
        if how == "nul":
            at = rng.randint(0, len(text))
            target[key] = text[:at] + "\x00" * rng.randint(1, 2) + text[at:]
        elif how == "too_long":
            schema = PAYLOAD_SCHEMAS[payload["type"]] if where else ENVELOPE_SCHEMA
            target[key] = fill(draw(_units()), _limit(schema["properties"][key], "maxLength") + 1)
        else:
            target[key] = text + rng.choice(["\ud800", "\udfff", "\udc00x"])
    elif how == "out_of_range":
        field, value = rng.choice([
            ("width", 4112), ("height", 0), ("width", 24), ("num_inference_steps", 0),
            ("num_inference_steps", 101), ("seed", 2**63), ("seed", -1),
            ("guidance_scale", math.nextafter(30.0, 31.0)), ("true_cfg_scale", 0.999),
            ("guidance_scale", -5e-324), ("width", 64.5)])
        doc["event_type"] = "generation.requested"
        doc["payload"] = {"type": "generation.requested", "prompt": "p", "model": "tiny",
                          "width": 16, "height": 16, field: value}
    elif how == "pixel_cap":
        doc["event_type"] = "generation.requested"
        doc["payload"] = {"type": "generation.requested", "prompt": "p", "width": 4096,
                          "height": rng.choice([1040, 4096]), "model": "tiny"}
    elif how == "sources":
        doc["event_type"] = "stamp.requested"
        doc["payload"] = rng.choice([
            {"type": "stamp.requested"}, {"type": "stamp.requested", "path": None},
            {"type": "stamp.requested", "path": "a.txt", "content": ""},
            {"type": "stamp.requested", "path": None, "content": None}])
    elif how == "event_type":
        doc["event_type"] = rng.choice([t for t in (
            "generation.requested", "stamp.requested", "workflow.failed", "STAMP.REQUESTED",
            "stamp.requested\n", "") if t != payload["type"]])
    elif how == "extra_field":
        target = payload if rng.random() < 0.5 else doc
        target[rng.choice(["\x00", "\u2028", "extra", "Type", "payload\n", "\x85"])] = 1
    elif how == "base64":
        doc["event_type"] = "stamp.requested"
        doc["payload"] = {"type": "stamp.requested", "content": rng.choice([
            "-_-_", "YWJj\nZGVm", " YQ==", "YQ", "YQ===", "YR==", "!!!!", "YW Jj", "Y",
            "aGVsbG8gd29ybGQ-", "\u2028YQ==", "YQ==\x00", "\U0001F600YQ=="])}
    elif how == "unreadable":
        gone: tuple[str, str | None] = rng.choice([
            ("namespace", "acme\n"), ("namespace", "Acme"), ("namespace", "a\x00"),
            ("namespace", "a" * 64), ("namespace", ""), ("namespace", None),
            ("namespace", "\u0430cme"), ("event_id", "not-a-uuid"), ("event_id", None),
            ("event_id", ""), ("event_id", "00000000-0000-0000-0000-00000000000g")])
        if gone[1] is None:
            doc.pop(gone[0])
        else:
            doc[gone[0]] = gone[1]
    else:  # lax
        lax: tuple[str, object] = rng.choice([
            ("event_version", True), ("occurred_at", 1700000000),
            ("occurred_at", "2026-11-23 10:00:00Z"), ("correlation_id", "0" * 32),
            ("event_id", "{" + draw(UUIDS) + "}"), ("event_id", "urn:uuid:" + draw(UUIDS))])
        doc[lax[0]] = lax[1]
    return f"broken:{how}", doc


@st.composite
def nasty_requests(draw: st.DrawFn, world: PathWorld, limit: int,
                   installed: frozenset[str]) -> Case:
    """One request: 88 in 100 are valid to the contract, with the worst values (stamps of
    content, stamps of paths, generations, other events), 12 in 100 have one rule broken."""
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))
    fields = draw(objects(rng, ENVELOPE_SCHEMA, skip=frozenset({"event_type", "payload"})))
    roll = rng.random()
    if roll < 0.86:
        payload = draw(stamp_payload(rng, world, limit))
        family = "stamp:content" if payload.get("content") is not None else "stamp:path"
    elif roll < 0.97:
        family, payload = "generation", draw(generation_payload(rng, installed))
    else:  # a valid event that is not a request, on the requests topic
        # (the inference node's job and result nest other payloads, which ``objects`` does not
        # draw; admission refuses them by their type like every other event: test_inference_handoff)
        kind = rng.choice(sorted(set(PAYLOAD_SCHEMAS) - REQUESTS
                                 - {"inference.job", "inference.result"}))
        family, payload = "event", {**draw(objects(rng, PAYLOAD_SCHEMAS[kind])), "type": kind}
    doc = _request(payload, fields)
    if rng.random() < 0.12:
        family, doc = draw(broken(rng, doc))
    # Written as ASCII JSON (\u escapes) or as raw UTF-8; a lone surrogate needs the escapes.
    return Case(family, doc, ascii_only=rng.random() < 0.5 or family == "broken:lone_surrogate")
