"""The orchestrator's pure core: ``step(workflow, input) -> (workflow, commands)``.

It never does I/O and never reads a clock: the runner passes the time in, executes the
commands (publish an event, call the stamping compute node or the inference effect node) and
feeds each outcome back in. Every id is derived from the request's event id, so a request that
is delivered again after a crash produces exactly the same events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never
from uuid import UUID

from contracts.events import (
    Envelope,
    GenerationCompleted,
    GenerationRequested,
    StampCreated,
    StampRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowKind,
    WorkflowTransitioned,
    derive_id,
    derive_seed,
    envelope_for,
    storable,
)
from contracts.nodes import IoPolicy, NodeContract
from nodes.fsm import Transition, Workflow, WorkflowMachine

SOURCE = "orchestrator"
MAX_REASON_CHARS = 2000

# --- what the runner tells the core ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StampSucceeded:
    hash: str
    size: int
    content_type: str
    stamped_at: datetime
    at: datetime


@dataclass(frozen=True, slots=True)
class GenerationSucceeded:
    result: GenerationCompleted  # workflow_id filled in by the effect node's caller
    at: datetime


@dataclass(frozen=True, slots=True)
class EffectFailed:
    error_code: str
    reason: str
    at: datetime


Outcome = StampSucceeded | GenerationSucceeded | EffectFailed

# --- what the core tells the runner ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emit:
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class CallStamping:
    request: StampRequested


@dataclass(frozen=True, slots=True)
class CallInference:
    request: GenerationRequested
    seed: int


@dataclass(frozen=True, slots=True)
class Finished:
    state: str


Command = Emit | CallStamping | CallInference | Finished


@dataclass(frozen=True, slots=True)
class GenerationBudget:
    """What one generation may cost: the inference effect node's contract (None: no cap)."""

    max_pixel_steps: int | None = None  # width * height * num_inference_steps
    max_side: int | None = None
    max_steps: int | None = None

    @classmethod
    def from_policy(cls, policy: IoPolicy) -> GenerationBudget:
        return cls(policy.max_pixel_steps, policy.max_side, policy.max_steps)

    def refusal(self, request: GenerationRequested) -> str | None:
        """Why ``request`` is over budget, in one line naming the numbers; None if it fits."""
        w, h, steps = request.width, request.height, request.num_inference_steps
        if self.max_side is not None and max(w, h) > self.max_side:
            return (f"size {w}x{h}: a side of {max(w, h)} is over this node's cap of "
                    f"{self.max_side}")
        if self.max_steps is not None and steps > self.max_steps:
            return f"{steps} steps is over this node's cap of {self.max_steps} steps"
        if self.max_pixel_steps is not None and w * h * steps > self.max_pixel_steps:
            return (f"{w}x{h} at {steps} steps is {w * h * steps} pixel-steps, over this "
                    f"node's budget of {self.max_pixel_steps}")
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    max_content_bytes: int
    generation: GenerationBudget = GenerationBudget()

    @classmethod
    def from_contracts(
        cls, contracts: Mapping[str, NodeContract], max_content_bytes: int
    ) -> Limits:
        """The stamping cap given; the generation budget from the inference node's contract."""
        inference = contracts.get("inference")
        budget = (GenerationBudget() if inference is None
                  else GenerationBudget.from_policy(inference.io_policy))
        return cls(max_content_bytes, budget)


