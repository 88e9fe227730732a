"""The typed FSM wrapper over `transitions`, built from the contracts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.nodes import ContractError, builtin_contract
from nodes.fsm import IllegalTransition, Workflow, WorkflowMachine

SPEC = builtin_contract("orchestrator").fsm_named("stamp")


def _guard(workflow: Workflow, kwargs: Mapping[str, Any]) -> bool:
    return bool(kwargs.get("ok", True))


def machine() -> WorkflowMachine:
    return WorkflowMachine(SPEC, {"content_within_limit": _guard})


def test_happy_path_counts_transitions() -> None:
    m = machine()
    wf, created = m.create(uuid4())
    assert (created.seq, created.from_state, created.to_state) == (1, None, "received")
    steps = [m.fire(wf, t) for t in ("start", "hashed", "complete")]
    assert [(s.seq, s.to_state) for s in steps if s] == [
        (2, "hashing"), (3, "stamped"), (4, "completed")]
    assert m.is_terminal(wf.state)


def test_illegal_trigger_names_state_and_trigger() -> None:
    m = machine()
    wf, _ = m.create(uuid4())
    with pytest.raises(IllegalTransition) as err:
        m.fire(wf, "complete")
    assert (err.value.state, err.value.trigger) == ("received", "complete")
    assert "'complete'" in str(err.value) and "'received'" in str(err.value)
    with pytest.raises(IllegalTransition, match="'teleport'"):
        m.fire(wf, "teleport")
    assert wf.state == "received"


def test_failed_guard_leaves_state_unchanged() -> None:
    m = machine()
    wf, _ = m.create(uuid4())
    assert m.fire(wf, "start", ok=False) is None
    assert (wf.state, wf.seq) == ("received", 1)
    assert m.fire(wf, "start", ok=True) is not None


def test_terminal_states_take_no_trigger() -> None:
    m = machine()
    wf, _ = m.create(uuid4())
    m.fire(wf, "fail")
    for trigger in SPEC.triggers:
        with pytest.raises(IllegalTransition):
            m.fire(wf, trigger)


def test_missing_guard_implementation_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="content_within_limit"):
        WorkflowMachine(SPEC, {})


def test_one_machine_serves_many_workflows() -> None:
    m = machine()
    flows = [m.create(uuid4())[0] for _ in range(1000)]
    for i, wf in enumerate(flows):
        m.fire(wf, "start")
        if i % 2:
            m.fire(wf, "fail")
    assert sum(wf.state == "failed" for wf in flows) == 500
    assert sum(wf.state == "hashing" for wf in flows) == 500


@given(st.lists(st.sampled_from(sorted(SPEC.triggers | {"bogus"})), max_size=12))
def test_machine_agrees_with_the_contract(triggers: list[str]) -> None:
    """Whatever is fired, the wrapper moves exactly as the contract's transition table says."""
    m = machine()
    wf, _ = m.create(uuid4())
    for trigger in triggers:
        before = wf.state
        allowed = [t for t in SPEC.transitions if t.trigger == trigger and before in t.source]
        if not allowed:
            with pytest.raises(IllegalTransition):
                m.fire(wf, trigger)
            assert wf.state == before
        else:
            moved = m.fire(wf, trigger)
            assert moved is not None
            assert SPEC.allows(before, trigger, wf.state)
