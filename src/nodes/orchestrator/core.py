"""The orchestrator's pure core: ``step(workflow, input) -> (workflow, commands)``.

It never does I/O and never reads a clock: the runner passes the time in, executes the
commands (publish an event, call the stamping compute node, hand a generation to the
inference node as a job) and feeds each outcome back in. A generation workflow waits for the
inference node in a state its FSM declares (``waits``): :meth:`OrchestratorCore.resume`
rebuilds it from the result, which carries everything needed, so any orchestrator can take
it. Every id is derived from the request's event id, so a request (or a result) that is
delivered again after a crash produces exactly the same events.

Pure in the reducer's way:

- It never changes its input. :class:`~stampflow.nodes.fsm.Workflow` is a frozen value; every
  entry point returns the workflow *after* the call, and the one passed in stays as it was.
- It never raises for data. Input the workflow cannot use ends the workflow as failed, with
  the usual events: an outcome that does not fit the workflow's state (a ``StampSucceeded``
  for a generation workflow, say) is the FSM's illegal transition, so the workflow goes to
  ``failed`` with a reason naming the state and the trigger, then ``workflow.failed`` with
  ``error_code="illegal_transition"``, then ``Finished("failed")``. Input for which no
  workflow exists or can move yields the single command :class:`Unusable` and no events:
  ``start`` with a payload that is not a request (no workflow: the runner dead-letters the
  record), or ``step`` on a workflow that has already finished (returned unchanged: its
  terminal events are out, and a second, different ending would contradict them).
- Configuration may raise, at construction only: a guard the contract names but nobody
  implements, or an FSM without an unguarded ``fail`` from each non-terminal state
  (:class:`~stampflow.contracts.nodes.ContractError`).

The times passed in (``at``, ``outcome.at``) are the runner's clock and must be
timezone-aware; that is the caller's side of the contract, not data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, assert_never
from uuid import UUID

from pydantic import ValidationError

from stampflow.contracts.events import (
    NAMESPACE_PATTERN,
    Envelope,
    GenerationRequested,
    InferenceJob,
    InferenceResult,
    StampCreated,
    StampRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowKind,
    WorkflowTransitioned,
    derive_id,
    derive_seed,
    envelope_for,
    envelope_of_validated,
    storable,
)
from stampflow.contracts.nodes import ContractError, FsmSpec, NodeContract
from stampflow.nodes.fsm import (
    Blocked,
    Fired,
    Illegal,
    Taken,
    Transition,
    Workflow,
    WorkflowContext,
    WorkflowMachine,
)
from stampflow.nodes.orchestrator.commands import (
    CallStamping,
    Command,
    DispatchInference,
    EffectFailed,
    Emit,
    Finished,
    GenerationSucceeded,
    Outcome,
    StampSucceeded,
    Unusable,
)
from stampflow.nodes.orchestrator.limits import GenerationBudget, Limits

__all__ = [
    "CallStamping", "Command", "DispatchInference", "EffectFailed", "Emit", "Finished",
    "GenerationBudget", "GenerationSucceeded", "Limits", "OrchestratorCore", "Outcome",
    "StampSucceeded", "Unusable",
]

SOURCE = "orchestrator"
MAX_REASON_CHARS = 2000
INFERENCE_RESULT = "inference.result"

class OrchestratorCore:
    """Builds one :class:`WorkflowMachine` per FSM in the contract and steps workflows.

    Every entry point returns ``(workflow, commands)``: the workflow after the call (a new
    value; the one passed in is never changed) and what the runner is to do, in order.
    """

    def __init__(self, contract: NodeContract, limits: Limits) -> None:
        self.limits = limits
        guards = {
            "content_within_limit": self._content_within_limit,
            "within_generation_limits": self._within_generation_limits,
        }
        for spec in contract.fsm:
            _check_can_fail(spec)
        self.specs: dict[str, FsmSpec] = {spec.name: spec for spec in contract.fsm}
        if "generation" in self.specs:
            _check_waits_for_inference(self.specs["generation"])
        self.machines: dict[str, WorkflowMachine] = {
            spec.name: WorkflowMachine(spec, guards) for spec in contract.fsm
        }

    # --- entry points --------------------------------------------------------------------------

    def start(self, request: Envelope, at: datetime) -> tuple[Workflow | None, list[Command]]:
        """A validated request arrives: create its workflow and say what to do first.

        A payload that is not a request gives no workflow and ``[Unusable("not_a_request",
        reason)]``; the runner dead-letters it. Never raises for data.
        """
        payload = request.payload
        if not isinstance(payload, StampRequested | GenerationRequested):
            return None, [Unusable("not_a_request", (
                f"{request.event_type} is not a request: only stamp.requested and "
                "generation.requested start a workflow"))]
        kind: WorkflowKind = "stamp" if isinstance(payload, StampRequested) else "generation"
        machine = self.machines.get(kind)
        if machine is None:
            return None, [_no_fsm(kind)]
        context = WorkflowContext(namespace=request.namespace, request_id=request.event_id,
                                  started_at=at, request=payload)
        run = _Run.create(machine, kind, derive_id(request.event_id, "workflow"), context, at)
        match payload:
            case StampRequested():
                moved = run.take("start", request=payload)
                if isinstance(moved, Blocked):
                    size = len(payload.content or b"")
                    run.fail("too_large",
                             f"content of {size} bytes exceeds the limit of "
                             f"{self.limits.max_content_bytes} bytes")
                elif isinstance(moved, Illegal):
                    run.refused(moved, "a new stamp workflow cannot start")
                else:
                    run.commands.append(CallStamping(payload))
            case GenerationRequested():
                moved = run.take("start", request=payload)
                if isinstance(moved, Blocked):
                    reason = self.limits.generation.refusal(payload) or "over budget"
                    run.fail("over_budget", reason)
                elif isinstance(moved, Illegal):
                    run.refused(moved, "a new generation workflow cannot start")
                else:
                    seed = (payload.seed if payload.seed is not None
                            else derive_seed(request.event_id))
                    run.dispatch(payload, seed)
            case _:
                assert_never(payload)
        return run.workflow, run.commands

    def reject(
        self, namespace: str, request_id: UUID, kind: WorkflowKind, error_code: str, reason: str,
        at: datetime,
    ) -> tuple[Workflow | None, list[Command]]:
        """A request that failed validation but whose namespace and id could be read: a
        workflow created and failed at once. ``(None, [Unusable(...)])`` when no event can
        name it (a namespace outside the pattern, a kind without an FSM). Never raises."""
        if not NAMESPACE_PATTERN.match(namespace):
            return None, [_invalid_namespace(namespace)]
        machine = self.machines.get(kind)
        if machine is None:
            return None, [_no_fsm(kind)]
        context = WorkflowContext(namespace=namespace, request_id=request_id, started_at=at)
        run = _Run.create(machine, kind, derive_id(request_id, "workflow"), context, at)
        run.fail(error_code, reason)
        return run.workflow, run.commands

    def resume(self, result: Envelope, at: datetime) -> tuple[Workflow | None, list[Command]]:
        """The inference node's result arrives: rebuild the waiting workflow from it and move
        it on (``generated`` then ``complete``, or ``fail`` with the node's error code).

        A payload that is not an ``inference.result``, or one naming a state in which the
        generation FSM does not wait for it, gives no workflow and ``[Unusable(...)]``: the
        runner dead-letters the record. Never raises for data.
        """
        payload = result.payload
        if not isinstance(payload, InferenceResult):
            return None, [Unusable("not_a_result", (
                f"{result.event_type} is not an {INFERENCE_RESULT}"))]
        spec = self.specs.get("generation")
        if spec is None:
            return None, [_no_fsm("generation")]
        if spec.waits.get(payload.state) != INFERENCE_RESULT:
            return None, [Unusable("not_waiting", (
                f"the generation FSM does not wait for {INFERENCE_RESULT} in state "
                f"{storable(payload.state, 100)!r}"))]
        workflow = Workflow(
            payload.workflow_id, "generation", payload.state, payload.seq,
            context=WorkflowContext(namespace=result.namespace,
                                    request_id=result.correlation_id,
                                    started_at=payload.started_at))
        outcome: Outcome
        if payload.completed is not None:
            outcome = GenerationSucceeded(result=payload.completed, at=at)
        else:
            outcome = EffectFailed(payload.error_code or "inference_failed",
                                   payload.reason or "the inference node gave no reason", at)
        return self.step(workflow, outcome)

    def step(self, workflow: Workflow, outcome: Outcome) -> tuple[Workflow, list[Command]]:
        """An effect finished: move the workflow on. ``workflow`` is not changed.

        An outcome that does not fit the workflow's state fails the workflow
        (``illegal_transition``, the reason naming the state and the trigger); an outcome
        whose data no event can carry fails it too (``invalid_outcome``). A workflow that has
        already finished is returned unchanged with ``[Unusable("workflow_finished", ...)]``
        and no transition. Never raises for data.
        """
        kind = _kind(workflow.kind)
        machine = None if kind is None else self.machines.get(kind)
        if kind is None or machine is None:
            return workflow, [_no_fsm(workflow.kind)]
        if not NAMESPACE_PATTERN.match(workflow.context.namespace):
            return workflow, [_invalid_namespace(workflow.context.namespace)]
        if machine.is_terminal(workflow.state):
            return workflow, [Unusable("workflow_finished", (
                f"workflow {workflow.workflow_id} has already finished in state "
                f"{workflow.state!r}; {type(outcome).__name__} ignored"))]
        run = _Run(machine, kind, workflow, outcome.at)
        match outcome:
            case StampSucceeded():
                moved = run.take("hashed")
                if not isinstance(moved, Taken):
                    run.refused(moved, f"{type(outcome).__name__} does not fit the workflow")
                    return run.workflow, run.commands
                request = workflow.context.request
                try:
                    created = StampCreated(
                        workflow_id=workflow.workflow_id, hash=outcome.hash, size=outcome.size,
                        content_type=outcome.content_type, stamped_at=outcome.stamped_at,
                        source=request.path if isinstance(request, StampRequested) else None,
                    )
                except ValidationError as err:
                    run.fail("invalid_outcome", f"the stamp cannot be recorded: {_errors(err)}")
                    return run.workflow, run.commands
                run.emit("stamp.created", created)
                run.complete()
            case GenerationSucceeded():
                moved = run.take("generated")
                if not isinstance(moved, Taken):
                    run.refused(moved, f"{type(outcome).__name__} does not fit the workflow")
                    return run.workflow, run.commands
                run.emit("generation.completed", outcome.result)
                run.complete()
            case EffectFailed():
                run.fail(outcome.error_code, outcome.reason)
            case _:
                assert_never(outcome)
        return run.workflow, run.commands

    # --- guards ------------------------------------------------------------------------------

    def _content_within_limit(self, workflow: Workflow, kwargs: Mapping[str, Any]) -> bool:
        request = kwargs.get("request")
        if isinstance(request, StampRequested) and request.content is not None:
            return len(request.content) <= self.limits.max_content_bytes
        return True

    def _within_generation_limits(self, workflow: Workflow, kwargs: Mapping[str, Any]) -> bool:
        request = kwargs.get("request")
        if isinstance(request, GenerationRequested):
            return self.limits.generation.refusal(request) is None
        return True


class _Run:
    """One entry point's work on one workflow: the workflow as it moves, and the commands so
    far. Private to a single call, like the reducer's ``_Reduction``: it replaces its own
    ``workflow`` with each transition's result and never changes a workflow it was given."""

    __slots__ = ("at", "commands", "kind", "machine", "workflow")

    def __init__(self, machine: WorkflowMachine, kind: WorkflowKind, workflow: Workflow,
                 at: datetime) -> None:
        self.machine = machine
        self.kind = kind
        self.workflow = workflow
        self.at = at
        self.commands: list[Command] = []

    @classmethod
    def create(cls, machine: WorkflowMachine, kind: WorkflowKind, workflow_id: UUID,
               context: WorkflowContext, at: datetime) -> _Run:
        workflow, created = machine.create(workflow_id, context)
        run = cls(machine, kind, workflow, at)
        run.commands.append(run._transition_event(created, None))
        return run

    def take(self, trigger: str, reason: str | None = None, **kwargs: Any) -> Fired:
        """Fire ``trigger``; when taken, move on and emit the transition."""
        fired = self.machine.fire(self.workflow, trigger, **kwargs)
        if isinstance(fired, Taken):
            self.workflow = fired.workflow
            self.commands.append(self._transition_event(fired.transition, reason))
        return fired

    def refused(self, fired: Blocked | Illegal, what: str) -> None:
        """The FSM would not take a trigger the input called for: the workflow fails, the
        reason saying ``what`` and naming the state and the trigger."""
        code = "illegal_transition" if isinstance(fired, Illegal) else "guard_refused"
        self.fail(code, f"{what}: {fired.reason}")

    def dispatch(self, request: GenerationRequested, seed: int) -> None:
        """Hand the generation to the inference node: the job carries what any orchestrator
        needs to resume the workflow from its result. One id per dispatch (its ``seq``)."""
        workflow, context = self.workflow, self.workflow.context
        job = InferenceJob(workflow_id=workflow.workflow_id, state=workflow.state,
                           seq=workflow.seq, started_at=context.started_at, seed=seed,
                           request=request)
        self.commands.append(DispatchInference(envelope_for(
            job, namespace=context.namespace,
            event_id=derive_id(workflow.workflow_id, f"job{workflow.seq}"),
            correlation_id=context.request_id, causation_id=context.request_id,
            source=SOURCE, occurred_at=self.at)))

    def complete(self) -> None:
        moved = self.take("complete")
        if not isinstance(moved, Taken):
            self.refused(moved, "the workflow cannot complete")
            return
        started = self.workflow.context.started_at
        self.emit("terminal", WorkflowCompleted(
            workflow_id=self.workflow.workflow_id, workflow_kind=self.kind,
            duration_ms=max(0.0, (self.at - started).total_seconds() * 1000.0),
        ))
        self.commands.append(Finished(self.workflow.state))

    def fail(self, error_code: str, reason: str) -> None:
        reason = storable(reason, MAX_REASON_CHARS)
        moved = self.take("fail", reason=reason)
        if not isinstance(moved, Taken):
            # Unreachable: the constructor checked that every non-terminal state can fail, and
            # callers never fail a finished workflow. Kept so that even then nothing raises.
            self.commands = [Unusable(error_code, f"{reason}; and {_reason(moved)}")]
            return
        self.emit("terminal", WorkflowFailed(
            workflow_id=self.workflow.workflow_id, workflow_kind=self.kind,
            error_code=storable(error_code, 200), reason=reason,
        ))
        self.commands.append(Finished(self.workflow.state))

    def emit(self, slot: str, payload: Any) -> None:
        self.commands.append(self._envelope(slot, payload))

    def _transition_event(self, t: Transition, reason: str | None) -> Emit:
        return self._envelope(f"t{t.seq}", WorkflowTransitioned(
            workflow_id=self.workflow.workflow_id, workflow_kind=self.kind, seq=t.seq,
            from_state=t.from_state, to_state=t.to_state, trigger=t.trigger, reason=reason,
        ))

    def _envelope(self, slot: str, payload: Any) -> Emit:
        # One id per slot: a transition's id depends on its seq, and every terminal event of a
        # workflow shares one id, so a re-run can never count a workflow as both done and failed.
        # The payload was validated when it was built, and the rest comes from a validated
        # request: not validated again (bench/README.md, "Levers").
        context = self.workflow.context
        return Emit(envelope_of_validated(
            payload, namespace=context.namespace,
            event_id=derive_id(self.workflow.workflow_id, slot),
            correlation_id=context.request_id, causation_id=context.request_id, source=SOURCE,
            occurred_at=self.at,
        ))


def _check_can_fail(spec: FsmSpec) -> None:
    """The core ends any workflow that cannot go on by firing ``fail``: every non-terminal
    state must have that transition, unguarded, into a terminal state."""
    terminal = set(spec.terminal)
    can_fail = {src for t in spec.transitions
                if t.trigger == "fail" and not t.guards and t.dest in terminal
                for src in t.source}
    stuck = sorted(set(spec.states) - terminal - can_fail)
    if stuck:
        raise ContractError(
            f"FSM {spec.name!r}: state(s) {stuck} have no unguarded 'fail' transition into a "
            "terminal state")


def _check_waits_for_inference(spec: FsmSpec) -> None:
    """A generation workflow is handed to the inference node from the state its ``start``
    reaches, so the FSM must declare that it waits there for ``inference.result``."""
    after_start = {t.dest for t in spec.transitions
                   if t.trigger == "start" and spec.initial in t.source}
    for state in sorted(after_start):
        if spec.waits.get(state) != INFERENCE_RESULT:
            raise ContractError(
                f"FSM {spec.name!r}: state {state!r} (after 'start') must declare "
                f"waits: {{{state}: {INFERENCE_RESULT}}}")


def _kind(name: str) -> WorkflowKind | None:
    if name == "stamp":
        return "stamp"
    if name == "generation":
        return "generation"
    return None


def _no_fsm(kind: str) -> Unusable:
    return Unusable("no_fsm", f"the orchestrator has no FSM for workflow kind "
                              f"{storable(kind, 100)!r}")


def _invalid_namespace(namespace: str) -> Unusable:
    return Unusable("invalid_namespace",
                    f"namespace {storable(namespace, 100)!r} cannot name an event")


def _reason(fired: Fired) -> str:
    return "it moved" if isinstance(fired, Taken) else fired.reason


def _errors(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
