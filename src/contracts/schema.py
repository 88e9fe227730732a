"""JSON Schema for every event, so producers in other languages can publish valid events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from stampflow.contracts.events import EVENT_TYPES, NO_FINAL_NEWLINE, Envelope
from stampflow.contracts.nodes import ContractError, NodeContract

# The text forms the schemas ask for, as patterns too: under Draft 2020-12 "format" is only an
# annotation unless a validator opts in, and these say what the models read (their canonical
# spellings; the models also read a few lax ones, listed in the README).
UUID_PATTERN = ("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# RFC 3339 date-time with an offset, years 0001-9999 (what a Python datetime holds); the
# calendar (February 30th) is left to the format.
DATE_TIME_PATTERN = (
    "^(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
    "-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    "[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:[.][0-9]+)?"
    "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$")


class ContractSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, with UUIDs and times said by pattern as well as format."""

    def uuid_schema(self, schema: core_schema.UuidSchema) -> JsonSchemaValue:
        out = super().uuid_schema(schema)
        return {**out, "pattern": UUID_PATTERN, **NO_FINAL_NEWLINE}

    def datetime_schema(self, schema: core_schema.DatetimeSchema) -> JsonSchemaValue:
        out = super().datetime_schema(schema)
        return {**out, "pattern": DATE_TIME_PATTERN, **NO_FINAL_NEWLINE}


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema: the envelope, each event payload, and the node contract."""
    out: dict[str, dict[str, Any]] = {
        "envelope.schema.json": Envelope.model_json_schema(schema_generator=ContractSchema),
        "node-contract.schema.json": NodeContract.model_json_schema(
            schema_generator=ContractSchema),
    }
    for event_type, model in sorted(EVENT_TYPES.items()):
        out[f"{event_type}.schema.json"] = model.model_json_schema(
            schema_generator=ContractSchema)
    for name, schema in out.items():
        schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
        schema.setdefault("$id", f"stampflow/{name}")
    return out


def export_schemas(directory: Path) -> list[Path]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ContractError(f"{directory}: exists and is not a directory") from None
    except OSError as err:
        raise ContractError(f"{directory}: cannot create: {err.strerror}") from None
    written = []
    for name, schema in schemas().items():
        path = directory / name
        try:
            path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as err:
            raise ContractError(f"{path}: cannot write: {err.strerror}") from None
        written.append(path)
    return written
