"""The ``services.json`` state file: reading it, and telling whether the PIDs it records still
run the very processes recorded there (exact command line and start time), not others that got
the same PID later.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from stampflow.services.processes import pid_alive, process_identity

STATE_FILE = "services.json"

_SERVERS = {"postgres": "PostgreSQL server", "broker": "Kafka broker"}


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _started_here(state: dict[str, Any], key: str) -> bool | None:
    """Whether the PID recorded for ``key`` runs the process recorded: None when no process
    has that PID, False when another does."""
    pid = _int(state.get(f"{key}_pid"))
    if not pid_alive(pid):
        return None
    now = process_identity(pid)
    if now is None and sys.platform != "linux":
        return True  # nothing to compare with (no /proc): the PID is all there is
    return (now is not None and now["cmdline"] == state.get(f"{key}_cmdline")
            and now["start_ticks"] == state.get(f"{key}_start_ticks"))


def _state_alive(state: dict[str, Any]) -> bool:
    return all(_started_here(state, key) for key in _SERVERS)


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else 0

