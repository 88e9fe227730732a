"""The pure cores: orchestrator step and reducer reduce, and that both match their contracts."""

from __future__ import annotations

import base64
import copy
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stampflow.contracts.events import (
    Envelope,
    GenerationCompleted,
    StampRequested,
    WorkflowFailed,
    WorkflowTransitioned,
    envelope_for,
)
from stampflow.contracts.nodes import ContractError, builtin_contract
from stampflow.nodes.fsm import Workflow, WorkflowContext
from stampflow.nodes.orchestrator.core import (
    CallStamping,
    Command,
    EffectFailed,
    Emit,
    Finished,
    GenerationSucceeded,
    Limits,
    OrchestratorCore,
    Outcome,
    StampSucceeded,
    Unusable,
)
from stampflow.nodes.reducer.core import ReducerState, reduce

ORCH = builtin_contract("orchestrator")
REDUCER = builtin_contract("reducer")
FSMS = {spec.name: spec for spec in ORCH.fsm}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def core(limit: int = 1000) -> OrchestratorCore:
    return OrchestratorCore(ORCH, Limits(max_content_bytes=limit))


def request(ns: str = "a", content: bytes | None = b"hello", path: str | None = None,
            ) -> Envelope:
    rid = uuid4()
    payload = StampRequested(
        content=base64.b64encode(content) if content is not None else None, path=path)
    return envelope_for(payload, namespace=ns, event_id=rid, correlation_id=rid,
                        causation_id=None, source="test", occurred_at=T0)


def run_stamp(c: OrchestratorCore, req: Envelope, digest: str = "ab" * 32,
              fail: bool = False) -> list[Envelope]:
    wf, commands = c.start(req, T0)
    emitted = [x.envelope for x in commands if isinstance(x, Emit)]
    if any(isinstance(x, CallStamping) for x in commands):
        outcome = (EffectFailed("not_found", "x: not found", T0) if fail else
                   StampSucceeded(digest, 5, "text/plain", T0, T0 + timedelta(milliseconds=3)))
        _, more = c.step(wf, outcome)
        emitted += [x.envelope for x in more if isinstance(x, Emit)]
    return emitted


def test_stamp_workflow_emits_transitions_then_result() -> None:
    events = run_stamp(core(), request())
    kinds = [e.event_type for e in events]
    assert kinds == ["workflow.transitioned"] * 3 + ["stamp.created", "workflow.transitioned",
                                                     "workflow.completed"]
    states = [e.payload.to_state for e in events if isinstance(e.payload, WorkflowTransitioned)]
    assert states == ["received", "hashing", "stamped", "completed"]
    assert all(e.correlation_id == events[0].correlation_id for e in events)


def test_ids_are_deterministic_for_a_redelivered_request() -> None:
    req = request()
    first = [e.event_id for e in run_stamp(core(), req)]
    again = [e.event_id for e in run_stamp(core(), req)]
    assert first == again
    assert len(set(first)) == len(first)


def test_terminal_events_share_one_id_so_a_rerun_cannot_count_twice() -> None:
    req = request()
    ok = run_stamp(core(), req)[-1]
    failed = run_stamp(core(), req, fail=True)[-1]
    assert (ok.event_type, failed.event_type) == ("workflow.completed", "workflow.failed")
    assert ok.event_id == failed.event_id


def test_content_over_the_limit_fails_without_hashing() -> None:
    wf, commands = core(limit=3).start(request(content=b"too long"), T0)
    assert not any(isinstance(c, CallStamping) for c in commands)
    assert wf.state == "failed"
    failed = [c.envelope.payload for c in commands if isinstance(c, Emit)][-1]
    assert failed.type == "workflow.failed"
    assert "exceeds the limit of 3 bytes" in failed.reason  # type: ignore[union-attr]
    assert isinstance(commands[-1], Finished)


def test_reject_makes_a_failed_workflow() -> None:
    rid = uuid4()
    wf, commands = core().reject("a", rid, "stamp", "invalid_request", "payload.path: bad", T0)
    payloads = [c.envelope.payload for c in commands if isinstance(c, Emit)]
    assert [p.type for p in payloads] == ["workflow.transitioned", "workflow.transitioned",
                                          "workflow.failed"]
    assert wf.state == "failed"


