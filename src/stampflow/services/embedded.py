"""``EmbeddedServices``: the embedded PostgreSQL server and broker together under one private
state directory, as a context manager; it sets up the owner role and its database, writes
``services.json``, starts services that outlive the process, and stops recorded ones by PID only
while they are the very processes recorded.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

from stampflow.errors import StampflowError
from stampflow.services.addresses import Endpoints
from stampflow.services.broker import EmbeddedBroker
from stampflow.services.credentials import _secret, private_dir, write_private
from stampflow.services.postgres import EmbeddedPostgres
from stampflow.services.processes import _end, process_identity
from stampflow.services.state import (
    _SERVERS,
    STATE_FILE,
    _int,
    _read_state,
    _started_here,
    _state_alive,
)

# The owner role's password, beside the superuser's (postgres.PASSWORD_FILE).
OWNER_PASSWORD_FILE = "stampflow.password"
# The role the nodes log in as (no superuser; it owns the schema) and its database.
OWNER_ROLE = "stampflow"
OWNER_DATABASE = "stampflow"


class EmbeddedServices:
    """PostgreSQL and the broker under ``state_dir``; a context manager that stops both.

    ``state_dir`` is private (0700). ``state_dir/services.json`` (0600) records the addresses,
    the owner role's URL with its password, and each server's PID with its exact command line
    and start time, so that other processes (the CLI) find them, and ``stampflow services
    down`` stops them, and nothing else that later got the same PID. PostgreSQL's data
    (``state_dir/pgdata``) and the passwords (``postgres.password``, ``stampflow.password``)
    outlive a stop; the broker's data does not.
    """

    def __init__(self, state_dir: Path, *, fast: bool = False, postgres_port: int = 0,
                 broker_port: int = 0) -> None:
        self.state_dir = state_dir.resolve()
        self.postgres = EmbeddedPostgres(self.state_dir / "pgdata", postgres_port, fast=fast,
                                         log=self.state_dir / "postgres.log")
        self.broker = EmbeddedBroker(self.state_dir / "broker.log", broker_port)
        self._owner_password: str | None = None

    def __repr__(self) -> str:
        return f"EmbeddedServices({str(self.state_dir)!r}, {self.postgres!r}, {self.broker!r})"

    @property
    def database_url(self) -> str:
        """The URL the nodes and commands use: the owner role's, of its database."""
        if self._owner_password is None:
            self._owner_password = _secret(self.state_dir / OWNER_PASSWORD_FILE, create=False)
        return self.postgres.url(OWNER_DATABASE, OWNER_ROLE, self._owner_password)

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(self.database_url, self.broker.bootstrap_servers)

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def start(self) -> Endpoints:
        """Start both (the broker first: it is ready in milliseconds), set up the owner role
        and its database, and write services.json.

        Refuses when services.json names live services: two servers cannot share pgdata.
        """
        running = _read_state(self.state_dir)
        if running is not None and _state_alive(running):
            raise StampflowError(
                f"{self.state_file}: embedded services already run (PostgreSQL pid "
                f"{running.get('postgres_pid')}, broker pid {running.get('broker_pid')}); "
                "use them, or stop them with `stampflow services down`")
        private_dir(self.state_dir)
        self.broker.start()
        try:
            self.postgres.start()
            password = _secret(self.state_dir / OWNER_PASSWORD_FILE, create=True)
            self.postgres.ensure_owner(OWNER_ROLE, OWNER_DATABASE, password)
            self._owner_password = password
        except BaseException:
            try:
                self.postgres.stop()
            finally:
                self.broker.stop()
            raise
        self._write_state()
        return self.endpoints

    def stop(self) -> None:
        try:
            self.postgres.stop()
        finally:
            self.broker.stop()
            self.state_file.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def state(self) -> dict[str, Any]:
        """What services.json holds."""
        state: dict[str, Any] = {
            "database_url": self.database_url,
            "bootstrap_servers": self.broker.bootstrap_servers,
            "postgres_pid": self.postgres.pid,
            "postgres_port": self.postgres.port,
            "pgdata": str(self.postgres.data_dir),
            "postgres_log": str(self.postgres.log),
            "broker_pid": self.broker.pid,
            "broker_port": self.broker.port,
            "broker_log": str(self.broker.log),
            "broker_cluster_id": self.broker.cluster_id,
            "started_by_pid": os.getpid(),
        }
        for key, pid in (("postgres", self.postgres.pid), ("broker", self.broker.pid)):
            identity = process_identity(pid) or {}
            state[f"{key}_cmdline"] = identity.get("cmdline")
            state[f"{key}_start_ticks"] = identity.get("start_ticks")
        return state

    def _write_state(self) -> None:
        write_private(self.state_file, json.dumps(self.state(), indent=2) + "\n")

    @staticmethod
    def read_state(state_dir: Path) -> Endpoints | None:
        """The endpoints recorded in ``state_dir/services.json``, if both still run (the very
        processes recorded there)."""
        state = _read_state(state_dir)
        if state is None or not _state_alive(state):
            return None
        return Endpoints(str(state["database_url"]), str(state["bootstrap_servers"]))

    @classmethod
    def start_detached(cls, state_dir: Path, *, fast: bool = False) -> Endpoints:
        """Start services that outlive this process, or return the running ones."""
        found = cls.read_state(state_dir)
        if found is not None:
            return found
        cls.stop_from_state(state_dir)  # half a set (one crashed): stop the other
        services = cls(state_dir, fast=fast)
        endpoints = services.start()
        services.postgres.detach()
        services.broker.detach()
        return endpoints

    @staticmethod
    def stop_from_state(state_dir: Path, timeout: float = 20.0) -> bool:
        """Stop the services recorded in ``state_dir/services.json`` by PID; True if any ran.

        A recorded PID is signalled only while it runs the very process recorded (its exact
        command line and start time). One that runs something else raises StampflowError,
        one line, and nothing is signalled; PIDs that are gone are skipped.
        """
        state = _read_state(state_dir)
        if state is None:
            return False
        file = state_dir / STATE_FILE
        found = {key: _started_here(state, key) for key in _SERVERS}
        for key, here in found.items():
            if here is False:
                pid = _int(state.get(f"{key}_pid"))
                why = ("its command line or start time differs from the recorded ones"
                       if state.get(f"{key}_cmdline") else
                       "no command line and start time were recorded for it")
                raise StampflowError(
                    f"{file}: pid {pid} is alive but not the {_SERVERS[key]} this state "
                    f"directory started ({why}); not stopping it. Stop it yourself if it is, "
                    "then remove the file")
        stopped = False
        for key, here in found.items():
            if here:
                _end(_int(state.get(f"{key}_pid")), signal.SIGINT, timeout)
                stopped = True
        file.unlink(missing_ok=True)
        return stopped
