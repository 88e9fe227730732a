"""The reducer's pure core: ``reduce(state, events) -> (state, writes)``. No I/O, no awaits.

The runner has loaded the rows the batch touches into a :class:`ReducerState`. The core skips
events applied before, judges each transition against the FSM contracts, folds the batch into
per-workflow rows and per-namespace deltas, and returns every write as plain data for one
set-based transaction.

Exactly once: an event applied to a workflow is remembered in that workflow's row
(``applied``, about six ids); an event that belongs to no workflow it could be applied to
(an anomaly) is remembered on its own (``Writes.orphans``, the ``processed_events`` table).
An event found in either is a duplicate (a re-delivery) and changes nothing. The bookkeeping
therefore lives and dies with the workflow's row: it needs no table of every event ever seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from stampflow.contracts.events import (
    Envelope,
    GenerationCompleted,
    StampCreated,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowTransitioned,
)
from stampflow.contracts.nodes import FsmSpec

# The outcomes a result event sets; a failure may still be followed by a re-run's result.
RESULT_OUTCOMES = frozenset({"stamped", "duplicate", "generated"})


@dataclass(slots=True)
class WorkflowRow:
    """A workflow's row. Mutable for speed inside one fold, which copies a row the first time
    it changes it, so the rows it was given (and the state it returned before) never change."""

    workflow_id: UUID
    namespace: str
    kind: str
    state: str
    seq: int
    request_id: UUID
    created_at: datetime
    updated_at: datetime
    outcome: str | None = None
    hash: str | None = None
    error_code: str | None = None
    reason: str | None = None
    duration_ms: float | None = None
    applied: tuple[UUID, ...] = ()  # the events applied to this workflow (exactly once)
    recorded_at: datetime | None = None  # the row's partition key; None until stored


@dataclass(frozen=True, slots=True)
class StampRow:
    namespace: str
    hash: str
    algorithm: str
    size: int
    content_type: str
    source: str | None
    first_workflow_id: UUID
    stamped_at: datetime


@dataclass(frozen=True, slots=True)
class GenerationRow:
    workflow_id: UUID
    namespace: str
    artifact_uri: str
    hash: str
    size: int
    seed: int
    width: int
    height: int
    steps: int
    model: str
    device: str
    batch_size: int
    compute_seconds: float
    prompt_tokens: int
    truncated_tokens: int
    negative_prompt_ignored: bool
    created_at: datetime
    prompt: str | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class TransitionRow:
    workflow_id: UUID
    seq: int
    namespace: str
    from_state: str | None
    to_state: str
    trigger: str
    reason: str | None
    event_id: UUID
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class AnomalyRow:
    namespace: str
    workflow_id: UUID | None
    event_id: UUID
    kind: str
    detail: str


@dataclass(slots=True)
class AggregateDelta:
    workflows: int = 0
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    stamps: int = 0
    total_bytes: int = 0
    generations: int = 0
    total_pixels: int = 0
    compute_seconds: float = 0.0
    anomalies: int = 0
    first_activity: datetime | None = None
    last_activity: datetime | None = None

    def touch(self, at: datetime) -> None:
        if self.first_activity is None or at < self.first_activity:
            self.first_activity = at
        if self.last_activity is None or at > self.last_activity:
            self.last_activity = at


@dataclass(frozen=True, slots=True)
class ReducerState:
    """What the batch needs to know of the database: the rows it touches."""

    workflows: Mapping[UUID, WorkflowRow] = field(default_factory=dict)
    known_stamps: frozenset[tuple[str, str]] = frozenset()
    # ids of the batch's events that were applied before without a workflow (orphans)
    seen: frozenset[UUID] = frozenset()


@dataclass(slots=True)
class Writes:
    workflows: dict[UUID, WorkflowRow] = field(default_factory=dict)  # final row per workflow
    stamps: list[StampRow] = field(default_factory=list)
    generations: list[GenerationRow] = field(default_factory=list)
    transitions: list[TransitionRow] = field(default_factory=list)
    anomalies: list[AnomalyRow] = field(default_factory=list)
    aggregates: dict[str, AggregateDelta] = field(default_factory=dict)
    # (namespace, kind, state) -> change in the number of workflows in that state
    state_counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # events applied without a workflow to remember them: (event id, namespace)
    orphans: list[tuple[UUID, str]] = field(default_factory=list)
    duplicates: int = 0  # events skipped as applied before

    def delta(self, namespace: str) -> AggregateDelta:
        found = self.aggregates.get(namespace)
        if found is None:
            found = self.aggregates[namespace] = AggregateDelta()
        return found

    def count_state(self, namespace: str, kind: str, state: str, change: int) -> None:
        """A workflow entered (+1) or left (-1) ``state``. The aggregates' ``completed`` and
        ``failed`` are the workflows *in* those states, counted here with the state itself:
        they agree with ``workflows`` after every batch, also one that ends between a
        workflow's last transition and its terminal event (``stampflow check`` then)."""
        key = (namespace, kind, state)
        self.state_counts[key] = self.state_counts.get(key, 0) + change
        if state == "completed":
            self.delta(namespace).completed += change
        elif state == "failed":
            self.delta(namespace).failed += change


