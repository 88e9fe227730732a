"""Real services for the integration tests: started once per session, isolated per test.

The source is chosen by ``--services`` or ``STAMPFLOW_TEST_SERVICES``:
- ``embedded`` (default): a PostgreSQL server and the Tansu broker started here;
- ``external``: ``STAMPFLOW_DATABASE_URL`` and ``STAMPFLOW_BOOTSTRAP_SERVERS`` name running ones;
- ``containers``: testcontainers (arrives with the testcontainers issue).
Each test gets its own topics (a unique prefix) and its own freshly created database.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from stampflow.services import EmbeddedBroker, EmbeddedPostgres, EmbeddedServices, Endpoints

SOURCES = ("embedded", "external", "containers")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--services", choices=SOURCES, default=None,
                     help="where integration tests find PostgreSQL and Kafka "
                          "(default: $STAMPFLOW_TEST_SERVICES or embedded)")


@dataclass
class Services:
    endpoints: Endpoints
    postgres: EmbeddedPostgres | None = None  # fault tests need these; None when external
    broker: EmbeddedBroker | None = None


@contextmanager
def start_services(source: str) -> Iterator[Services]:
    if source == "embedded":
        with tempfile.TemporaryDirectory(prefix="stampflow-test-") as tmp:
            with EmbeddedServices(Path(tmp), fast=True) as svc:
                yield Services(svc.endpoints, svc.postgres, svc.broker)
    elif source == "external":
        db = os.environ.get("STAMPFLOW_DATABASE_URL")
        kafka = os.environ.get("STAMPFLOW_BOOTSTRAP_SERVERS")
        if not db or not kafka:
            raise pytest.UsageError("external services need STAMPFLOW_DATABASE_URL and "
                                    "STAMPFLOW_BOOTSTRAP_SERVERS")
        yield Services(Endpoints(db, kafka))
    else:
        pytest.skip("the containers source arrives with the testcontainers issue")


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    source = (request.config.getoption("--services")
              or os.environ.get("STAMPFLOW_TEST_SERVICES") or "embedded")
    with start_services(source) as found:
        yield found


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def fresh_database_url(services: Services) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin_url = services.endpoints.database_url

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    yield _with_database(admin_url, name)
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
