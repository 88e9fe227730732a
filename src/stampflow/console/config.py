"""What the console needs to know: where PostgreSQL and the broker are, the topics, where the
artifacts are. Built from :class:`~stampflow.settings.Settings` and the endpoints in use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stampflow.connections import PLAINTEXT, KafkaOptions, connect_options
from stampflow.contracts.nodes import NodeContract, load_contracts
from stampflow.nodes.objectstore import LocalObjectStore, ObjectStore, open_store
from stampflow.settings import Settings


@dataclass(frozen=True)
class ConsoleConfig:
    """``database_url`` names the server and database only: its user and password are never
    used by the console, which connects as each operator (stampflow.console.access)."""

    database_url: str
    bootstrap_servers: str
    topic_prefix: str
    artifacts: ObjectStore
    kafka: KafkaOptions = PLAINTEXT
    connect_options: dict[str, Any] = field(default_factory=dict)
    # Workflow states and kinds that filters accept (from the orchestrator's contract).
    states: frozenset[str] = frozenset()
    # Connections one operator's pool may hold open.
    pool_size: int = 2
    # Distinct operators' pools kept at once; the least recently used is closed first.
    max_pools: int = 16

    def topic(self, logical: str) -> str:
        return f"{self.topic_prefix}.{logical}.v1"

    @classmethod
    def from_settings(cls, settings: Settings, database_url: str, bootstrap_servers: str,
                      kafka: KafkaOptions = PLAINTEXT,
                      contracts: dict[str, NodeContract] | None = None) -> ConsoleConfig:
        contracts = contracts or load_contracts(settings.contracts_dir)
        states = frozenset(s for fsm in contracts["orchestrator"].fsm for s in fsm.states)
        artifacts: ObjectStore = (
            open_store(settings.artifact_uri, s3=settings.s3_options())
            if settings.artifact_uri is not None else LocalObjectStore(settings.artifact_root))
        return cls(database_url=database_url, bootstrap_servers=bootstrap_servers,
                   topic_prefix=settings.topic_prefix, artifacts=artifacts, kafka=kafka,
                   connect_options=connect_options(settings), states=states)
