"""Event and node contracts: validation, clear errors, schema export."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from uuid import RFC_4122, UUID, uuid4, uuid5

import pytest
from pydantic import ValidationError

from stampflow import contracts
from stampflow.contracts.events import (
    EVENT_TYPES,
    Envelope,
    GenerationRequested,
    StampRequested,
    WorkflowCompleted,
    decode,
    derive_id,
    derive_seed,
    envelope_for,
    new_event_id,
    probe_identity,
)
from stampflow.contracts.nodes import ContractError, load_contract, load_contracts, parse_contract
from stampflow.contracts.schema import export_schemas

SPECS = Path(contracts.__file__).parent / "specs"


def _request(**payload: object) -> dict[str, object]:
    event_id = str(uuid4())
    return {
        "event_id": event_id, "event_type": "stamp.requested", "namespace": "ns1",
        "correlation_id": event_id, "occurred_at": "2026-01-01T00:00:00Z", "source": "t",
        "payload": {"type": "stamp.requested", **payload},
    }


def test_public_surface_is_pinned() -> None:
    assert sorted(contracts.__all__) == sorted([
        "EVENT_TYPES", "ContractError", "Envelope", "FsmSpec", "GenerationCompleted",
        "GenerationRequested", "IoPolicy", "NodeContract", "NodeKind", "Payload",
        "StampCreated", "StampRequested", "WorkflowCompleted", "WorkflowFailed",
        "WorkflowTransitioned", "builtin_contract", "decode", "derive_id", "load_contract",
        "load_contracts", "new_event_id",
    ])


def test_envelope_round_trip() -> None:
    raw = json.dumps(_request(content=base64.b64encode(b"hello").decode())).encode()
    env = decode(raw)
    assert isinstance(env.payload, StampRequested)
    assert env.payload.content == b"hello"
    assert decode(env.to_bytes()) == env
    # A request is keyed by its own id (a namespace spreads over every partition) ...
    assert env.key() == str(env.event_id).encode()
    # ... and every event of a workflow by the workflow's id (its events keep their order).
    done = envelope_for(WorkflowCompleted(workflow_id=uuid.UUID(int=7), workflow_kind="stamp",
                                          duration_ms=1.0),
                        namespace="ns1", event_id=uuid.uuid4(), correlation_id=env.event_id,
                        causation_id=None, source="t")
    assert done.key() == str(uuid.UUID(int=7)).encode()


def test_envelope_is_frozen_and_forbids_extra_fields() -> None:
    doc = _request(path="a.txt")
    doc["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        decode(json.dumps(doc).encode())
    env = decode(json.dumps(_request(path="a.txt")).encode())
    with pytest.raises(ValidationError):
        env.namespace = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(event_type="stamp.created"), "does not match payload type"),
        (lambda d: d["payload"].update(type="nope"), "union_tag_invalid"),
        (lambda d: d.update(namespace="Bad Namespace!"), "namespace"),
        (lambda d: d.update(occurred_at="2026-01-01T00:00:00"), "timezone"),
        (lambda d: d["payload"].update(content="aGk="), "exactly one of"),
        (lambda d: d.update(event_version=2), "event_version"),
    ],
)
def test_envelope_rejects(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    doc = _request(path="a.txt")
    mutate(doc)
    with pytest.raises(ValidationError) as err:
        decode(json.dumps(doc).encode())
    assert needle in str(err.value) or needle in json.dumps(err.value.errors(), default=str)


def test_generation_limits() -> None:
    assert GenerationRequested(prompt="cat").width == 512
    for bad in ({"width": 500}, {"height": 8}, {"num_inference_steps": 0},
                {"num_inference_steps": 101}, {"prompt": "x" * 2001}, {"prompt": ""},
                {"width": 4096, "height": 4096}):
        with pytest.raises(ValidationError):
            GenerationRequested(**{"prompt": "cat", **bad})  # type: ignore[arg-type]


def test_derived_ids_and_seeds_are_deterministic() -> None:
    rid = uuid4()
    assert derive_id(rid, "workflow") == derive_id(rid, "workflow")
    assert derive_id(rid, "workflow") != derive_id(rid, "t1")
    assert derive_seed(rid) == derive_seed(rid)
    assert 0 <= derive_seed(rid) < 2**63


def test_ids_derived_from_a_random_parent_are_the_uuid5_they_always_were() -> None:
    # A database written before time-ordered ids holds these: a request re-delivered across
    # an upgrade must find the same workflow and event ids.
    rid = UUID("1b4e28ba-2fa1-41d2-883f-0016d3cca427")
    assert derive_id(rid, "workflow") == uuid5(rid, "workflow")
    assert derive_id(rid, "t", 3) == uuid5(rid, "t:3")
    assert derive_seed(rid) == uuid5(rid, "seed").int % 2**63


def test_new_request_ids_are_uuid7_in_time_order() -> None:
    before = time.time_ns() // 1_000_000
    first = new_event_id()
    time.sleep(0.002)
    second = new_event_id()
    after = time.time_ns() // 1_000_000
    assert first.version == 7 and second.version == 7
    assert first.variant == second.variant == RFC_4122
    assert before <= first.int >> 80 <= second.int >> 80 <= after
    assert first < second
    assert len({new_event_id() for _ in range(10_000)}) == 10_000


def test_ids_derived_from_a_time_ordered_request_sort_with_it() -> None:
    # What keeps the reducer's indexes growing at their right edge: every id of a workflow
    # carries its request's milliseconds, so a later request's ids sort after an earlier's.
    requests = []
    for _ in range(3):
        requests.append(new_event_id())
        time.sleep(0.002)
    workflows = [derive_id(r, "workflow") for r in requests]
    events = [derive_id(w, "t1") for w in workflows]
    assert sorted(workflows) == workflows and sorted(events) == events
    for r, w, e in zip(requests, workflows, events, strict=True):
        assert w.version == 8 and e.version == 8 and w.variant == RFC_4122
        assert r.int >> 80 == w.int >> 80 == e.int >> 80
    w = workflows[0]
    assert derive_id(requests[0], "workflow") == w  # deterministic
    assert len({w, derive_id(requests[0], "t1"), derive_id(w, "t1"), derive_id(w, "t2"),
                derive_id(w, "t", 1), derive_id(w, "t:1")}) == 5  # only "t",1 == "t:1"
    assert derive_seed(requests[0]) == uuid5(requests[0], "seed").int % 2**63


def test_probe_identity() -> None:
    rid = uuid4()
    assert probe_identity(json.dumps({"namespace": "a", "event_id": str(rid)}).encode()) == (
        "a", rid)
    for raw in (b"{not json", b"[]", b'{"namespace": "a"}',
                json.dumps({"namespace": "BAD NS", "event_id": str(rid)}).encode()):
        assert probe_identity(raw) is None


def test_builtin_contracts_load() -> None:
    loaded = load_contracts()
    assert set(loaded) == {"orchestrator", "reducer", "stamping", "inference"}
    orch = loaded["orchestrator"]
    assert orch.fsm_named("stamp").initial == "received"
    assert orch.thresholds.workflow_p95_ms == 300
    assert loaded["inference"].operation == "generate_image"
    assert loaded["inference"].io_policy.batching.max_batch_size >= 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("kind: orchestrator", "kind: orchestrator\ncolour: blue"),
         "colour: Extra inputs are not permitted"),
        (lambda t: t.replace("initial: received", "initial: nowhere", 1),
         "initial state 'nowhere' is not among the states"),
        (lambda t: t.replace("dest: hashing", "dest: limbo"), "names unknown state 'limbo'"),
        (lambda t: t.replace("stamp.requested, generation.requested", "stamp.requestd"),
         "unknown event type(s) ['stamp.requestd']"),
        (lambda t: t.replace("version: 1.0.0", "version: one"), "version: String should match"),
        (lambda t: t.replace("input: [StampRequested", "input: [StampAsked"),
         "unknown model(s) ['StampAsked']"),
        (lambda t: t + "\n  : : bad", "orchestrator.yaml:"),
    ],
)
def test_bad_contract_gives_one_clear_line(edit, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "orchestrator.yaml"
    bad.write_text(edit((SPECS / "orchestrator.yaml").read_text()))
    with pytest.raises(ContractError) as err:
        load_contract(bad)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(str(bad))
    assert message in text


def test_contract_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="contract file not found"):
        load_contract(tmp_path / "missing.yaml")
    with pytest.raises(ContractError, match="is a directory"):
        load_contract(tmp_path)
    with pytest.raises(ContractError, match="expected a mapping"):
        parse_contract("- a\n- b\n", origin="x.yaml")
    with pytest.raises(ContractError, match="contracts directory not found"):
        load_contracts(tmp_path / "nope")


def test_unreachable_state_is_rejected() -> None:
    text = (SPECS / "stamping.yaml").read_text() + """
