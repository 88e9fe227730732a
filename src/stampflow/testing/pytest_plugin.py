"""stampflow's pytest plugin: real services for integration tests, started once per session,
isolated per test. Load it with ``pytest_plugins = ["stampflow.testing.pytest_plugin"]`` in a
conftest (this repository's tests/conftest.py does).

The source is chosen by ``--services`` or ``STAMPFLOW_TEST_SERVICES``:
- ``embedded`` (default): a PostgreSQL server and the Tansu broker started here;
- ``external``: ``STAMPFLOW_DATABASE_URL`` and ``STAMPFLOW_BOOTSTRAP_SERVERS`` name running ones;
- ``containers``: PostgreSQL and a Kafka-API broker in containers, through testcontainers
  (stampflow.testing.containers); the default wherever a Docker daemon answers.

Fixtures (all typed): ``services`` (:class:`Services`, per session), ``topic_prefix`` (unique
topics and consumer groups per test), ``fresh_database_url`` (a database created for the test
and dropped after it), ``proxied_services`` (:class:`ProxiedServices`: the same, reached
through fault proxies), ``s3_server`` (:class:`S3Server`: moto's S3-API server, per session).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
    free_port,
    with_database,
)
from stampflow.settings import ServiceSource, Settings
from stampflow.testing.containers import ContainerServer, container_services, docker_answers
from stampflow.testing.faultproxy import FaultProxy
from stampflow.testing.s3 import S3Server, moto_server, moto_server_command

SOURCES = tuple(s.value for s in ServiceSource)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--services", choices=SOURCES, default=None,
                     help="where integration tests find PostgreSQL and Kafka (default: "
                          "$STAMPFLOW_TEST_SERVICES, else containers when Docker answers, "
                          "else embedded)")
    parser.addoption("--long-outages", action="store_true", default=False,
                     help="run the outage tests (tests/integration/test_outages.py) at their "
                          "full length: 3 minutes per refusing or hanging outage")


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
    # The embedded server's published role owns its database but may not create any: the
    # superuser creates this one, owned by that role, and drops it.
    admin, owner = server, None
    if isinstance(services.postgres, EmbeddedPostgres):
        admin, owner = services.postgres.url(), urlsplit(server).username
    _blocking(lambda: create_database(admin, name, owner=owner))
    yield with_database(server, name)
    _blocking(lambda: drop_database(admin, name))


@dataclass
class ProxiedServices:
    """Services reached through two fault proxies (:mod:`stampflow.testing.faultproxy`):
    ``endpoints`` name the proxies, so ``broker_proxy``/``postgres_proxy`` can refuse, hang,
    slow or cut every connection a node makes. The broker is one of this test's own, listening
    on a port of its own and advertising the proxy's (clients reconnect to the advertised
    address after bootstrapping, so a proxy on the bootstrap address alone would be bypassed).
    ``direct_database_url`` reaches the same database around its proxy, for checks."""

    endpoints: Endpoints
    direct_database_url: str
    broker_proxy: FaultProxy
    postgres_proxy: FaultProxy
    broker: EmbeddedBroker
    postgres: EmbeddedPostgres | ContainerServer


@pytest.fixture
def proxied_services(services: Services, fresh_database_url: str,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedServices]:
    if services.source is not ServiceSource.EMBEDDED or not isinstance(
            services.postgres, EmbeddedPostgres):
        pytest.skip("proxied services run on the embedded source only: the proxied broker "
                    "must advertise the proxy's port, which the container broker "
                    f"(stampflow.testing.containers) and external services do not "
                    f"({services.source})")
    parts = urlsplit(fresh_database_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    broker_port = free_port()
    with FaultProxy(upstream=("127.0.0.1", broker_port), name="broker") as broker_proxy, \
            FaultProxy(upstream=(host, port), name="postgres") as postgres_proxy:
        log = tmp_path_factory.mktemp("proxied-broker") / "broker.log"
        broker = EmbeddedBroker(log, broker_port, advertised_port=broker_proxy.listen_port)
        broker.start()
        try:
            user, at, _ = parts.netloc.rpartition("@")
            proxied_url = urlunsplit(parts._replace(
                netloc=f"{user}{at}127.0.0.1:{postgres_proxy.listen_port}"))
            yield ProxiedServices(
                endpoints=Endpoints(proxied_url, broker.bootstrap_servers),
                direct_database_url=fresh_database_url, broker_proxy=broker_proxy,
                postgres_proxy=postgres_proxy, broker=broker, postgres=services.postgres)
        finally:
            broker.stop()


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX-shaped diffusers model (random weights, seed 0) built once per session: the
    real loading and pipeline code runs on it, on the CPU, in seconds. Needs the inference
    extra."""
    from stampflow.inference.tiny import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)



# --- an S3-API server (object storage tests) -----------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto server (``pip install 'moto[server]'``) for the session; skipped without moto."""
    if moto_server_command() is None:
        pytest.skip("no S3-API server: pip install 'moto[server]'")
    with ExitStack() as stack:
        try:
            server = stack.enter_context(moto_server(tmp_path_factory.mktemp("moto") / "moto.log"))
        except RuntimeError as err:
            pytest.fail(str(err), pytrace=False)
        yield server
