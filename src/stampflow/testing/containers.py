"""PostgreSQL and a Kafka-API broker in containers, through testcontainers.

Images come from ``STAMPFLOW_TEST_POSTGRES_IMAGE`` and ``STAMPFLOW_TEST_KAFKA_IMAGE``. The
defaults are the official PostgreSQL image and Redpanda (``RedpandaContainer``), for a CI that
can pull; this repository's CI builds its own (scripts/build-test-images) and names them. A
Kafka image that is not Redpanda (the local Tansu image) runs as a generic container.

Host ports are fixed when a container is created, so a container stopped and started again by
a fault test keeps its address, and the URLs handed out stay valid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from stampflow.errors import ServiceUnavailable
from stampflow.services import Endpoints, _run_async, check_broker, check_database, free_port

# testcontainers reads these when it is imported. This machine has /.dockerenv, so without an
# override testcontainers would look for published ports on the bridge gateway.
os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # the fixture removes them

POSTGRES_IMAGE = os.environ.get("STAMPFLOW_TEST_POSTGRES_IMAGE", "postgres:16-alpine")
KAFKA_IMAGE = os.environ.get("STAMPFLOW_TEST_KAFKA_IMAGE",
                             "docker.redpanda.com/redpandadata/redpanda:v24.2.4")
PASSWORD = "stampflow-test"


def docker_answers(timeout: float = 3.0) -> bool:
    """Whether a Docker daemon answers (``DOCKER_HOST`` or the default socket)."""
    try:
        import docker

        # mypy takes the repository's docker/ folder (the test images) for this package
        client = docker.from_env(timeout=int(max(1, timeout)))  # type: ignore[attr-defined]
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means: no usable daemon
        return False


class ContainerServer:
    """A service container with the fault controls the embedded servers have: stop, start,
    kill, freeze (docker pause: every process SIGSTOPped by the freezer cgroup), thaw."""

    def __init__(self, name: str, container: Any, port: int, ready: Any) -> None:
        self.name = name
        self._container = container  # a testcontainers DockerContainer, started
        self.port = port
        self._ready = ready  # () -> None, raises ServiceUnavailable until the service answers

    def __repr__(self) -> str:
        return f"ContainerServer({self.name} at {self.address})"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _docker(self) -> Any:
        return self._container.get_wrapped_container()

    @property
    def pid(self) -> int:
        self._docker.reload()
        return int(self._docker.attrs["State"]["Pid"])

    @property
    def running(self) -> bool:
        self._docker.reload()
        return bool(self._docker.status == "running")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ready()
                return
            except (ServiceUnavailable, OSError) as err:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"{self.name} in a container", self.address,
                                             str(err)) from None
                time.sleep(0.2)

    def start(self, timeout: float = 60.0) -> None:
        if not self.running:
            self._docker.start()
        self.wait_ready(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        self._docker.stop(timeout=int(timeout))

    def kill(self) -> None:
        self._docker.kill()
        self._docker.wait(timeout=30)

    def freeze(self) -> None:
        self._docker.pause()

    def thaw(self) -> None:
        self._docker.unpause()

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)


@dataclass
class ContainerServices:
    endpoints: Endpoints
    postgres: ContainerServer
    broker: ContainerServer


def _postgres(stack: ExitStack) -> ContainerServer:
    from testcontainers.community.postgres import PostgresContainer

    port = free_port()
    pg = PostgresContainer(POSTGRES_IMAGE, username="postgres", password=PASSWORD,
                           dbname="postgres", driver=None).with_bind_ports(5432, port)
    stack.enter_context(pg)
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    server = ContainerServer("PostgreSQL", pg, port,
                             lambda: _run_async(lambda: check_database(url, 3.0)))
    server.wait_ready(60)
    return server


def _broker(stack: ExitStack) -> ContainerServer:
    port = free_port()
    if "redpanda" in KAFKA_IMAGE:
        from testcontainers.community.kafka import RedpandaContainer

        broker: Any = RedpandaContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
    else:
        from testcontainers.core.container import DockerContainer

        broker = (DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
                  .with_env("ADVERTISED", f"127.0.0.1:{port}"))
    stack.enter_context(broker)
    bootstrap = f"127.0.0.1:{port}"
    server = ContainerServer("the Kafka broker", broker, port,
                             lambda: _run_async(lambda: check_broker(bootstrap, 3.0)))
    server.wait_ready(60)
    return server


@contextmanager
def container_services() -> Iterator[ContainerServices]:
    with ExitStack() as stack:
        postgres = _postgres(stack)
        broker = _broker(stack)
        endpoints = Endpoints(
            database_url=f"postgresql://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/postgres",
            bootstrap_servers=f"127.0.0.1:{broker.port}")
        yield ContainerServices(endpoints, postgres, broker)
