"""The hand-over between the orchestrator and the inference node, as pure data: the job the
core dispatches, the worker's result for it, and the core resuming the workflow from it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from stampflow.contracts.events import (
    Envelope,
    GenerationCompleted,
    GenerationRequested,
    InferenceJob,
    InferenceResult,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowTransitioned,
    decode,
    envelope_for,
)
from stampflow.contracts.nodes import ContractError, FsmSpec, builtin_contract
from stampflow.inference.worker import read_job, result_for
from stampflow.nodes.orchestrator.core import (
    DispatchInference,
    EffectFailed,
    Emit,
    Finished,
    GenerationSucceeded,
    Limits,
    OrchestratorCore,
    Unusable,
)

ORCH = builtin_contract("orchestrator")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=2)


def core() -> OrchestratorCore:
    return OrchestratorCore(ORCH, Limits(max_content_bytes=1000))


def generation_request(ns: str = "tenant") -> Envelope:
    rid = uuid4()
    return envelope_for(GenerationRequested(prompt="a red cat", seed=7, model="tiny"),
                        namespace=ns, event_id=rid, correlation_id=rid, causation_id=None,
                        source="test", occurred_at=T0)


def dispatched(req: Envelope) -> tuple[list[Envelope], Envelope]:
    workflow, commands = core().start(req, T0)
    assert workflow is not None and workflow.state == "generating"
    emitted = [c.envelope for c in commands if isinstance(c, Emit)]
    jobs = [c.job for c in commands if isinstance(c, DispatchInference)]
    assert len(jobs) == 1 and isinstance(commands[-1], DispatchInference)
    assert not any(isinstance(c, Finished) for c in commands)
    return emitted, jobs[0]


def completed_for(job: Envelope) -> GenerationCompleted:
    payload = job.payload
    assert isinstance(payload, InferenceJob)
    return GenerationCompleted(
        workflow_id=payload.workflow_id, artifact_uri="file:///a.png", hash="ab" * 32, size=9,
        seed=payload.seed, width=512, height=512, num_inference_steps=4, model="tiny",
        device="cpu", prompt_tokens=3)


def test_a_generation_is_dispatched_as_a_job_carrying_what_resuming_needs() -> None:
    req = generation_request()
    emitted, job = dispatched(req)
    assert [e.payload.to_state for e in emitted
            if isinstance(e.payload, WorkflowTransitioned)] == ["received", "generating"]
    payload = job.payload
    assert isinstance(payload, InferenceJob)
    assert (payload.state, payload.seq, payload.seed) == ("generating", 2, 7)
    assert payload.started_at == T0 and payload.request == req.payload
    assert job.namespace == "tenant" and job.correlation_id == req.event_id
    # keyed like the workflow's events: its result and its events share a partition order
    assert job.key() == emitted[0].key() == str(payload.workflow_id).encode()
    # the same request dispatches the same job (a redelivered request adds nothing new)
    assert dispatched(req)[1] == job


def test_resuming_from_a_completed_result_finishes_the_workflow() -> None:
    req = generation_request()
    emitted, job = dispatched(req)
    result = result_for(job, GenerationSucceeded(completed_for(job), T1), T1)
    assert decode(result.to_bytes()) == result
    workflow, commands = core().resume(result, T1)
    assert workflow is not None and workflow.state == "completed"
    out = [c.envelope for c in commands if isinstance(c, Emit)]
    assert [e.event_type for e in out] == [
        "workflow.transitioned", "generation.completed", "workflow.transitioned",
        "workflow.completed"]
    seqs = [e.payload.seq for e in out if isinstance(e.payload, WorkflowTransitioned)]
    assert seqs == [3, 4]  # the history goes on where the request's part left it
    done = out[-1].payload
    assert isinstance(done, WorkflowCompleted)
    assert done.duration_ms == pytest.approx(2000.0)
    assert all(e.correlation_id == req.event_id and e.namespace == "tenant" for e in out)
    assert Finished("completed") in commands
    # the whole workflow's ids are distinct, and a second result (a job run twice) gives the
    # very same events: the reducer applies them once
    assert len({e.event_id for e in emitted + out}) == len(emitted + out)
    again = core().resume(result_for(job, GenerationSucceeded(completed_for(job), T1), T1), T1)
    assert [c.envelope.event_id for c in again[1] if isinstance(c, Emit)] == [
        e.event_id for e in out]


def test_resuming_from_a_failed_result_fails_the_workflow_with_the_node_s_code() -> None:
    _, job = dispatched(generation_request())
    result = result_for(job, EffectFailed("unknown_model", "no model 'tiny'", T1), T1)
    workflow, commands = core().resume(result, T1)
    assert workflow is not None and workflow.state == "failed"
    failed = [c.envelope.payload for c in commands if isinstance(c, Emit)][-1]
    assert isinstance(failed, WorkflowFailed)
    assert (failed.error_code, failed.reason) == ("unknown_model", "no model 'tiny'")


def test_a_result_for_a_state_that_does_not_wait_is_unusable() -> None:
    _, job = dispatched(generation_request())
    good = result_for(job, GenerationSucceeded(completed_for(job), T1), T1)
    payload = good.payload
    assert isinstance(payload, InferenceResult)
    forged = good.model_copy(update={"payload": payload.model_copy(update={"state": "stamping"})})
    workflow, commands = core().resume(forged, T1)
    assert workflow is None
    assert len(commands) == 1 and isinstance(commands[0], Unusable)
    assert commands[0].error_code == "not_waiting"
    # and a job is not a result
    workflow, commands = core().resume(job, T1)
    assert workflow is None and isinstance(commands[0], Unusable)


def test_a_result_must_carry_exactly_one_outcome() -> None:
    _, job = dispatched(generation_request())
    payload = job.payload
    assert isinstance(payload, InferenceJob)
    common = {"workflow_id": payload.workflow_id, "state": "generating", "seq": 2,
              "started_at": T0}
    with pytest.raises(ValueError, match="exactly one"):
        InferenceResult(**common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        InferenceResult(**common, completed=completed_for(job), error_code="x")  # type: ignore[arg-type]
    other = completed_for(job).model_copy(update={"workflow_id": uuid4()})
    with pytest.raises(ValueError, match="workflow_id"):
        InferenceResult(**common, completed=other)  # type: ignore[arg-type]


def test_the_worker_reads_only_jobs_and_says_why_not() -> None:
    _, job = dispatched(generation_request())
    assert read_job(job.to_bytes(), 1 << 20) == job
    assert "exceeds the limit" in str(read_job(job.to_bytes(), 10))
    assert "not an inference.job" in str(read_job(generation_request().to_bytes(), 1 << 20))
    reason = read_job(b"\x00not json", 1 << 20)
    assert isinstance(reason, str) and "\n" not in reason


def test_a_generation_fsm_must_declare_that_it_waits_for_the_result() -> None:
    spec = ORCH.fsm_named("generation")
    without = FsmSpec.model_validate({**spec.model_dump(), "waits": {}})
    contract = ORCH.model_copy(update={"fsm": tuple(
        without if s.name == "generation" else s for s in ORCH.fsm)})
    with pytest.raises(ContractError, match="waits"):
        OrchestratorCore(contract, Limits(max_content_bytes=1))
    with pytest.raises(ValueError, match="unknown event type"):
        FsmSpec.model_validate({**spec.model_dump(), "waits": {"generating": "nope"}})
    with pytest.raises(ValueError, match="non-terminal"):
        FsmSpec.model_validate({**spec.model_dump(), "waits": {"completed": "inference.result"}})


def test_a_job_or_a_result_on_the_requests_topic_is_refused_as_no_request() -> None:
    from stampflow.nodes.orchestrator.admission import Refused, admit

    _, job = dispatched(generation_request())
    result = result_for(job, EffectFailed("timeout", "slow", T1), T1)
    for envelope in (job, result):
        answer = admit(envelope.to_bytes())
        assert isinstance(answer, Refused) and answer.code == "unexpected_event", answer
        assert answer.kind == "generation"
