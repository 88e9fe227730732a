"""JSON Schema for every event, so producers in other languages can publish valid events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stampflow.contracts.events import EVENT_TYPES, Envelope
from stampflow.contracts.nodes import ContractError, NodeContract


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema: the envelope, each event payload, and the node contract."""
    out: dict[str, dict[str, Any]] = {
        "envelope.schema.json": Envelope.model_json_schema(),
        "node-contract.schema.json": NodeContract.model_json_schema(),
    }
    for event_type, model in sorted(EVENT_TYPES.items()):
        out[f"{event_type}.schema.json"] = model.model_json_schema()
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
