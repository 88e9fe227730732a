"""Real services for the integration tests: started once per session, isolated per test.

The source is chosen by ``--services`` or ``STAMPFLOW_TEST_SERVICES``:
- ``embedded`` (default): a PostgreSQL server and the Tansu broker started here;
- ``external``: ``STAMPFLOW_DATABASE_URL`` and ``STAMPFLOW_BOOTSTRAP_SERVERS`` name running ones;
- ``containers``: PostgreSQL and a Kafka-API broker in containers, through testcontainers
  (tests/containers.py); the default wherever a Docker daemon answers.
Each test gets its own topics (a unique prefix) and its own freshly created database.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stampflow.errors import StampflowError
from stampflow.services import (
    EmbeddedBroker,
    EmbeddedPostgres,
    EmbeddedServices,
    Endpoints,
    create_database,
    drop_database,
    external_endpoints,
    with_database,
)
from stampflow.settings import ServiceSource, Settings
from tests.containers import ContainerServer, container_services, docker_answers

SOURCES = tuple(s.value for s in ServiceSource)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--services", choices=SOURCES, default=None,
                     help="where integration tests find PostgreSQL and Kafka (default: "
                          "$STAMPFLOW_TEST_SERVICES, else containers when Docker answers, "
                          "else embedded)")


@dataclass
class Services:
    """The session's services. ``postgres``/``broker`` are None for external services: fault
    tests stop, kill, freeze or restart them through these (processes or containers)."""

    source: ServiceSource
    endpoints: Endpoints
    postgres: EmbeddedPostgres | ContainerServer | None = None
    broker: EmbeddedBroker | ContainerServer | None = None


@contextmanager
def start_services(source: ServiceSource | str) -> Iterator[Services]:
    """Services from ``source`` for as long as the context lasts. The seam for new sources."""
    source = ServiceSource(source)
    if source is ServiceSource.EMBEDDED:
        with tempfile.TemporaryDirectory(prefix="stampflow-test-") as tmp, \
                EmbeddedServices(Path(tmp), fast=True) as svc:
            yield Services(source, svc.endpoints, svc.postgres, svc.broker)
    elif source is ServiceSource.EXTERNAL:
        try:
            endpoints = external_endpoints(Settings(services=source))
        except StampflowError as err:
            pytest.fail(f"--services=external: {err}", pytrace=False)
        yield Services(source, endpoints)
    else:
        if not docker_answers():
            pytest.fail("--services=containers: no Docker daemon answers (DOCKER_HOST="
                        f"{os.environ.get('DOCKER_HOST', 'unset')}); scripts/docker-daemon "
                        "start runs one", pytrace=False)
        with container_services() as found:
            yield Services(source, found.endpoints, found.postgres, found.broker)


def _source(config: pytest.Config) -> str:
    """``--services``, else $STAMPFLOW_TEST_SERVICES, else containers where Docker answers."""
    chosen = config.getoption("--services") or os.environ.get("STAMPFLOW_TEST_SERVICES")
    if chosen:
        return str(chosen)
    return (ServiceSource.CONTAINERS if docker_answers() else ServiceSource.EMBEDDED).value


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    source = _source(request.config)
    if source not in SOURCES:
        raise pytest.UsageError(f"STAMPFLOW_TEST_SERVICES={source}: expected one of "
                                f"{', '.join(SOURCES)}")
    with start_services(source) as found:
        yield found


@pytest.fixture
def topic_prefix() -> str:
    """Unique per test: topics and consumer groups of different tests never meet."""
    return f"t{uuid.uuid4().hex[:12]}"


def _blocking(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine from a sync fixture without touching the session's event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(make())).result()


@pytest.fixture
def fresh_database_url(services: Services) -> Iterator[str]:
    """A database of its own for each test on the session's server, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    server = services.endpoints.database_url
    _blocking(lambda: create_database(server, name))
    yield with_database(server, name)
    _blocking(lambda: drop_database(server, name))
