"""An AsyncAPI 3.0 document of stampflow's topics, derived from the node contracts.

Pure: the caller (``stampflow contracts asyncapi``) gives the real topic names, partitions,
replicas and consumer groups (they come from the settings) and writes the result. Channels are
the contracts' logical topics and their dead-letter topics; each carries the event types the
contracts bind to it; each node sends what it produces and receives what it consumes, and
clients send what a node consumes that no node produces. Message payloads are the envelope
schemas of ``contracts.schema``, inlined under ``components.schemas``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from stampflow.contracts.events import EVENT_TYPES, Base64Content, Envelope
from stampflow.contracts.nodes import NodeContract
from stampflow.contracts.schema import ContractSchema

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
DLQ_SUFFIX = "-dlq"


class DeadLetter(BaseModel):
    """What a node publishes to ``<topic>.dlq`` for a record it cannot use (not an envelope:
    the original bytes and where they came from; ``stampflow dlq`` reads them)."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    key: Base64Content | None = Field(description="The original key, cut to 1024 bytes.")
    value: Base64Content = Field(description="The original value (a bounded copy if large).")
    error: str = Field(max_length=2000)
    failed_at: datetime
    node: str
    value_size: int = Field(ge=0, description="The original value's size in bytes.")
    value_truncated: bool
    key_truncated: bool


def _schema_name(event_type: str) -> str:
    return EVENT_TYPES[event_type].__name__


def _components_refs(schema: Any) -> Any:
    """JSON Schema from pydantic, made an AsyncAPI Schema Object: ``$defs`` references point into
    ``components.schemas``, and ``discriminator`` is the property name (AsyncAPI's form)."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/components/schemas/" + value.removeprefix("#/$defs/")
            elif key == "discriminator" and isinstance(value, dict):
                out[key] = value["propertyName"]
            else:
                out[key] = _components_refs(value)
        return out
    if isinstance(schema, list):
        return [_components_refs(item) for item in schema]
    return schema


def _schemas() -> dict[str, Any]:
    envelope = Envelope.model_json_schema(schema_generator=ContractSchema)
    schemas: dict[str, Any] = {"Envelope": {k: v for k, v in envelope.items() if k != "$defs"}}
    for name, sub in envelope.get("$defs", {}).items():
        schemas[name] = sub
    dead = DeadLetter.model_json_schema(schema_generator=ContractSchema)
    schemas["DeadLetter"] = dead
    for event_type in sorted(EVENT_TYPES):
        name = _schema_name(event_type)
        schemas[f"{name}Envelope"] = {
            "description": f"The envelope of a {event_type} event.",
            "allOf": [{"$ref": "#/components/schemas/Envelope"},
                      {"properties": {"event_type": {"const": event_type},
                                      "payload": {"$ref": f"#/components/schemas/{name}"}}}]}
    return {name: _components_refs(schemas[name]) for name in sorted(schemas)}


def _key_schema(event_type: str) -> dict[str, Any]:
    """The Kafka key, as :meth:`Envelope.key` makes it: the workflow id, or for a request
    (a payload without one) the request's own event id."""
    by_workflow = "workflow_id" in EVENT_TYPES[event_type].model_fields
    return {"type": "string", "format": "uuid", "description": (
        "The workflow id (payload.workflow_id): one workflow's records stay in one partition."
        if by_workflow else
        "The request's event_id (a request has no workflow yet; its workflow id is derived "
        "from it).")}


def _doc_line(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def asyncapi_document(
    contracts: Mapping[str, NodeContract], *, topics: Mapping[str, str],
    dead_letter_topic: Callable[[str], str], groups: Mapping[str, str], partitions: int,
    replicas: int, version: str,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document. ``topics``: logical topic -> real name; ``groups``: node ->
    consumer group id (for the nodes that consume)."""
    carried: dict[str, set[str]] = {}
    for contract in contracts.values():
        for binding in (*contract.consumes, *contract.produces):
            carried.setdefault(binding.topic, set()).update(binding.events)
    logical = [t for t in topics if t in carried]

    def kafka_channel(address: str) -> dict[str, Any]:
        return {"kafka": {"topic": address, "partitions": partitions, "replicas": replicas,
                          "bindingVersion": KAFKA_BINDING_VERSION}}

    channels: dict[str, Any] = {}
    for topic in logical:
        channels[topic] = {
            "address": topics[topic],
            "title": topic,
            "description": f"The {topic} topic (the contracts' logical name `{topic}`).",
            "messages": {t: {"$ref": f"#/components/messages/{t}"}
                         for t in sorted(carried[topic])},
            "bindings": kafka_channel(topics[topic]),
        }
        dlq = dead_letter_topic(topics[topic])
        channels[topic + DLQ_SUFFIX] = {
            "address": dlq, "title": f"{topic} dead letters",
            "description": f"Records of `{topics[topic]}` that a node could not use.",
            "messages": {"dead-letter": {"$ref": "#/components/messages/dead-letter"}},
            "bindings": kafka_channel(dlq),
        }

    operations: dict[str, Any] = {}

    def operation(node: str, action: str, topic: str, events: list[str]) -> None:
        op: dict[str, Any] = {
            "action": action, "channel": {"$ref": f"#/channels/{topic}"},
            "title": f"{node} {action}s {', '.join(events)}",
            "messages": [{"$ref": f"#/channels/{topic}/messages/{e}"} for e in events],
        }
        if action == "receive" and node in groups:
            op["bindings"] = {"kafka": {"groupId": {"type": "string", "enum": [groups[node]]},
                                        "bindingVersion": KAFKA_BINDING_VERSION}}
        operations[f"{node}.{action}.{topic}"] = op

    produced = {b.topic for c in contracts.values() for b in c.produces}
    for topic in logical:
        if topic not in produced:  # clients publish it (stampflow submit, stampflow.client)
            operation("clients", "send", topic, sorted(carried[topic]))
    for name in sorted(contracts):
        contract = contracts[name]
        for binding in contract.consumes:
            operation(name, "receive", binding.topic, list(binding.events))
        for binding in contract.produces:
            operation(name, "send", binding.topic, list(binding.events))
        for binding in contract.consumes:  # a record it cannot use goes to <topic>.dlq
            operation(name, "send", binding.topic + DLQ_SUFFIX, ["dead-letter"])

    messages: dict[str, Any] = {}
    for event_type in sorted(EVENT_TYPES):
        model = EVENT_TYPES[event_type]
        messages[event_type] = {
            "name": event_type, "title": model.__name__,
            "summary": _doc_line(model) or f"A {event_type} event.",
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{model.__name__}Envelope"},
            "bindings": {"kafka": {"key": _key_schema(event_type),
                                   "bindingVersion": KAFKA_BINDING_VERSION}},
        }
    messages["dead-letter"] = {
        "name": "dead-letter", "title": "DeadLetter", "summary": _doc_line(DeadLetter),
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/DeadLetter"},
        "bindings": {"kafka": {"key": {"type": "string", "description":
                                       "The original record's key, cut to 1024 bytes."},
                               "bindingVersion": KAFKA_BINDING_VERSION}},
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "stampflow",
            "version": version,
            "description": (
                "Generated by `stampflow contracts asyncapi` from the node contracts "
                "(src/contracts/specs) and the settings (topic names); do not edit. Every "
                "message is JSON; every event is an Envelope whose event_type names its "
                "payload's type."),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": _schemas(), "messages": messages},
    }


def asyncapi_yaml(document: Mapping[str, Any]) -> str:
    text: str = yaml.safe_dump(copy.deepcopy(dict(document)), sort_keys=False,
                               allow_unicode=True, width=100)
    return text
