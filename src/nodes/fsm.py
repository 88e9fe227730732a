"""Workflow state machines built from contracts, with `transitions` kept behind a typed API.

One ``transitions.Machine`` per FSM contract is shared by every workflow of that kind. A
workflow is an immutable :class:`Workflow` value; :meth:`WorkflowMachine.fire` never changes
the workflow it is given and never raises for a trigger: it returns what happened, as data:

- :class:`Taken`: the transition was taken; it carries the *new* workflow (state moved on,
  ``seq`` one higher) and the :class:`Transition`.
- :class:`Blocked`: a guard refused; the workflow stays as it was.
- :class:`Illegal`: the machine has no such transition from the workflow's state (or no such
  trigger at all); ``reason`` names the machine, the state and the trigger.

The FSM spec in the contract is the single source of truth: the `transitions` machine is built
from it, and it evaluates the guards and picks the destination. It runs on a private scratch
model for each ``fire``, so the library never sees, let alone mutates, a caller's workflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from transitions import EventData, Machine, MachineError

from stampflow.contracts.events import GenerationRequested, StampRequested
from stampflow.contracts.nodes import ContractError, FsmSpec

CREATE_TRIGGER = "create"


@dataclass(frozen=True, slots=True)
class WorkflowContext:
    """What a workflow remembers of the request that started it.

    ``request`` is None for a workflow made for a request that failed validation (the
    orchestrator core's ``reject``): only its namespace and id could be read.
    """

    namespace: str
    request_id: UUID
    started_at: datetime
    request: StampRequested | GenerationRequested | None = None


@dataclass(frozen=True, slots=True)
class Workflow:
    """One workflow's FSM state, as an immutable value. ``seq`` counts the transitions taken,
    creation included. A transition makes a new ``Workflow``; none is ever changed."""

    workflow_id: UUID
    kind: str
    state: str
    seq: int = 1
    context: WorkflowContext = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Transition:
    seq: int
    from_state: str | None
    to_state: str
    trigger: str


@dataclass(frozen=True, slots=True)
class Taken:
    """The trigger was taken: ``workflow`` is the workflow after it."""

    workflow: Workflow
    transition: Transition


@dataclass(frozen=True, slots=True)
class Blocked:
    """A guard refused the trigger: ``workflow`` is the one given, unchanged."""

    workflow: Workflow
    machine: str
    trigger: str

    @property
    def reason(self) -> str:
        return (f"{self.machine} FSM: a guard refused trigger {self.trigger!r} in state "
                f"{self.workflow.state!r}")


@dataclass(frozen=True, slots=True)
class Illegal:
    """The machine has no transition for ``trigger`` from ``state``; nothing moved."""

    machine: str
    state: str
    trigger: str

    @property
    def reason(self) -> str:
        return (f"{self.machine} FSM: trigger {self.trigger!r} is not allowed in state "
                f"{self.state!r}")

    def __str__(self) -> str:
        return self.reason


Fired = Taken | Blocked | Illegal

# A guard sees the workflow and the keyword arguments given to ``fire``.
Guard = Callable[[Workflow, Mapping[str, Any]], bool]


class _Scratch:
    """The model `transitions` moves during one ``fire``: never a caller's workflow."""

    __slots__ = ("state", "workflow")

    def __init__(self, workflow: Workflow) -> None:
        self.state = workflow.state
        self.workflow = workflow


class WorkflowMachine:
    """The typed face of one contract FSM. Pure: no I/O, no clocks, no mutation of its inputs.

    Raises :class:`ContractError` at construction when a guard the spec names has no
    implementation (configuration, not data); after that, nothing it does raises for a
    trigger or a state.
    """

    def __init__(self, spec: FsmSpec, guards: Mapping[str, Guard]) -> None:
        missing = spec.guard_names - guards.keys()
        if missing:
            raise ContractError(
                f"FSM {spec.name!r}: guard(s) {sorted(missing)} have no implementation"
            )
        self.spec = spec
        self._terminal = frozenset(spec.terminal)
        self._machine = Machine(
            model=None,
            states=list(spec.states),
            initial=spec.initial,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
            name=spec.name,
        )
        for t in spec.transitions:
            self._machine.add_transition(
                t.trigger,
                list(t.source),
                t.dest,
                conditions=[_adapt(guards[name]) for name in t.guards],
            )

    @property
    def name(self) -> str:
        return self.spec.name

    def create(self, workflow_id: UUID, context: WorkflowContext) -> tuple[Workflow, Transition]:
        workflow = Workflow(workflow_id, self.spec.name, self.spec.initial, 1, context=context)
        return workflow, Transition(1, None, self.spec.initial, CREATE_TRIGGER)

    def fire(self, workflow: Workflow, trigger: str, **kwargs: Any) -> Fired:
        """Take ``trigger`` from ``workflow``'s state; see the module docstring for the three
        results. ``workflow`` is never changed. ``kwargs`` go to the guards."""
        event = self._machine.events.get(trigger)
        if event is None or workflow.state not in event.transitions:
            return Illegal(self.spec.name, workflow.state, trigger)
        scratch = _Scratch(workflow)
        try:
            moved = event.trigger(scratch, **kwargs)
        except MachineError:  # not expected after the check above; still data, not a crash
            return Illegal(self.spec.name, workflow.state, trigger)
        if not moved:
            return Blocked(workflow, self.spec.name, trigger)
        seq = workflow.seq + 1
        # Built directly: dataclasses.replace() inspects the fields on every call.
        after = Workflow(workflow.workflow_id, workflow.kind, scratch.state, seq,
                         context=workflow.context)
        return Taken(after, Transition(seq, workflow.state, after.state, trigger))

    def is_terminal(self, state: str) -> bool:
        return state in self._terminal


def _adapt(guard: Guard) -> Callable[[EventData], bool]:
    def condition(event: EventData) -> bool:
        scratch = event.model
        assert isinstance(scratch, _Scratch)
        return bool(guard(scratch.workflow, event.kwargs))

    condition.__name__ = getattr(guard, "__name__", "guard")
    return condition
