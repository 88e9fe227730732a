"""moto's S3-API server on 127.0.0.1, in a process of its own: for the object-storage tests
(the ``s3_server`` fixture) and for the embedded broker on S3 storage (the fault campaign).
A process of its own so that a test measuring its own memory does not count the server's."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stampflow.nodes.objectstore import S3Options
from stampflow.services import free_port
from stampflow.services.addresses import _port_accepts


@dataclass(frozen=True)
class S3Server:
    """A running S3-API server: ``options`` reach it; ``create_bucket``."""

    endpoint_url: str

    @property
    def options(self) -> S3Options:
        return S3Options(endpoint_url=self.endpoint_url, region="us-east-1", allow_http=True,
                         access_key_id="test", secret_access_key="test")

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (moto accepts an unsigned request); returns the name."""
        request = urllib.request.Request(f"{self.endpoint_url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - loopback
        return name


def moto_server_command() -> list[str] | None:
    """How to run moto's S3-API server (``pip install 'moto[server]'``): the program named by
    $STAMPFLOW_TEST_MOTO_SERVER, ``moto_server`` beside this Python or on PATH, or moto
    importable here. None when there is none."""
    if explicit := os.environ.get("STAMPFLOW_TEST_MOTO_SERVER"):
        return [explicit]
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file():
        return [str(beside)]
    if found := shutil.which("moto_server"):
        return [found]
    if importlib.util.find_spec("moto") is not None:
        return [sys.executable, "-m", "moto.server"]
    return None


@contextlib.contextmanager
def moto_server(log: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto's server on a free loopback port (its output in ``log``), yield it, stop it.
    RuntimeError when there is no moto or it does not start."""
    command = moto_server_command()
    if command is None:
        raise RuntimeError("no moto server: pip install 'moto[server]', or name one in "
                           "STAMPFLOW_TEST_MOTO_SERVER")
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _port_accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto server did not start on port {port}: {tail}")
            time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