fsm:
  - name: s
    states: [a, b, c]
    initial: a
    terminal: [b]
    transitions:
      - {trigger: go, source: [a], dest: b}
"""
    with pytest.raises(ContractError, match=r"states \['c'\] cannot be reached"):
        parse_contract(text, origin="s.yaml")


def test_export_writes_a_schema_per_event(tmp_path: Path) -> None:
    written = export_schemas(tmp_path / "out")
    names = {p.name for p in written}
    assert {f"{t}.schema.json" for t in EVENT_TYPES} <= names
    assert "envelope.schema.json" in names
    envelope = json.loads((tmp_path / "out" / "envelope.schema.json").read_text())
    assert set(envelope["required"]) >= {"event_id", "event_type", "namespace", "payload"}
    assert envelope["additionalProperties"] is False


def test_export_into_a_file_fails_clearly(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ContractError, match="exists and is not a directory"):
        export_schemas(target)


def test_envelope_for_sets_event_type() -> None:
    env = envelope_for(StampRequested(path="x"), namespace="n", event_id=uuid4(),
                       correlation_id=uuid4(), causation_id=None, source="t",
                       occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert isinstance(env, Envelope)
    assert env.event_type == "stamp.requested"


# --- what PostgreSQL cannot store is refused at admission ----------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("content_type", "text/plain\x00"),
    ("path", "a\x00b"),
])
def test_a_nul_character_is_refused_naming_the_field(field: str, value: str) -> None:
    payload: dict[str, object] = {"content": base64.b64encode(b"x").decode(), field: value}
    if field == "path":
        payload.pop("content")
    raw = json.dumps(_request(**payload)).encode()
    with pytest.raises(ValidationError) as info:
        decode(raw)
    assert info.value.errors()[0]["loc"][-1] == field


def test_a_nul_in_a_prompt_or_model_is_refused() -> None:
    for field in ("prompt", "negative_prompt", "model"):
        with pytest.raises(ValidationError):
            GenerationRequested.model_validate({"prompt": "p", field: "x\x00"})


def test_result_events_are_bounded_to_postgresql_column_types() -> None:
    from stampflow.contracts.events import (
        GenerationCompleted,
        WorkflowCompleted,
        WorkflowTransitioned,
    )

    good = {"workflow_id": str(uuid4()), "artifact_uri": "file:///a", "hash": "0" * 64,
            "size": 1, "seed": 1, "width": 64, "height": 64, "num_inference_steps": 2,
            "model": "m", "device": "cpu", "prompt_tokens": 1}
    GenerationCompleted.model_validate(good)
    for field, value in [("seed", 2**63), ("size", 2**63), ("prompt_tokens", 2**31),
                         ("batch_size", 2**31), ("model", "a\x00")]:
        with pytest.raises(ValidationError):
            GenerationCompleted.model_validate({**good, field: value})
    with pytest.raises(ValidationError):
        WorkflowTransitioned.model_validate({"workflow_id": str(uuid4()), "workflow_kind": "stamp",
                                             "seq": 2**31, "from_state": None,
                                             "to_state": "received", "trigger": "start"})
    with pytest.raises(ValidationError):
        WorkflowCompleted.model_validate_json(
            f'{{"workflow_id": "{uuid4()}", "workflow_kind": "stamp", "duration_ms": Infinity}}')


def test_the_exported_schema_says_exactly_one_of_path_and_content() -> None:
    schema = StampRequested.model_json_schema()
    assert {"required": ["path"], "properties": {"path": {"type": "string"}}} in schema["oneOf"]
    assert schema["properties"]["content_type"]["anyOf"][0]["pattern"] == "^[^\\x00]*$"


def test_a_namespace_with_a_trailing_newline_is_not_readable() -> None:
    raw = json.dumps({**_request(content="eA=="), "namespace": "acme\n"}).encode()
    assert probe_identity(raw) is None


@pytest.mark.parametrize("text", ["-_-_", "\u2028YQ==", "YQ", "YR==", "YQ==\n", "Y Q=="])
def test_inline_content_is_strict_base64(text: str) -> None:
    """Found by the end-to-end fuzz: a lenient decoder dropped what it did not know, so
    "-_-_" was stamped as empty content and "\\u2028YQ==" as b"a"."""
    with pytest.raises(ValidationError):
        StampRequested(content=text)


def test_the_exported_envelope_ties_event_type_to_the_payload() -> None:
    import jsonschema

    from stampflow.contracts.schema import schemas

    validator = jsonschema.Draft202012Validator(schemas()["envelope.schema.json"])
    good = _request(content="YQ==")
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "event_type": "generation.requested"})
    assert not validator.is_valid({**good, "payload": {"content": "YQ=="}})  # no type
    assert not validator.is_valid({**good, "payload": {"type": "stamp.requested",
                                                       "content": "-_-_"}})


def test_every_stated_threshold_has_a_test_under_its_own_name() -> None:
    """A threshold in a node contract is a promise: tests/integration/test_thresholds.py must
    hold a test function named after it (test_<threshold>), so none is stated and unchecked."""
    import ast
    from pathlib import Path

    from stampflow.contracts.nodes import load_contracts

    source = Path(__file__).parents[1] / "integration" / "test_thresholds.py"
    names = {node.name for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    stated = {name for contract in load_contracts().values()
              for name, value in contract.thresholds.model_dump().items() if value is not None}
    assert stated, "no contract states a threshold"
    unchecked = {t for t in stated if not any(n.startswith("test_") and t in n for n in names)}
    assert not unchecked, f"thresholds with no test named after them: {sorted(unchecked)}"


@pytest.mark.parametrize("parent", [
    UUID("ffffffff-ffff-7fff-bfff-ffffffffffff"),  # a producer's v7 from the far future
    UUID("00000000-0000-7000-8000-000000000000"),  # ... and from 1970
    UUID("12345678-9abc-8def-8123-456789abcdef"),  # a v8 id of someone else's making
])
def test_any_time_ordered_parent_derives_a_valid_child_in_its_millisecond(parent: UUID) -> None:
    child = derive_id(parent, "workflow")
    assert child == derive_id(parent, "workflow")
    assert child.version == 8 and child.variant == RFC_4122
    assert child.int >> 80 == parent.int >> 80
    assert derive_id(child, "t1").int >> 80 == parent.int >> 80
