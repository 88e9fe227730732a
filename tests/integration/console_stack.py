"""A real stack for the console tests, built once per session: embedded PostgreSQL and broker
(or whichever services the session uses), the orchestrator, the inference node with the tiny
FLUX model and the reducer, all running for the whole session, with real workflows in two
namespaces, generated images in both, a failure, and dead letters.

Two operator roles log in: ``ops`` sees both namespaces and may replay (stampflow_replay),
``limited`` sees only ``acme``. The console is served on a free port for the browser tests;
the HTTP tests use the ASGI app directly.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from stampflow.console import ConsoleConfig, ConsoleServer
from stampflow.console.access import Credentials
from stampflow.contracts.events import GenerationRequested, derive_id
from stampflow.dlq import read_dead_letters
from stampflow.queries import create_role
from stampflow.services import EmbeddedPostgres, create_database, drop_database, with_database
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.stack import (
    Stack,
    fetch,
    finished_count,
    running_stack,
    settings_for,
    wait_for,
)

ACME, OTHER = "acme", "other"
ACME_STAMPS = [b"acme one", b"acme two", b"acme three", b"acme four", b"acme one"]  # a duplicate
OTHER_STAMPS = [b"other one", b"other two"]
POISON = [b"{console poison %d" % i for i in range(3)] + [b"<script>alert(1)</script>"]


@dataclass
class World:
    stack: Stack
    database_url: str  # the owner's: for checks the tests make around the console
    config: ConsoleConfig
    server: ConsoleServer
    ops: Credentials
    limited: Credentials
    workflows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by namespace
    images: dict[str, str] = field(default_factory=dict)  # namespace -> a generated hash

    def workflow(self, namespace: str, kind: str) -> dict[str, Any]:
        return next(w for w in self.workflows[namespace] if w["kind"] == kind)

    async def refresh(self) -> None:
        rows = await fetch(self.database_url, "SELECT * FROM workflows "
                                              "ORDER BY created_at DESC, workflow_id DESC")
        self.workflows = {ns: [r for r in rows if r["namespace"] == ns] for ns in (ACME, OTHER)}
        gens = await fetch(self.database_url, "SELECT namespace, hash FROM generations")
        self.images = {g["namespace"]: g["hash"] for g in gens}


def tiny_request(seed: int) -> GenerationRequested:
    return GenerationRequested(prompt=f"a console test picture {seed}", width=64, height=64,
                               num_inference_steps=2, seed=seed, model="tiny")


@pytest.fixture(scope="session")
async def console_world(services: Services, tiny_flux_model: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    name = f"test_console_{uuid.uuid4().hex[:12]}"
    server_url = services.endpoints.database_url
    admin, owner = server_url, None
    if isinstance(services.postgres, EmbeddedPostgres):
        admin, owner = services.postgres.url(), urlsplit(server_url).username
    await create_database(admin, name, owner=owner)
    url = with_database(server_url, name)
    tmp = tmp_path_factory.mktemp("console")
    endpoints = services.endpoints.with_database(url)
    prefix = f"c{uuid.uuid4().hex[:10]}"
    roles: list[str] = []
    settings = settings_for(endpoints, prefix, tmp, models={"tiny": str(tiny_flux_model)},
                            artifact_root=tmp / "artifacts", console_port=0)
    try:
        async with running_stack(settings, endpoints) as stack:
            c = stack.client
            for data in ACME_STAMPS:
                await c.submit_stamp(ACME, content=data, content_type="text/plain")
            await c.submit_stamp(ACME, path="../../etc/passwd")  # fails: outside the root
            await c.submit_generation(ACME, tiny_request(11))
            for data in OTHER_STAMPS:
                await c.submit_stamp(OTHER, content=data, content_type="text/plain")
            await c.submit_generation(OTHER, tiny_request(22))
            for raw in POISON:
                await c.publish_raw(raw, b"poison")
            total = len(ACME_STAMPS) + 2 + len(OTHER_STAMPS) + 1

            async def done() -> bool:
                return await finished_count(url) >= total

            await wait_for(done, 180, f"{total} workflows")

            async def dead() -> bool:
                letters = await read_dead_letters(endpoints.bootstrap_servers,
                                                  settings.requests_topic, idle_s=0.5,
                                                  kafka=endpoints.kafka)
                return len(letters) >= len(POISON)

            await wait_for(dead, 60, "the dead letters")
            suffix = uuid.uuid4().hex[:8]
            ops = Credentials(f"console_ops_{suffix}", secrets.token_urlsafe(12))
            limited = Credentials(f"console_acme_{suffix}", secrets.token_urlsafe(12))
            await create_role(url, ops.role, [ACME, OTHER], ops.password, replay=True)
            await create_role(url, limited.role, [ACME], limited.password)
            config = ConsoleConfig.from_settings(settings, url, endpoints.bootstrap_servers,
                                                 endpoints.kafka)
            roles.extend([ops.role, limited.role])
            server = ConsoleServer(config, "127.0.0.1", 0)
            await server.start()
            world = World(stack, url, config, server, ops, limited)
            await world.refresh()
            try:
                yield world
            finally:
                await server.stop()
    finally:
        await drop_database(admin, name)
        await _drop_roles(admin, roles)


async def _drop_roles(admin_url: str, roles: list[str]) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        for role in roles:
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


def workflow_id_of(request_id: uuid.UUID) -> uuid.UUID:
    return derive_id(request_id, "workflow")
