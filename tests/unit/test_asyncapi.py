"""The AsyncAPI document (`stampflow contracts asyncapi`): current, well formed, and true.

No AsyncAPI 3 validator is maintained on PyPI, so the structure is checked here with
``jsonschema``: the required fields, every ``$ref`` resolving, operations pointing at their
channel's messages, the Kafka bindings, and every message's schema accepting what the nodes
really send. With ``STAMPFLOW_ASYNCAPI_SCHEMA`` naming the official AsyncAPI 3.0.0 JSON Schema
(``schemas/3.0.0-without-$id.json`` of github.com/asyncapi/spec-json-schemas, or of the npm
package ``@asyncapi/specs``), the document is validated against it as well.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import jsonschema
import pytest
import yaml

from stampflow.contracts.events import (
    EVENT_TYPES,
    GenerationRequested,
    InferenceJob,
    StampRequested,
    WorkflowTransitioned,
    envelope_for,
)
from stampflow.contracts.nodes import load_contracts
from stampflow.nodes.deadletter import dead_letter
from stampflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
OFFICIAL_SCHEMA = os.environ.get("STAMPFLOW_ASYNCAPI_SCHEMA")


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch) -> str:
    """The document for the default settings (no STAMPFLOW_* variable)."""
    from stampflow.cli.schema import asyncapi_text

    for name in list(os.environ):
        if name.startswith("STAMPFLOW_"):
            monkeypatch.delenv(name)
    return asyncapi_text()


@pytest.fixture
def doc(generated: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(generated)
    return loaded


def test_the_committed_copy_is_current(generated: str) -> None:
    # Compared as documents: pydantic releases differ in how they spell a number (0 or 0.0).
    committed = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    assert committed == yaml.safe_load(generated), (
        "docs/asyncapi.yaml is stale: run `stampflow contracts asyncapi --out "
        "docs/asyncapi.yaml` (with no STAMPFLOW_* variable set)")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: not a local reference"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref}: does not resolve"
        node = node[part]
    return node


def test_required_fields_and_every_reference_resolves(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    refs = _refs(doc)
    assert len(refs) > 50
    for ref in refs:
        _resolve(doc, ref)


def test_channels_are_the_topics_with_their_dead_letters(doc: dict[str, Any]) -> None:
    s = Settings()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == set(s.topics)
    for channel in doc["channels"].values():
        kafka = channel["bindings"]["kafka"]
        assert kafka["topic"] == channel["address"]
        assert kafka["partitions"] == s.topic_partitions


def test_operations_follow_the_node_contracts(doc: dict[str, Any]) -> None:
    contracts = load_contracts()
    ops = doc["operations"]
    seen: set[tuple[str, str, str]] = set()
    for op_id, op in ops.items():
        node, action, _ = op_id.split(".", 2)
        channel = _resolve(doc, op["channel"]["$ref"])
        for message in op["messages"]:  # an operation's messages are its channel's
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
            name = message["$ref"].rsplit("/", 1)[1]
            assert name in channel["messages"]
            seen.add((node, action, name))
        if action == "receive":
            group = op["bindings"]["kafka"]["groupId"]["enum"]
            assert group == [f"{Settings().consumer_group_prefix}-{node}"]
    expected = {(name, "receive", e) for name, c in contracts.items()
                for e in c.consumed_events()}
    expected |= {(name, "send", e) for name, c in contracts.items() for e in c.produced_events()}
    expected |= {(name, "send", "dead-letter") for name, c in contracts.items() if c.consumes}
    expected |= {("clients", "send", "stamp.requested"), ("clients", "send",
                                                         "generation.requested")}
    assert seen == expected
    assert {m for m in doc["components"]["messages"]} == set(EVENT_TYPES) | {"dead-letter"}


def _validator(doc: dict[str, Any], schema_name: str) -> jsonschema.Draft7Validator:
    # AsyncAPI's Schema Object is a JSON Schema draft-07 superset; references point into the
    # document's components.
    return jsonschema.Draft7Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]},
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def _envelope(payload: Any) -> dict[str, Any]:
    env = envelope_for(payload, namespace="acme", event_id=uuid4(), correlation_id=uuid4(),
                       causation_id=None, source="test")
    loaded: dict[str, Any] = json.loads(env.to_bytes())
    return loaded


def test_message_schemas_accept_what_the_nodes_send_and_key_by_workflow(
        doc: dict[str, Any]) -> None:
    wf = uuid4()
    request = GenerationRequested(prompt="p")
    samples = {
        "stamp.requested": StampRequested(content=base64.b64encode(b"x")),
        "generation.requested": request,
        "workflow.transitioned": WorkflowTransitioned(
            workflow_id=wf, workflow_kind="stamp", seq=1, from_state=None,
            to_state="received", trigger="create"),
        "inference.job": InferenceJob(workflow_id=wf, state="generating", seq=2,
                                      started_at=datetime.now(UTC), seed=1, request=request),
    }
    for event_type, payload in samples.items():
        message = doc["components"]["messages"][event_type]
        schema_name = message["payload"]["$ref"].rsplit("/", 1)[1]
        sample = _envelope(payload)
        assert _validator(doc, schema_name).is_valid(sample), event_type
        other = next(t for t in samples if t != event_type)
        assert not _validator(doc, schema_name).is_valid({**sample, "event_type": other})
        key_doc = message["bindings"]["kafka"]["key"]["description"]
        assert key_doc.startswith("The workflow id") == hasattr(payload, "workflow_id"), event_type


def test_the_dead_letter_schema_accepts_a_real_dead_letter(doc: dict[str, Any]) -> None:
    raw = dead_letter(topic="stampflow.requests.v1", partition=0, offset=7, key=b"k",
                      value=b"\xff not json", error="not JSON", node="orchestrator",
                      at=datetime.now(UTC))
    letter = json.loads(raw)
    validator = _validator(doc, "DeadLetter")
    assert validator.is_valid(letter), list(validator.iter_errors(letter))
    assert not validator.is_valid({**letter, "surprise": 1})


@pytest.mark.skipif(not OFFICIAL_SCHEMA,
                    reason="STAMPFLOW_ASYNCAPI_SCHEMA names no official AsyncAPI 3.0.0 schema")
def test_valid_against_the_official_asyncapi_schema(doc: dict[str, Any]) -> None:
    official = json.loads(Path(str(OFFICIAL_SCHEMA)).read_text())
    errors = list(jsonschema.Draft7Validator(official).iter_errors(doc))
    assert not errors, [e.message[:200] for e in errors[:5]]


def test_the_command_writes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "asyncapi.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "stampflow", "contracts", "asyncapi", "--out", str(target)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(target.read_text(encoding="utf-8")) == yaml.safe_load(
        COMMITTED.read_text(encoding="utf-8"))