def test_reduce_aggregates_counts_and_duplicates() -> None:
    c = core()
    events = []
    events += run_stamp(c, request("a"), digest="11" * 32)
    events += run_stamp(c, request("a"), digest="11" * 32)  # same content: duplicate
    events += run_stamp(c, request("a"), digest="22" * 32)
    events += run_stamp(c, request("b"), digest="11" * 32)  # other namespace: not a duplicate
    events += run_stamp(c, request("b"), fail=True)
    _, writes = reduce(ReducerState(), events, FSMS)
    a, b = writes.aggregates["a"], writes.aggregates["b"]
    assert (a.workflows, a.completed, a.failed, a.duplicates, a.stamps, a.total_bytes) == (
        3, 3, 0, 1, 2, 10)
    assert (b.workflows, b.completed, b.failed, b.duplicates, b.stamps) == (2, 1, 1, 0, 1)
    assert writes.state_counts[("a", "stamp", "completed")] == 3
    assert writes.state_counts[("b", "stamp", "failed")] == 1
    assert writes.state_counts.get(("a", "stamp", "hashing"), 0) == 0
    assert len(writes.transitions) == 3 * 4 + 4 + 3
    assert not writes.anomalies
    assert {r.outcome for r in writes.workflows.values()} == {"stamped", "duplicate", "failed"}


def test_reduce_across_batches_uses_the_loaded_state() -> None:
    c = core()
    events = run_stamp(c, request("a"), digest="33" * 32)
    state, first = reduce(ReducerState(), events[:3], FSMS)
    _, second = reduce(state, events[3:], FSMS)
    assert first.aggregates["a"].workflows == 1
    assert second.aggregates["a"].completed == 1
    assert second.aggregates["a"].stamps == 1
    # A stamp already in the database makes the next one a duplicate.
    state = ReducerState(known_stamps=frozenset({("a", "44" * 32)}))
    _, writes = reduce(state, run_stamp(c, request("a"), digest="44" * 32), FSMS)
    assert writes.aggregates["a"].duplicates == 1
    assert not writes.stamps


def test_illegal_transition_is_an_anomaly_not_a_crash() -> None:
    c = core()
    events = run_stamp(c, request("a"))
    created, _, _, _, completed, _ = events
    skipping = completed.model_copy(update={"payload": completed.payload.model_copy(
        update={"seq": 2})})
    _, writes = reduce(ReducerState(), [created, skipping], FSMS)
    assert [a.kind for a in writes.anomalies] == ["illegal_transition"]
    assert writes.aggregates["a"].anomalies == 1
    assert writes.workflows[created.payload.workflow_id].state == "received"  # type: ignore[union-attr]


def test_events_for_unknown_workflows_are_anomalies() -> None:
    events = run_stamp(core(), request("a"))
    _, writes = reduce(ReducerState(), events[1:], FSMS)
    assert writes.anomalies
    assert {a.kind for a in writes.anomalies} == {"unknown_workflow"}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reduce_never_raises_on_any_order(data: st.DataObject) -> None:
    c = core()
    events = []
    for i in range(data.draw(st.integers(1, 4))):
        events += run_stamp(c, request(f"n{i % 2}"), fail=data.draw(st.booleans()))
    shuffled = data.draw(st.permutations(events))
    subset = shuffled[: data.draw(st.integers(0, len(shuffled)))]
    _, writes = reduce(ReducerState(), subset, FSMS)
    total = sum(d.workflows for d in writes.aggregates.values())
    assert total == sum(1 for e in subset if isinstance(e.payload, WorkflowTransitioned)
                        and e.payload.seq == 1)


def test_orchestrator_emits_only_what_its_contract_declares() -> None:
    declared = ORCH.produced_events()
    c = core()
    emitted = set()
    for fail in (False, True):
        emitted |= {e.event_type for e in run_stamp(c, request(), fail=fail)}
    _, rejects = c.reject("a", uuid4(), "stamp", "x", "y", T0)
    emitted |= {x.envelope.event_type for x in rejects if isinstance(x, Emit)}
    assert emitted <= declared
    assert ORCH.consumed_events() == {"stamp.requested", "generation.requested",
                                      "inference.result"}


def test_orchestrator_fsm_is_the_contracts() -> None:
    c = core()
    assert {name: m.spec for name, m in c.machines.items()} == FSMS


def _on(contract: object, direction: str, topic: str) -> set[str]:
    return {e for b in getattr(contract, direction) if b.topic == topic for e in b.events}


def test_reducer_consumes_what_the_orchestrator_produces() -> None:
    assert REDUCER.consumed_events() == _on(ORCH, "produces", "events")


def test_the_inference_node_and_the_orchestrator_agree_on_jobs_and_results() -> None:
    inference = builtin_contract("inference")
    assert _on(inference, "consumes", "inference-jobs") == _on(
        ORCH, "produces", "inference-jobs") == {"inference.job"}
    assert _on(ORCH, "consumes", "inference-results") == _on(
        inference, "produces", "inference-results") == {"inference.result"}


