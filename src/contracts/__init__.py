"""stampflow's contracts: the events on every topic and the YAML contract of every node."""

from stampflow.contracts.events import (
    EVENT_TYPES,
    Envelope,
    GenerationCompleted,
    GenerationRequested,
    Payload,
    StampCreated,
    StampRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowTransitioned,
    decode,
    derive_id,
)
from stampflow.contracts.nodes import (
    ContractError,
    FsmSpec,
    IoPolicy,
    NodeContract,
    NodeKind,
    builtin_contract,
    load_contract,
    load_contracts,
)

__all__ = [
    "EVENT_TYPES",
    "ContractError",
    "Envelope",
    "FsmSpec",
    "GenerationCompleted",
    "GenerationRequested",
    "IoPolicy",
    "NodeContract",
    "NodeKind",
    "Payload",
    "StampCreated",
    "StampRequested",
    "WorkflowCompleted",
    "WorkflowFailed",
    "WorkflowTransitioned",
    "builtin_contract",
    "decode",
    "derive_id",
    "load_contract",
    "load_contracts",
]
