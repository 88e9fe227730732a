"""The orchestrator core's vocabulary: the outcomes the runner feeds in (what an effect
returned) and the commands the core hands back (publish, call an effect, finished, unusable).
Plain frozen values, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stampflow.contracts.events import (
    Envelope,
    GenerationCompleted,
    StampRequested,
)

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
class DispatchInference:
    """Publish ``job`` (an ``inference.job`` envelope) on the inference-jobs topic, after the
    events before it. The workflow then waits in its state; :meth:`OrchestratorCore.resume`
    moves it on when the inference node's result arrives."""

    job: Envelope


@dataclass(frozen=True, slots=True)
class Finished:
    state: str


@dataclass(frozen=True, slots=True)
class Unusable:
    """Nothing can be done with the input, and nothing is to be published.

    Always the only command of its result. ``start`` returns it with no workflow for a payload
    that is not a request (``not_a_request``) or a kind the contract has no FSM for
    (``no_fsm``), and ``reject`` for a namespace no event may carry (``invalid_namespace``):
    the runner dead-letters the record with ``reason``. ``step`` returns it with the workflow
    unchanged for a workflow that has already finished (``workflow_finished``), whose kind
    the core has no FSM for (``no_fsm``) or whose namespace no event may carry
    (``invalid_namespace``); the runner never steps such a workflow.
    """

    error_code: str
    reason: str


Command = Emit | CallStamping | DispatchInference | Finished | Unusable