def test_generation_aggregates_count_each_item_s_share_of_a_batch() -> None:
    from stampflow.contracts.events import GenerationCompleted, GenerationRequested
    from stampflow.nodes.orchestrator.core import GenerationSucceeded

    c = core()
    rid = uuid4()
    req = envelope_for(GenerationRequested(prompt="cat", width=64, height=64), namespace="g",
                       event_id=rid, correlation_id=rid, causation_id=None, source="t",
                       occurred_at=T0)
    wf, commands = c.start(req, T0)
    done = GenerationCompleted(
        workflow_id=wf.workflow_id, artifact_uri="file:///x.png", hash="cd" * 32, size=100,
        seed=1, width=64, height=64, num_inference_steps=2, model="tiny", device="cpu",
        prompt_tokens=3, batch_size=4, timings_ms={"inference": 400.0})
    _, more = c.step(wf, GenerationSucceeded(done, T0))
    events = [x.envelope for x in [*commands, *more] if isinstance(x, Emit)]
    _, writes = reduce(ReducerState(), events, FSMS)
    g = writes.aggregates["g"]
    assert (g.workflows, g.completed, g.generations, g.total_pixels) == (1, 1, 1, 64 * 64)
    assert g.compute_seconds == pytest.approx(0.1)
    assert (g.stamps, g.total_bytes) == (1, 100)
    assert writes.workflows[wf.workflow_id].outcome == "generated"


def _new_only(*runs: list[Envelope]) -> list[Envelope]:
    """What the store passes to reduce: each event id once, first delivery wins."""
    seen: set[object] = set()
    out = []
    for run in runs:
        for e in run:
            if e.event_id not in seen:
                seen.add(e.event_id)
                out.append(e)
    return out


@pytest.mark.parametrize("first_fails", [True, False])
def test_a_rerun_that_ends_differently_still_ends_in_its_terminal_state(
        first_fails: bool) -> None:
    """The first run published part of its history (a timeout, a changed file), the second
    ended the other way. Event ids do not depend on the outcome, so the second run's
    transition at the same seq is taken for the first's: the workflow must still end in the
    state of the one terminal event that counts, and the state counts must agree."""
    c = core()
    req = request("a")
    failed = run_stamp(c, req, fail=True)
    succeeded = run_stamp(c, req, digest="55" * 32)
    first, second = (failed, succeeded) if first_fails else (succeeded, failed)
    partial = first[:3]  # created, hashing, and the branching transition; nothing after
    _, writes = reduce(ReducerState(), _new_only(partial, second), FSMS)
    row = next(iter(writes.workflows.values()))
    end = "completed" if first_fails else "failed"
    assert row.state == end
    counts = {k[2]: v for k, v in writes.state_counts.items() if v}
    assert counts == {end: 1}
    agg = writes.aggregates["a"]
    assert (agg.completed, agg.failed) == ((1, 0) if first_fails else (0, 1))
    assert "terminal_override" in {a.kind for a in writes.anomalies}


@pytest.mark.parametrize("fail", [False, True])
def test_terminal_counts_agree_with_states_after_every_batch(fail: bool) -> None:
    """`stampflow check` compares the aggregates with the workflow rows: a batch that ends
    between a workflow's terminal transition and its terminal event must already agree."""
    c = core()
    events = run_stamp(c, request("a"), fail=fail)
    end = "failed" if fail else "completed"
    last_transition = max(i for i, e in enumerate(events)
                          if e.event_type == "workflow.transitioned")
    state = ReducerState()
    totals = {"completed": 0, "failed": 0}
    for batch in (events[:last_transition + 1], events[last_transition + 1:]):
        state, writes = reduce(state, batch, FSMS)
        agg = writes.aggregates["a"]
        totals["completed"] += agg.completed
        totals["failed"] += agg.failed
        in_state = {s: sum(1 for r in state.workflows.values() if r.state == s)
                    for s in totals}
        assert totals == in_state, (batch[-1].event_type, totals, in_state)
    assert totals[end] == 1


# --- the orchestrator core is pure: no raising for data, no mutation of its input ----------------


def generation_request(ns: str = "g") -> Envelope:
    from stampflow.contracts.events import GenerationRequested

    rid = uuid4()
    return envelope_for(GenerationRequested(prompt="cat", width=64, height=64), namespace=ns,
                        event_id=rid, correlation_id=rid, causation_id=None, source="t",
                        occurred_at=T0)


