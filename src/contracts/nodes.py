"""Node contracts: one YAML file per node, validated by the models below.

A contract names the node, its kind, what it consumes and produces, its input and output
models, its finite-state machines, its effect I/O policy and its performance thresholds.
A bad contract stops start-up with one line naming the file, the field and the problem.
"""

from __future__ import annotations

from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, StringConstraints, ValidationError, model_validator

from stampflow.contracts.events import EVENT_TYPES, MODELS_BY_NAME, Frozen

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
SemVer = Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+$")]
# requests and events: the public topics; inference-jobs and inference-results: between the
# orchestrator and the inference node.
LogicalTopic = Literal["requests", "events", "inference-jobs", "inference-results"]


class NodeKind(StrEnum):
    ORCHESTRATOR = "orchestrator"
    REDUCER = "reducer"
    COMPUTE = "compute"
    EFFECT = "effect"


class TopicBinding(Frozen):
    topic: LogicalTopic
    events: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_events(self) -> TopicBinding:
        unknown = [name for name in self.events if name not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; known: {sorted(EVENT_TYPES)}")
        return self


class TransitionSpec(Frozen):
    trigger: Identifier
    source: tuple[str, ...] = Field(min_length=1)
    dest: str
    guards: tuple[Identifier, ...] = ()


class FsmSpec(Frozen):
    """A workflow's state machine. States and triggers are plain names."""

    name: Identifier
    states: tuple[Identifier, ...] = Field(min_length=2)
    initial: Identifier
    terminal: tuple[Identifier, ...] = Field(min_length=1)
    transitions: tuple[TransitionSpec, ...] = Field(min_length=1)
    # States in which a workflow waits for an event from another node (state -> event type):
    # the orchestrator hands the work over, commits the request, and resumes the workflow
    # when that event arrives, in whichever orchestrator receives it.
    waits: dict[Identifier, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> FsmSpec:
        states = set(self.states)
        if len(states) != len(self.states):
            raise ValueError("states are not unique")
        if self.initial not in states:
            raise ValueError(f"initial state {self.initial!r} is not among the states")
        for state in self.terminal:
            if state not in states:
                raise ValueError(f"terminal state {state!r} is not among the states")
        seen: set[tuple[str, str]] = set()
        for t in self.transitions:
            for state in (*t.source, t.dest):
                if state not in states:
                    raise ValueError(f"transition {t.trigger!r} names unknown state {state!r}")
            for src in t.source:
                if src in self.terminal:
                    raise ValueError(
                        f"transition {t.trigger!r} leaves terminal state {src!r}"
                    )
                if (src, t.trigger) in seen:
                    raise ValueError(f"trigger {t.trigger!r} is defined twice from {src!r}")
                seen.add((src, t.trigger))
        reachable = {self.initial}
        frontier = [self.initial]
        while frontier:
            here = frontier.pop()
            for t in self.transitions:
                if here in t.source and t.dest not in reachable:
                    reachable.add(t.dest)
                    frontier.append(t.dest)
        unreachable = states - reachable
        if unreachable:
            raise ValueError(f"states {sorted(unreachable)} cannot be reached from the initial")
        for state, event in self.waits.items():
            if state not in states or state in self.terminal:
                raise ValueError(f"waits: {state!r} is not a non-terminal state")
            if event not in EVENT_TYPES:
                raise ValueError(f"waits: {state!r} waits for unknown event type {event!r}")
        return self

    def allows(self, from_state: str | None, trigger: str, to_state: str) -> bool:
        """Is ``from_state --trigger--> to_state`` a transition of this machine?

        ``from_state`` None is the workflow's creation, which must land in the initial state.
        """
        if from_state is None:
            return trigger == "create" and to_state == self.initial
        return any(
            t.trigger == trigger and from_state in t.source and t.dest == to_state
            for t in self.transitions
        )

    @property
    def guard_names(self) -> frozenset[str]:
        return frozenset(g for t in self.transitions for g in t.guards)

    @property
    def triggers(self) -> frozenset[str]:
        return frozenset(t.trigger for t in self.transitions)


class RetryPolicy(Frozen):
    max_attempts: int = Field(default=5, ge=1, le=1_000_000)
    initial_backoff_ms: int = Field(default=100, ge=0)
    max_backoff_ms: int = Field(default=10_000, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0)
    # Each wait is drawn from [(1 - jitter) * w, w], so replicas that failed together do not
    # retry in lock-step.
    jitter: float = Field(default=0.5, ge=0.0, le=1.0)

    def backoff_ms(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (1-based), capped. Any attempt
        number is fine: the exponent stops growing once the cap is reached."""
        exponent = min(max(0, attempt - 1), 64)  # 10.0 ** 64 is still a float
        wait = self.initial_backoff_ms * self.multiplier**exponent
        return float(min(self.max_backoff_ms, wait))


class CircuitBreakerPolicy(Frozen):
    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout_ms: int = Field(default=5_000, ge=1)


class BatchingPolicy(Frozen):
    max_batch_size: int = Field(default=1, ge=1, le=100_000)
    max_batch_wait_ms: int = Field(default=0, ge=0, le=60_000)


class IoPolicy(Frozen):
    timeout_ms: int = Field(default=30_000, ge=1)
    retry: RetryPolicy = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()
    batching: BatchingPolicy = BatchingPolicy()
    max_content_bytes: int | None = Field(default=None, ge=1)
    # effect nodes running on an accelerator
    device: Literal["auto", "cuda", "cpu"] | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    vram_budget_mb: int | None = Field(default=None, ge=1)
    max_loaded_pipelines: int | None = Field(default=None, ge=1, le=64)  # LRU of loaded models
    # what one generation request may cost (None: no cap); the orchestrator admits by these too
    max_pixel_steps: int | None = Field(default=None, ge=1)  # width * height * steps
    max_side: int | None = Field(default=None, ge=16)
    max_steps: int | None = Field(default=None, ge=1)


class Thresholds(Frozen):
    """Performance thresholds this node promises; integration tests check them, each in a test
    named after it (tests/integration/test_thresholds.py). The suffix says the statistic: a
    ``_max_`` is the largest value seen, a ``_p99_``/``_p95_``/``_p50_`` that percentile, a
    ``min_`` the smallest."""

    workflow_p95_ms: float | None = Field(default=None, gt=0)
    transition_max_ms: float | None = Field(default=None, gt=0)
    hash_1mb_p99_ms: float | None = Field(default=None, gt=0)
    min_batch_under_load: int | None = Field(default=None, ge=1)
    generation_overhead_p50_ms: float | None = Field(default=None, gt=0)


class ModelRefs(Frozen):
    input: tuple[str, ...] = Field(min_length=1)
    output: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _known_models(self) -> ModelRefs:
        unknown = [name for name in (*self.input, *self.output) if name not in MODELS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(MODELS_BY_NAME)}")
        return self


class NodeContract(Frozen):
    name: Identifier
    version: SemVer
    kind: NodeKind
    description: str = ""
    operation: Identifier | None = None  # compute and effect nodes: the one thing they do
    consumes: tuple[TopicBinding, ...] = ()
    produces: tuple[TopicBinding, ...] = ()
    models: ModelRefs
    fsm: tuple[FsmSpec, ...] = ()
    io_policy: IoPolicy = IoPolicy()
    thresholds: Thresholds = Thresholds()

    @model_validator(mode="after")
    def _kind_rules(self) -> NodeContract:
        if self.kind in (NodeKind.ORCHESTRATOR, NodeKind.REDUCER) and not self.consumes:
            raise ValueError(f"a {self.kind} node must consume at least one topic")
        if self.kind is NodeKind.ORCHESTRATOR and not self.fsm:
            raise ValueError("an orchestrator must declare its workflow FSMs")
        if self.kind in (NodeKind.COMPUTE, NodeKind.EFFECT) and self.operation is None:
            raise ValueError(f"a {self.kind} node must name its operation")
        names = [m.name for m in self.fsm]
        if len(set(names)) != len(names):
            raise ValueError("FSM names are not unique")
        return self

    def fsm_named(self, name: str) -> FsmSpec:
        for machine in self.fsm:
            if machine.name == name:
                return machine
        raise KeyError(f"contract {self.name!r} has no FSM named {name!r}")

    def consumed_events(self) -> frozenset[str]:
        return frozenset(e for b in self.consumes for e in b.events)

    def produced_events(self) -> frozenset[str]:
        return frozenset(e for b in self.produces for e in b.events)


class ContractError(Exception):
    """A contract that cannot be used. ``str()`` is one line: file, field, problem."""


def parse_contract(text: str, *, origin: str) -> NodeContract:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ContractError(f"{origin}:{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ContractError(f"{origin}: expected a mapping at the top level")
    try:
        return NodeContract.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ContractError(f"{origin}: {field}: {message}{more}") from None


def load_contract(path: Path) -> NodeContract:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContractError(f"{path}: contract file not found") from None
    except IsADirectoryError:
        raise ContractError(f"{path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ContractError(f"{path}: cannot read: {err}") from None
    return parse_contract(text, origin=str(path))


BUILTIN_NODES = ("orchestrator", "reducer", "stamping", "inference")


def builtin_contract(name: str) -> NodeContract:
    """The contract shipped with stampflow for node ``name``."""
    if name not in BUILTIN_NODES:
        raise ContractError(f"{name}: no such node; known: {', '.join(BUILTIN_NODES)}")
    ref = resources.files("stampflow.contracts") / "specs" / f"{name}.yaml"
    return parse_contract(ref.read_text(encoding="utf-8"), origin=f"contracts/specs/{name}.yaml")


def load_contracts(directory: Path | None = None) -> dict[str, NodeContract]:
    """Every node's contract: the built-in ones, or those in ``directory`` when given."""
    if directory is None:
        return {name: builtin_contract(name) for name in BUILTIN_NODES}
    if not directory.is_dir():
        raise ContractError(f"{directory}: contracts directory not found")
    loaded = {name: load_contract(directory / f"{name}.yaml") for name in BUILTIN_NODES}
    for name, contract in loaded.items():
        if contract.name != name:
            raise ContractError(
                f"{directory / f'{name}.yaml'}: name: is {contract.name!r}, expected {name!r}"
            )
    return loaded
