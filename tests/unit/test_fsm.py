"""The typed FSM wrapper over `transitions`, built from the contracts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stampflow.contracts.nodes import ContractError, builtin_contract
from stampflow.nodes.fsm import (
    Blocked,
    Illegal,
    Taken,
    Workflow,
    WorkflowContext,
    WorkflowMachine,
)

SPEC = builtin_contract("orchestrator").fsm_named("stamp")
CONTEXT = WorkflowContext(namespace="a", request_id=UUID(int=1),
                          started_at=datetime(2026, 1, 1, tzinfo=UTC))


def _guard(workflow: Workflow, kwargs: Mapping[str, Any]) -> bool:
    return bool(kwargs.get("ok", True))


def machine() -> WorkflowMachine:
    return WorkflowMachine(SPEC, {"content_within_limit": _guard})


def taken(fired: object) -> Taken:
    assert isinstance(fired, Taken), fired
    return fired


def test_happy_path_counts_transitions() -> None:
    m = machine()
    wf, created = m.create(uuid4(), CONTEXT)
    assert (created.seq, created.from_state, created.to_state) == (1, None, "received")
    steps = []
    for t in ("start", "hashed", "complete"):
        fired = taken(m.fire(wf, t))
        wf = fired.workflow
        steps.append(fired.transition)
    assert [(s.seq, s.to_state) for s in steps if s] == [
        (2, "hashing"), (3, "stamped"), (4, "completed")]
    assert m.is_terminal(wf.state)


def test_illegal_trigger_names_state_and_trigger() -> None:
    m = machine()
    wf, _ = m.create(uuid4(), CONTEXT)
    err = m.fire(wf, "complete")
    assert isinstance(err, Illegal)
    assert (err.state, err.trigger) == ("received", "complete")
    assert "'complete'" in str(err) and "'received'" in str(err)
    teleport = m.fire(wf, "teleport")
    assert isinstance(teleport, Illegal)
    assert "'teleport'" in teleport.reason
    assert wf.state == "received"


def test_failed_guard_leaves_state_unchanged() -> None:
    m = machine()
    wf, _ = m.create(uuid4(), CONTEXT)
    blocked = m.fire(wf, "start", ok=False)
    assert isinstance(blocked, Blocked)
    assert blocked.workflow == wf
    assert (wf.state, wf.seq) == ("received", 1)
    assert "'start'" in blocked.reason and "'received'" in blocked.reason
    assert isinstance(m.fire(wf, "start", ok=True), Taken)


def test_terminal_states_take_no_trigger() -> None:
    m = machine()
    wf, _ = m.create(uuid4(), CONTEXT)
    wf = taken(m.fire(wf, "fail")).workflow
    for trigger in SPEC.triggers:
        assert isinstance(m.fire(wf, trigger), Illegal)


def test_missing_guard_implementation_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="content_within_limit"):
        WorkflowMachine(SPEC, {})


def test_one_machine_serves_many_workflows() -> None:
    m = machine()
    flows = [m.create(uuid4(), CONTEXT)[0] for _ in range(1000)]
    for i, wf in enumerate(flows):
        wf = taken(m.fire(wf, "start")).workflow
        if i % 2:
            wf = taken(m.fire(wf, "fail")).workflow
        flows[i] = wf
    assert sum(wf.state == "failed" for wf in flows) == 500
    assert sum(wf.state == "hashing" for wf in flows) == 500


def test_fire_never_changes_the_workflow_it_is_given() -> None:
    m = machine()
    wf, _ = m.create(uuid4(), CONTEXT)
    before = (wf.state, wf.seq)
    moved = taken(m.fire(wf, "start"))
    assert (wf.state, wf.seq) == before
    assert (moved.workflow.state, moved.workflow.seq) == ("hashing", 2)
    assert moved.workflow.workflow_id == wf.workflow_id
    assert moved.workflow.context is wf.context
    with pytest.raises(FrozenInstanceError):
        wf.state = "failed"  # type: ignore[misc]


def test_a_workflow_in_a_state_the_machine_does_not_know_is_illegal_not_a_crash() -> None:
    m = machine()
    wf = Workflow(uuid4(), "stamp", "nowhere", 7, context=CONTEXT)
    for trigger in SPEC.triggers:
        fired = m.fire(wf, trigger)
        assert isinstance(fired, Illegal)
        assert "'nowhere'" in fired.reason


@given(st.lists(st.sampled_from(sorted(SPEC.triggers | {"bogus"})), max_size=12))
def test_machine_agrees_with_the_contract(triggers: list[str]) -> None:
    """Whatever is fired, the wrapper moves exactly as the contract's transition table says."""
    m = machine()
    wf, _ = m.create(uuid4(), CONTEXT)
    for trigger in triggers:
        before = wf.state
        allowed = [t for t in SPEC.transitions if t.trigger == trigger and before in t.source]
        fired = m.fire(wf, trigger)
        if not allowed:
            assert isinstance(fired, Illegal)
            assert wf.state == before
        else:
            moved = taken(fired)
            assert moved.transition.seq == wf.seq + 1
            wf = moved.workflow
            assert SPEC.allows(before, trigger, wf.state)