def generation_done(workflow_id: UUID) -> GenerationSucceeded:
    return GenerationSucceeded(GenerationCompleted(
        workflow_id=workflow_id, artifact_uri="file:///x.png", hash="cd" * 32, size=100,
        seed=1, width=64, height=64, num_inference_steps=2, model="tiny", device="cpu",
        prompt_tokens=3), T0 + timedelta(seconds=1))


def stamp_done(digest: str = "ab" * 32) -> StampSucceeded:
    return StampSucceeded(digest, 5, "text/plain", T0, T0 + timedelta(milliseconds=3))


def started(c: OrchestratorCore, req: Envelope) -> Workflow:
    wf, _ = c.start(req, T0)
    assert wf is not None
    return wf


def emitted(commands: list[Command]) -> list[Envelope]:
    return [x.envelope for x in commands if isinstance(x, Emit)]


def assert_failed_as_illegal(wf: Workflow, commands: list[Command], state: str,
                             trigger: str) -> None:
    """Ends as failed: a transition to ``failed`` whose reason names the state and the
    trigger, ``workflow.failed`` with ``illegal_transition``, then ``Finished("failed")``."""
    events = emitted(commands)
    assert [e.event_type for e in events] == ["workflow.transitioned", "workflow.failed"]
    moved, failed = events[0].payload, events[1].payload
    assert isinstance(moved, WorkflowTransitioned) and isinstance(failed, WorkflowFailed)
    assert (moved.from_state, moved.to_state, moved.trigger) == (state, "failed", "fail")
    assert moved.reason is not None
    assert f"'{state}'" in moved.reason and f"'{trigger}'" in moved.reason
    assert failed.error_code == "illegal_transition"
    assert failed.reason == moved.reason
    assert commands[-1] == Finished("failed")
    assert (wf.state, wf.seq) == ("failed", moved.seq)


def test_a_stamp_outcome_for_a_generation_workflow_fails_it_instead_of_raising() -> None:
    c = core()
    wf = started(c, generation_request())
    assert wf.state == "generating"
    after, commands = c.step(wf, stamp_done())
    assert_failed_as_illegal(after, commands, "generating", "hashed")
    assert after.seq == wf.seq + 1


def test_a_generation_outcome_for_a_stamp_workflow_fails_it_instead_of_raising() -> None:
    c = core()
    wf = started(c, request())
    assert wf.state == "hashing"
    after, commands = c.step(wf, generation_done(wf.workflow_id))
    assert_failed_as_illegal(after, commands, "hashing", "generated")


@pytest.mark.parametrize("fail", [False, True])
def test_an_outcome_for_a_finished_workflow_is_unusable_not_a_crash(fail: bool) -> None:
    """Documented: a finished workflow is returned unchanged with one Unusable command and no
    transition, whatever the outcome (a second, different ending would contradict the first)."""
    c = core()
    wf = started(c, request())
    done, _ = c.step(wf, EffectFailed("x", "y", T0) if fail else stamp_done())
    assert done.state == ("failed" if fail else "completed")
    outcomes: list[Outcome] = [stamp_done(), generation_done(wf.workflow_id),
                               EffectFailed("late", "too late", T0)]
    for outcome in outcomes:
        again, commands = c.step(done, outcome)
        assert again == done
        assert len(commands) == 1
        assert isinstance(commands[0], Unusable)
        assert commands[0].error_code == "workflow_finished"
        assert str(done.workflow_id) in commands[0].reason


def test_an_outcome_for_a_workflow_failed_at_start_is_unusable() -> None:
    c = core(limit=3)
    wf = started(c, request(content=b"too long"))
    assert wf.state == "failed"
    again, commands = c.step(wf, stamp_done())
    assert again == wf
    assert [type(x) for x in commands] == [Unusable]


def test_start_with_a_payload_that_is_not_a_request_returns_unusable() -> None:
    c = core()
    events = run_stamp(c, request())
    for not_a_request in events:  # transitions, stamp.created, workflow.completed
        wf, commands = c.start(not_a_request, T0)
        assert wf is None
        assert len(commands) == 1
        assert isinstance(commands[0], Unusable)
        assert commands[0].error_code == "not_a_request"
        assert not_a_request.event_type in commands[0].reason


def test_step_never_changes_the_workflow_it_is_given() -> None:
    c = core()
    for req, outcome in [(request(), stamp_done()),
                         (request(), EffectFailed("not_found", "x: not found", T0)),
                         (generation_request(), None)]:
        wf = started(c, req)
        before = copy.deepcopy(wf)
        if outcome is None:
            outcome = generation_done(wf.workflow_id)
        after, _ = c.step(wf, outcome)
        assert wf == before
        assert (wf.state, wf.seq) == (before.state, before.seq)
        assert after != wf and after.seq > wf.seq and after.state != wf.state
    with pytest.raises(FrozenInstanceError):
        wf.seq = 99  # type: ignore[misc]


