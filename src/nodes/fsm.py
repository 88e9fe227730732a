"""Workflow state machines built from contracts, with `transitions` kept behind a typed API.

One ``transitions.Machine`` per FSM contract is shared by every workflow of that kind: a
workflow is a small :class:`Workflow` object holding its own state, and triggers are fired
through the machine's event table, so no per-workflow methods are attached at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from transitions import EventData, Machine, MachineError

from contracts.nodes import ContractError, FsmSpec

CREATE_TRIGGER = "create"


class IllegalTransition(Exception):
    """A trigger fired in a state that has no such transition."""

    def __init__(self, machine: str, state: str, trigger: str) -> None:
        super().__init__(f"{machine} FSM: trigger {trigger!r} is not allowed in state {state!r}")
        self.machine = machine
        self.state = state
        self.trigger = trigger


@dataclass(slots=True)
class Workflow:
    """One workflow's FSM state. ``seq`` counts the transitions taken, creation included."""

    workflow_id: UUID
    kind: str
    state: str
    seq: int = 1
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    seq: int
    from_state: str | None
    to_state: str
    trigger: str


# A guard sees the workflow and the keyword arguments given to ``fire``.
Guard = Callable[[Workflow, Mapping[str, Any]], bool]


class WorkflowMachine:
    """The typed face of one contract FSM. Pure: no I/O, no clocks."""

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

    def create(self, workflow_id: UUID, **context: Any) -> tuple[Workflow, Transition]:
        workflow = Workflow(workflow_id, self.spec.name, self.spec.initial, 1, dict(context))
        return workflow, Transition(1, None, self.spec.initial, CREATE_TRIGGER)

    def restore(self, workflow_id: UUID, state: str, seq: int, **context: Any) -> Workflow:
        if state not in self.spec.states:
            raise IllegalTransition(self.spec.name, state, "restore")
        return Workflow(workflow_id, self.spec.name, state, seq, dict(context))

    def fire(self, workflow: Workflow, trigger: str, **kwargs: Any) -> Transition | None:
        """Take ``trigger``. None when a guard refused: the state is then unchanged.

        Raises :class:`IllegalTransition` naming the state and the trigger when the machine has
        no such transition from the workflow's state.
        """
        event = self._machine.events.get(trigger)
        if event is None:
            raise IllegalTransition(self.spec.name, workflow.state, trigger)
        before = workflow.state
        try:
            moved = event.trigger(workflow, **kwargs)
        except MachineError:
            raise IllegalTransition(self.spec.name, before, trigger) from None
        if not moved:
            return None
        workflow.seq += 1
        return Transition(workflow.seq, before, workflow.state, trigger)

    def is_terminal(self, state: str) -> bool:
        return state in self._terminal

    def can_fire(self, state: str, trigger: str) -> bool:
        return any(t.trigger == trigger and state in t.source for t in self.spec.transitions)


def _adapt(guard: Guard) -> Callable[[EventData], bool]:
    def condition(event: EventData) -> bool:
        workflow = event.model
        assert isinstance(workflow, Workflow)
        return bool(guard(workflow, event.kwargs))

    condition.__name__ = getattr(guard, "__name__", "guard")
    return condition