class OrchestratorCore:
    """Builds one :class:`WorkflowMachine` per FSM in the contract and steps workflows."""

    def __init__(self, contract: NodeContract, limits: Limits) -> None:
        self.limits = limits
        guards = {
            "content_within_limit": self._content_within_limit,
            "within_generation_limits": self._within_generation_limits,
        }
        self.machines: dict[str, WorkflowMachine] = {
            spec.name: WorkflowMachine(spec, guards) for spec in contract.fsm
        }

    # --- entry points --------------------------------------------------------------------------

    def start(self, request: Envelope, at: datetime) -> tuple[Workflow, list[Command]]:
        """A validated request arrives: create its workflow and say what to do first."""
        payload = request.payload
        match payload:
            case StampRequested():
                workflow, commands = self._create(request, "stamp", at)
                moved = self._fire(workflow, commands, "start", at, request=payload)
                if moved is None:
                    size = len(payload.content or b"")
                    self._fail(workflow, commands, "too_large",
                               f"content of {size} bytes exceeds the limit of "
                               f"{self.limits.max_content_bytes} bytes", at)
                else:
                    commands.append(CallStamping(payload))
                return workflow, commands
            case GenerationRequested():
                workflow, commands = self._create(request, "generation", at)
                if self._fire(workflow, commands, "start", at, request=payload) is None:
                    reason = self.limits.generation.refusal(payload) or "over budget"
                    self._fail(workflow, commands, "over_budget", reason, at)
                    return workflow, commands
                seed = payload.seed if payload.seed is not None else derive_seed(request.event_id)
                commands.append(CallInference(payload, seed))
                return workflow, commands
            case _:
                raise ValueError(f"{request.event_type} is not a request")

    def reject(
        self, namespace: str, request_id: UUID, kind: WorkflowKind, error_code: str, reason: str,
        at: datetime,
    ) -> tuple[Workflow, list[Command]]:
        """A request that failed validation but whose namespace and id could be read."""
        envelope_ctx = {"namespace": namespace, "request_id": request_id, "started_at": at}
        workflow, transition = self.machines[kind].create(
            derive_id(request_id, "workflow"), **envelope_ctx
        )
        commands: list[Command] = [self._transition_event(workflow, transition, at)]
        self._fail(workflow, commands, error_code, reason, at)
        return workflow, commands

    def step(self, workflow: Workflow, outcome: Outcome) -> tuple[Workflow, list[Command]]:
        """An effect finished: move the workflow on."""
        commands: list[Command] = []
        match outcome:
            case StampSucceeded():
                self._fire(workflow, commands, "hashed", outcome.at)
                request: StampRequested = workflow.context["request"]
                commands.append(self._emit(workflow, "stamp.created", StampCreated(
                    workflow_id=workflow.workflow_id, hash=outcome.hash, size=outcome.size,
                    content_type=outcome.content_type, stamped_at=outcome.stamped_at,
                    source=request.path,
                ), outcome.at))
                self._complete(workflow, commands, outcome.at)
            case GenerationSucceeded():
                self._fire(workflow, commands, "generated", outcome.at)
                commands.append(self._emit(workflow, "generation.completed", outcome.result,
                                           outcome.at))
                self._complete(workflow, commands, outcome.at)
            case EffectFailed():
                self._fail(workflow, commands, outcome.error_code, outcome.reason, outcome.at)
            case _:
                assert_never(outcome)
        return workflow, commands

    # --- helpers -----------------------------------------------------------------------------

    def _create(
        self, request: Envelope, kind: WorkflowKind, at: datetime
    ) -> tuple[Workflow, list[Command]]:
        workflow, transition = self.machines[kind].create(
            derive_id(request.event_id, "workflow"),
            namespace=request.namespace, request_id=request.event_id, started_at=at,
            request=request.payload,
        )
        return workflow, [self._transition_event(workflow, transition, at)]

    def _fire(
        self, workflow: Workflow, commands: list[Command], trigger: str, at: datetime,
        reason: str | None = None, **kwargs: Any,
    ) -> Transition | None:
        transition = self.machines[workflow.kind].fire(workflow, trigger, **kwargs)
        if transition is not None:
            commands.append(self._transition_event(workflow, transition, at, reason))
        return transition

    def _complete(self, workflow: Workflow, commands: list[Command], at: datetime) -> None:
        self._fire(workflow, commands, "complete", at)
        started: datetime = workflow.context["started_at"]
        commands.append(self._emit(workflow, "terminal", WorkflowCompleted(
            workflow_id=workflow.workflow_id, workflow_kind=_kind(workflow),
            duration_ms=max(0.0, (at - started).total_seconds() * 1000.0),
        ), at))
        commands.append(Finished(workflow.state))

    def _fail(
        self, workflow: Workflow, commands: list[Command], error_code: str, reason: str,
        at: datetime,
    ) -> None:
        reason = storable(reason, MAX_REASON_CHARS)
        self._fire(workflow, commands, "fail", at, reason=reason)
        commands.append(self._emit(workflow, "terminal", WorkflowFailed(
            workflow_id=workflow.workflow_id, workflow_kind=_kind(workflow),
            error_code=storable(error_code, 200), reason=reason,
        ), at))
        commands.append(Finished(workflow.state))

    def _transition_event(
        self, workflow: Workflow, t: Transition, at: datetime, reason: str | None = None
    ) -> Emit:
        return self._emit(workflow, f"t{t.seq}", WorkflowTransitioned(
            workflow_id=workflow.workflow_id, workflow_kind=_kind(workflow), seq=t.seq,
            from_state=t.from_state, to_state=t.to_state, trigger=t.trigger, reason=reason,
        ), at)

    def _emit(self, workflow: Workflow, slot: str, payload: Any, at: datetime) -> Emit:
        # One id per slot: a transition's id depends on its seq, and every terminal event of a
        # workflow shares one id, so a re-run can never count a workflow as both done and failed.
        request_id: UUID = workflow.context["request_id"]
        return Emit(envelope_for(
            payload, namespace=workflow.context["namespace"],
            event_id=derive_id(workflow.workflow_id, slot), correlation_id=request_id,
            causation_id=request_id, source=SOURCE, occurred_at=at,
        ))

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


def _kind(workflow: Workflow) -> WorkflowKind:
    if workflow.kind == "stamp":
        return "stamp"
    if workflow.kind == "generation":
        return "generation"
    raise ValueError(f"unknown workflow kind {workflow.kind!r}")