def reduce(
    state: ReducerState, events: Iterable[Envelope], fsms: Mapping[str, FsmSpec]
) -> tuple[ReducerState, Writes]:
    """Fold ``events`` (in log order, each id once) into writes, skipping those applied
    before. Never raises on bad data."""
    reduction = _Reduction(state, fsms)
    for envelope in events:
        reduction.apply(envelope)
    return reduction.result()


class _Reduction:
    def __init__(self, state: ReducerState, fsms: Mapping[str, FsmSpec]) -> None:
        self.fsms = fsms
        self.rows: dict[UUID, WorkflowRow] = dict(state.workflows)
        self.known = set(state.known_stamps)
        self.seen = set(state.seen)
        self.owned: set[UUID] = set()  # rows this fold made (or copied) and may change
        self.writes = Writes()

    def result(self) -> tuple[ReducerState, Writes]:
        new_state = ReducerState(workflows=dict(self.rows), known_stamps=frozenset(self.known),
                                 seen=frozenset(self.seen))
        return new_state, self.writes

    def apply(self, envelope: Envelope) -> None:
        payload = envelope.payload
        workflow_id = getattr(payload, "workflow_id", None)
        if not isinstance(workflow_id, UUID):
            workflow_id = None
        if self._applied_before(envelope.event_id, workflow_id):
            self.writes.duplicates += 1
            return
        self.writes.delta(envelope.namespace).touch(envelope.occurred_at)
        self._handle(envelope)
        self._remember(envelope, workflow_id)

    def _applied_before(self, event_id: UUID, workflow_id: UUID | None) -> bool:
        if event_id in self.seen:
            return True
        row = self.rows.get(workflow_id) if workflow_id is not None else None
        return row is not None and event_id in row.applied

    def _remember(self, envelope: Envelope, workflow_id: UUID | None) -> None:
        """Record that ``envelope`` was applied: in its workflow's row when it has one (also
        when the event was an anomaly of that workflow), else as an orphan."""
        row = self.rows.get(workflow_id) if workflow_id is not None else None
        if row is None:
            self.seen.add(envelope.event_id)
            self.writes.orphans.append((envelope.event_id, envelope.namespace))
            return
        self._update(self._change(row, applied=(*row.applied, envelope.event_id)))

    def _handle(self, envelope: Envelope) -> None:
        # Dispatch on the exact type: pydantic models are ABCs, and a chain of isinstance
        # checks (a `match` on classes) cost more than the fold itself (bench/README.md).
        payload = envelope.payload
        if type(payload) is WorkflowTransitioned:
            self._transitioned(envelope, payload)
        elif type(payload) is StampCreated:
            self._stamp_created(envelope, payload)
        elif type(payload) is GenerationCompleted:
            self._generation_completed(envelope, payload)
        elif type(payload) is WorkflowCompleted:
            self._finished(envelope, payload.workflow_id, "completed", None, None,
                           payload.duration_ms)
        elif type(payload) is WorkflowFailed:
            self._finished(envelope, payload.workflow_id, "failed", payload.error_code,
                           payload.reason, None)
        else:  # requests, jobs, results: valid events, but not for this topic
            self._anomaly(envelope, None, "unexpected_event",
                          f"{payload.type} does not belong on the events topic")

    # --- handlers ----------------------------------------------------------------------------

    def _transitioned(self, envelope: Envelope, event: WorkflowTransitioned) -> None:
        ns = envelope.namespace
        fsm = self.fsms.get(event.workflow_kind)
        row = self.rows.get(event.workflow_id)
        if fsm is None:
            self._anomaly(envelope, event.workflow_id, "unknown_fsm",
                          f"no FSM contract for workflow kind {event.workflow_kind!r}")
            return
        if row is None:
            if event.seq != 1 or not fsm.allows(None, event.trigger, event.to_state):
                self._anomaly(envelope, event.workflow_id, "unknown_workflow",
                              f"transition seq {event.seq} ({event.trigger}) for a workflow "
                              "that was never created")
                return
            row = WorkflowRow(
                workflow_id=event.workflow_id, namespace=ns, kind=event.workflow_kind,
                state=event.to_state, seq=1, request_id=envelope.correlation_id,
                created_at=envelope.occurred_at, updated_at=envelope.occurred_at,
            )
            self.owned.add(row.workflow_id)
            self.writes.delta(ns).workflows += 1
            self.writes.count_state(ns, row.kind, row.state, +1)
            self._record(row, event, envelope)
            return
        if row.namespace != ns:
            self._anomaly(envelope, event.workflow_id, "namespace_mismatch",
                          f"workflow belongs to {row.namespace!r}, event says {ns!r}")
            return
        if event.seq != row.seq + 1:
            self._anomaly(envelope, event.workflow_id, "out_of_sequence",
                          f"transition seq {event.seq} after seq {row.seq} "
                          f"({event.from_state} -> {event.to_state})")
            return
        if event.from_state != row.state or not fsm.allows(
            event.from_state, event.trigger, event.to_state
        ):
            self._anomaly(envelope, event.workflow_id, "illegal_transition",
                          f"{event.workflow_kind} FSM has no {event.from_state} "
                          f"--{event.trigger}--> {event.to_state} (workflow is in {row.state})")
            return
        self.writes.count_state(ns, row.kind, row.state, -1)
        self.writes.count_state(ns, row.kind, event.to_state, +1)
        row = self._change(row, state=event.to_state, seq=event.seq,
                      updated_at=max(row.updated_at, envelope.occurred_at))
        self._record(row, event, envelope)

    def _record(self, row: WorkflowRow, event: WorkflowTransitioned, envelope: Envelope) -> None:
        self.rows[row.workflow_id] = row
        self.writes.workflows[row.workflow_id] = row
        self.writes.transitions.append(TransitionRow(
            workflow_id=event.workflow_id, seq=event.seq, namespace=envelope.namespace,
            from_state=event.from_state, to_state=event.to_state, trigger=event.trigger,
            reason=event.reason, event_id=envelope.event_id, occurred_at=envelope.occurred_at,
        ))

    def _workflow(self, envelope: Envelope, workflow_id: UUID) -> WorkflowRow | None:
        """The workflow an event belongs to; an anomaly (and None) when it was never created."""
        row = self.rows.get(workflow_id)
        if row is None:
            self._anomaly(envelope, workflow_id, "unknown_workflow",
                          f"{envelope.event_type} for a workflow that was never created")
        return row

    def _has_result(self, envelope: Envelope, row: WorkflowRow) -> bool:
        """A second result for one workflow under another event id (a result's id is fixed
        per workflow, so a re-run repeats the first id): an anomaly, not counted again."""
        if row.outcome not in RESULT_OUTCOMES:
            return False
        self._anomaly(envelope, row.workflow_id, "duplicate_result",
                      f"{envelope.event_type} for a workflow that already has its result "
                      f"({row.outcome})")
        return True

    def _new_stamp(self, stamp: StampRow) -> bool:
        """Record content the namespace has not stamped before; False when it has."""
        key = (stamp.namespace, stamp.hash)
        if key in self.known:
            return False
        self.known.add(key)
        delta = self.writes.delta(stamp.namespace)
        delta.stamps += 1
        delta.total_bytes += stamp.size
        self.writes.stamps.append(stamp)
        return True

    def _stamp_created(self, envelope: Envelope, event: StampCreated) -> None:
        row = self._workflow(envelope, event.workflow_id)
        if row is None or self._has_result(envelope, row):
            return
        fresh = self._new_stamp(StampRow(
            namespace=envelope.namespace, hash=event.hash, algorithm=event.algorithm,
            size=event.size, content_type=event.content_type, source=event.source,
            first_workflow_id=event.workflow_id, stamped_at=event.stamped_at,
        ))
        if not fresh:
            self.writes.delta(envelope.namespace).duplicates += 1
        self._update(self._change(row, outcome="stamped" if fresh else "duplicate",
                                  hash=event.hash))

    def _generation_completed(self, envelope: Envelope, event: GenerationCompleted) -> None:
        ns = envelope.namespace
        row = self._workflow(envelope, event.workflow_id)
        if row is None or self._has_result(envelope, row):
            return
        delta = self.writes.delta(ns)
        # A batched pipeline call reports the whole call's time on each item: count its share.
        seconds = event.timings_ms.get("inference", 0.0) / 1000.0 / max(1, event.batch_size)
        delta.generations += 1
        delta.total_pixels += event.width * event.height
        delta.compute_seconds += seconds
        self.writes.generations.append(GenerationRow(
            workflow_id=event.workflow_id, namespace=ns, artifact_uri=event.artifact_uri,
            hash=event.hash, size=event.size, seed=event.seed, width=event.width,
            height=event.height, steps=event.num_inference_steps, model=event.model,
            device=event.device, batch_size=event.batch_size, compute_seconds=seconds,
            prompt_tokens=event.prompt_tokens, truncated_tokens=event.truncated_tokens,
            negative_prompt_ignored=event.negative_prompt_ignored,
            prompt=event.prompt, negative_prompt=event.negative_prompt,
            created_at=envelope.occurred_at,
        ))
        self._new_stamp(StampRow(
            namespace=ns, hash=event.hash, algorithm="blake3", size=event.size,
            content_type="image/png", source=event.artifact_uri,
            first_workflow_id=event.workflow_id, stamped_at=envelope.occurred_at,
        ))
        self._update(self._change(row, outcome="generated", hash=event.hash))

    def _finished(
        self,
        envelope: Envelope,
        workflow_id: UUID,
        terminal: str,
        error_code: str | None,
        reason: str | None,
        duration_ms: float | None,
    ) -> None:
        row = self._workflow(envelope, workflow_id)
        if row is None:
            return
        fsm = self.fsms.get(row.kind)
        if fsm is not None and terminal in fsm.terminal and row.state != terminal:
            # A re-run that ended differently from a partly published first run: ids do not
            # depend on the outcome, so its transitions collided with the first run's. The
            # one terminal event that counts (they share an id) decides where it ends.
            self._anomaly(envelope, workflow_id, "terminal_override",
                          f"workflow was in {row.state} at seq {row.seq}; its {terminal} "
                          "event ends it there")
            self.writes.count_state(row.namespace, row.kind, row.state, -1)
            self.writes.count_state(row.namespace, row.kind, terminal, +1)
            row = self._change(row, state=terminal, updated_at=max(row.updated_at,
                                                              envelope.occurred_at))
        if terminal == "completed":
            self._update(self._change(row, duration_ms=duration_ms))
        else:
            self._update(self._change(row, outcome="failed", error_code=error_code,
                                      reason=reason))

    def _change(self, row: WorkflowRow, **fields: Any) -> WorkflowRow:
        """``row`` with ``fields`` changed: a copy the first time in this fold, then in place."""
        if row.workflow_id not in self.owned:
            row = replace(row, **fields)
            self.owned.add(row.workflow_id)
            return row
        for name, value in fields.items():
            setattr(row, name, value)
        return row

    def _update(self, row: WorkflowRow) -> None:
        self.rows[row.workflow_id] = row
        self.writes.workflows[row.workflow_id] = row

    def _anomaly(self, envelope: Envelope, workflow_id: UUID | None, kind: str,
                 detail: str) -> None:
        self.writes.delta(envelope.namespace).anomalies += 1
        self.writes.anomalies.append(AnomalyRow(
            namespace=envelope.namespace, workflow_id=workflow_id,
            event_id=envelope.event_id, kind=kind, detail=detail,
        ))


def touched(events: Sequence[Envelope]) -> tuple[set[UUID], set[tuple[str, str]]]:
    """The workflow ids and (namespace, hash) pairs a batch reads: what the runner loads."""
    workflow_ids: set[UUID] = set()
    hashes: set[tuple[str, str]] = set()
    for envelope in events:
        payload = envelope.payload
        workflow_id = getattr(payload, "workflow_id", None)
        if isinstance(workflow_id, UUID):
            workflow_ids.add(workflow_id)
        if type(payload) is StampCreated or type(payload) is GenerationCompleted:
            hashes.add((envelope.namespace, payload.hash))
    return workflow_ids, hashes