def test_start_and_reject_keep_the_context_typed() -> None:
    c = core()
    req = request("ctx")
    wf = started(c, req)
    assert wf.context == WorkflowContext(namespace="ctx", request_id=req.event_id,
                                         started_at=T0, request=req.payload)
    rid = uuid4()
    rejected, _ = c.reject("ctx", rid, "stamp", "invalid_request", "bad", T0)
    assert rejected is not None
    assert rejected.context == WorkflowContext(namespace="ctx", request_id=rid, started_at=T0)


def test_stamp_data_no_event_can_carry_fails_the_workflow() -> None:
    c = core()
    wf = started(c, request())
    after, commands = c.step(wf, stamp_done(digest="not hex"))
    failed = emitted(commands)[-1].payload
    assert isinstance(failed, WorkflowFailed)
    assert failed.error_code == "invalid_outcome"
    assert after.state == "failed"
    assert commands[-1] == Finished("failed")


def test_reject_with_an_unusable_namespace_returns_unusable() -> None:
    wf, commands = core().reject("Not A Namespace", uuid4(), "stamp", "x", "y", T0)
    assert wf is None
    assert [type(x) for x in commands] == [Unusable]


def test_an_fsm_that_cannot_fail_everywhere_is_a_contract_error() -> None:
    stamp = ORCH.fsm_named("stamp")
    narrowed = stamp.model_copy(update={"transitions": tuple(
        t.model_copy(update={"source": ("received",)}) if t.trigger == "fail" else t
        for t in stamp.transitions)})
    contract = ORCH.model_copy(update={"fsm": (narrowed,)})
    with pytest.raises(ContractError, match="fail"):
        OrchestratorCore(contract, Limits(max_content_bytes=10))


def _outcomes(workflow_id: UUID) -> st.SearchStrategy[Outcome]:
    at = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1),
                      timezones=st.just(UTC))
    return st.one_of(
        st.builds(StampSucceeded, hash=st.sampled_from(["ab" * 32, "00" * 32, "xyz"]),
                  size=st.integers(-1, 10**6), content_type=st.text(max_size=300),
                  stamped_at=at, at=at),
        st.builds(lambda when: GenerationSucceeded(generation_done(workflow_id).result, when),
                  at),
        st.builds(EffectFailed, error_code=st.text(max_size=300), reason=st.text(max_size=50),
                  at=at),
    )


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_step_never_raises_and_seq_always_grows_by_one(data: st.DataObject) -> None:
    c = core(limit=data.draw(st.sampled_from([3, 1000])))
    req = data.draw(st.sampled_from([request, generation_request]))()
    wf, commands = c.start(req, T0)
    assert wf is not None
    seqs = [e.payload.seq for e in emitted(commands)
            if isinstance(e.payload, WorkflowTransitioned)]
    finished = sum(isinstance(x, Finished) for x in commands)
    for outcome in data.draw(st.lists(_outcomes(wf.workflow_id), max_size=6)):
        before = copy.deepcopy(wf)
        was_terminal = c.machines[wf.kind].is_terminal(wf.state)
        after, more = c.step(wf, outcome)  # never raises
        assert wf == before
        seqs += [e.payload.seq for e in emitted(more)
                 if isinstance(e.payload, WorkflowTransitioned)]
        finished += sum(isinstance(x, Finished) for x in more)
        if was_terminal:
            assert after == wf and [type(x) for x in more] == [Unusable]
        else:
            assert c.machines[after.kind].is_terminal(after.state)
            assert not any(isinstance(x, Unusable) for x in more)
        wf = after
    assert seqs == list(range(1, len(seqs) + 1))
    assert wf.seq == seqs[-1]
    assert finished == (1 if c.machines[wf.kind].is_terminal(wf.state) else 0)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_every_event_the_core_emits_is_what_validation_would_build(data: st.DataObject) -> None:
    """The orchestrator builds its events without validating them again
    (envelope_of_validated): each must equal what decoding its own bytes gives."""
    from stampflow.contracts.events import decode

    c = core(limit=data.draw(st.integers(1, 10)))
    events = run_stamp(c, request(data.draw(st.sampled_from(["a", "n-1", "x_y"])),
                                  content=data.draw(st.binary(min_size=1, max_size=20))),
                       fail=data.draw(st.booleans()))
    assert events
    for envelope in events:
        assert decode(envelope.to_bytes()) == envelope
