"""The SQL migration runner: numbered plain-SQL files applied once each, in order, under a lock.

Migrations are files named ``NNNN_name.sql`` (four digits, then a lower-case name) in one
directory; gaps in the numbering are allowed and files apply in number order. ``migrate`` opens
one transaction and takes a transaction-level PostgreSQL advisory lock in it
(``pg_try_advisory_xact_lock``), so that nodes starting together apply each file exactly once,
then runs every pending file in a savepoint of its own together with its row in
``schema_migrations``. The lock lives and dies with that transaction, so it also holds behind
PgBouncer in transaction pooling, where session state does not survive between transactions.
A file that was applied must never change afterwards: its SHA-256 is recorded and checked on
every run.

``check_current`` is what a node that does not migrate (``migrate_on_start=false``) runs at
start-up: :class:`SchemaBehind` while files are pending.

The lock is tried, not waited for: whoever holds it (another node migrating, or any session
that took the same key) delays a start by at most ``lock_timeout`` seconds, after which
``migrate`` fails with one line naming the holder's pid and application_name.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg

from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.nodes.pgerrors import UNREACHABLE

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LOCK_KEY",
    "Migration",
    "DatabaseUnreachable",
    "MigrationError",
    "SchemaBehind",
    "check_current",
    "default_migrations_dir",
    "discover",
    "migrate",
    "status",
]

# The advisory lock every migrating node takes: the ASCII bytes of "stampflw" as a bigint.
LOCK_KEY = int.from_bytes(b"stampflw", "big")
# How long migrate waits for that lock (STAMPFLOW_MIGRATE_LOCK_TIMEOUT), in seconds.
DEFAULT_LOCK_TIMEOUT = 60.0

# Who holds LOCK_KEY in this database. pid and application_name of other users' sessions are
# visible to every role in pg_stat_activity; pg_locks is readable by all.
_LOCK_HOLDER = """
SELECT l.pid, a.application_name
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = $1 AND l.objid::bigint = $2
LIMIT 1
"""

FILE_NAME = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_APPLIED = "SELECT version, checksum, applied_at FROM schema_migrations"
_INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(StampflowError):
    """A migration file or run that cannot go ahead; the message is one line naming the file."""


class DatabaseUnreachable(MigrationError, ServiceUnavailable):
    """PostgreSQL cannot be reached (yet): a node starting during an outage waits for it; a
    refused login or a missing database stays a plain :class:`MigrationError`."""

    def __init__(self, address: str, reason: str) -> None:
        StampflowError.__init__(
            self, f"PostgreSQL at {address} is unreachable, cannot migrate: {reason}")
        self.service, self.address, self.reason = "PostgreSQL", address, reason


class SchemaBehind(MigrationError, ServiceUnavailable):
    """Migrations on disk that the database has not applied yet, found by a node that does not
    migrate itself: it waits (a ServiceUnavailable, retried like an unreachable service) until
    ``stampflow migrate`` has run."""

    def __init__(self, address: str, pending: list[Migration]) -> None:
        names = ", ".join(m.filename for m in pending[:3]) + (", ..." if len(pending) > 3
                                                              else "")
        reason = (f"the schema is behind: {len(pending)} migration(s) pending ({names}); "
                  "run `stampflow migrate`")
        StampflowError.__init__(self, f"PostgreSQL at {address}: {reason}")
        self.service, self.address, self.reason = "PostgreSQL", address, reason
        self.pending = pending


def _address(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def _failure(exc: BaseException, address: str, message: str) -> MigrationError:
    """``message`` as a :class:`MigrationError`, or :class:`DatabaseUnreachable` when the
    database went away under it (a node starting in an outage waits instead of exiting)."""
    if isinstance(exc, UNREACHABLE):
        return DatabaseUnreachable(address, _one_line(str(exc)) or type(exc).__name__)
    return MigrationError(message)


@dataclass(frozen=True, slots=True)
class Migration:
    """One ``NNNN_name.sql`` file; ``checksum`` is the SHA-256 (hex) of its bytes on disk."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name


def _one_line(text: str) -> str:
    return " ".join(text.split())


def default_migrations_dir() -> Path:
    """The repository's ``migrations/`` in a checkout, else the installed package data."""
    package = Path(__file__).resolve().parent
    checkout = package.parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "migrations").is_dir():
        return checkout / "migrations"
    # The wheel force-includes the repository's migrations/ as stampflow/migrations.
    return package / "migrations"


def _read(path: Path) -> Migration:
    match = FILE_NAME.fullmatch(path.name)
    if match is None:
        raise MigrationError(
            f"{path}: bad migration file name; expected NNNN_name.sql "
            "(four digits, an underscore, then lower-case letters, digits and underscores)"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MigrationError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        sql = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MigrationError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    if not sql.strip():
        raise MigrationError(f"{path}: empty migration file")
    return Migration(
        version=int(match["version"]),
        name=match["name"],
        path=path,
        sql=sql,
        checksum=hashlib.sha256(raw).hexdigest(),
    )


def discover(directory: Path) -> list[Migration]:
    """Every ``*.sql`` file in ``directory``, in version order; other files are ignored."""
    if not directory.exists():
        raise MigrationError(f"{directory}: migrations directory does not exist")
    if not directory.is_dir():
        raise MigrationError(f"{directory}: migrations directory is not a directory")
    by_version: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql" or path.name.startswith("."):
            continue
        if not path.is_file():
            raise MigrationError(f"{path}: not a regular file")
        migration = _read(path)
        earlier = by_version.get(migration.version)
        if earlier is not None:
            raise MigrationError(
                f"{path}: duplicate migration version {migration.version} "
                f"(also {earlier.path.name})"
            )
        by_version[migration.version] = migration
    return [by_version[version] for version in sorted(by_version)]


def _check_unchanged(migrations: list[Migration], applied: dict[int, str]) -> None:
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"{migration.path}: applied checksum differs; write a new migration instead"
            )


async def _connect(dsn: str, statement_cache_size: int | None = None) -> Any:
    address = _address(dsn)
    options = {} if statement_cache_size is None else {
        "statement_cache_size": statement_cache_size}
    try:
        return await asyncpg.connect(dsn, **options)
    except ssl.SSLError as exc:
        # A certificate that does not verify (a wrong sslrootcert): waiting would not fix it.
        raise MigrationError(f"PostgreSQL at {address}: TLS failed: "
                             f"{_one_line(getattr(exc, 'verify_message', None) or str(exc))} "
                             "(check sslmode and sslrootcert in STAMPFLOW_DATABASE_URL)"
                             ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        if isinstance(exc, UNREACHABLE):
            raise DatabaseUnreachable(address, reason) from exc
        raise MigrationError(f"PostgreSQL at {address} refused the migration's connection: "
                             f"{reason}") from exc


async def _close(conn: Any) -> None:
    try:
        await conn.close(timeout=5)
    except Exception:
        # Never hide the error that got us here; dropping the socket still ends the session.
        conn.terminate()


async def _applied(conn: Any) -> dict[int, tuple[str, datetime]]:
    rows = cast(list[Any], await conn.fetch(_SELECT_APPLIED))
    return {
        int(row["version"]): (str(row["checksum"]), cast(datetime, row["applied_at"]))
        for row in rows
    }


async def _apply(conn: Any, migration: Migration, address: str) -> None:
    try:
        async with conn.transaction():  # a savepoint in migrate's transaction
            # No arguments: asyncpg sends the simple query protocol, so a file may hold many
            # statements. They commit or roll back together with the schema_migrations row.
            await conn.execute(migration.sql)
            await conn.execute(
                _INSERT_APPLIED, migration.version, migration.name, migration.checksum
            )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        detail = _one_line(str(exc)) or type(exc).__name__
        suffix = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        raise _failure(exc, address, f"{migration.path}: migration failed and was rolled back: "
                                  f"{detail}{suffix}") from exc


async def _holder(conn: Any) -> str:
    row = await conn.fetchrow(_LOCK_HOLDER, (LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF)
    if row is None:
        return "a session that has just released it"
    name = row["application_name"]
    return f"pid {row['pid']} (application_name {name!r})" if name else \
        f"pid {row['pid']} (no application_name)"


async def _lock(conn: Any, timeout: float) -> None:
    """Take ``LOCK_KEY`` for the open transaction, trying until ``timeout`` seconds have
    passed. The transaction's end releases it."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY):
        left = deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(
                f"schema_migrations: the migration lock is held by {await _holder(conn)}; "
                f"gave up after {timeout:g}s (STAMPFLOW_MIGRATE_LOCK_TIMEOUT)")
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)


async def migrate(dsn: str, directory: Path | None = None, *,
                  lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                  statement_cache_size: int | None = None) -> list[int]:
    """Apply every pending migration in order; return the versions applied by this call.

    Safe to call from many nodes at once: the work runs in one transaction holding a
    transaction-level advisory lock (``LOCK_KEY``), and whoever comes second finds nothing left
    to do. The lock is tried until ``lock_timeout`` seconds have passed; then
    ``MigrationError`` names the session holding it. Each file runs in a savepoint of its own;
    when one fails, that one is rolled back, the ones before it are committed and stay
    applied, and ``MigrationError`` names it with PostgreSQL's message.
    ``statement_cache_size=0`` behind PgBouncer (stampflow.connections.connect_options).
    """
    migrations = discover(directory if directory is not None else default_migrations_dir())
    address = _address(dsn)
    conn = await _connect(dsn, statement_cache_size)
    outer = conn.transaction()
    try:
        try:
            await outer.start()
            # Transaction-level: it spans the files' savepoints, and ends with the transaction
            # (committed, rolled back, or the connection closed on an error or a cancel).
            await _lock(conn, lock_timeout)
            await conn.execute(_CREATE_TABLE)
            applied = await _applied(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _failure(exc, address, "schema_migrations: cannot lock or read it: "
                                         f"{_one_line(str(exc))}") from exc
        _check_unchanged(migrations, {v: checksum for v, (checksum, _) in applied.items()})
        done: list[int] = []
        try:
            for migration in migrations:
                if migration.version in applied:
                    continue
                await _apply(conn, migration, address)
                done.append(migration.version)
        except DatabaseUnreachable:
            raise
        except MigrationError:
            await _commit(outer, address)  # the files before the failed one stay applied
            raise
        await _commit(outer, address)
        return done
    finally:
        await _close(conn)  # a transaction still open is rolled back, and its lock released


async def _commit(transaction: Any, address: str) -> None:
    try:
        await transaction.commit()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise _failure(exc, address, "schema_migrations: the migrations could not be "
                                     f"committed: {_one_line(str(exc))}") from exc


async def check_current(dsn: str, directory: Path | None = None, *,
                        statement_cache_size: int | None = None) -> None:
    """Raise :class:`SchemaBehind` while a migration on disk is not applied yet (a
    ServiceUnavailable: a starting node waits for `stampflow migrate`), ``MigrationError``
    when an applied file changed, :class:`DatabaseUnreachable` when PostgreSQL cannot be
    reached. Read-only, like :func:`status`; migrations newer than these files are fine (a
    newer node migrated first)."""
    found = await status(dsn, directory, statement_cache_size=statement_cache_size)
    pending = [migration for migration, applied_at in found if applied_at is None]
    if pending:
        raise SchemaBehind(_address(dsn), pending)


async def status(
    dsn: str, directory: Path | None = None, *, statement_cache_size: int | None = None
) -> list[tuple[Migration, datetime | None]]:
    """Each migration on disk with the time it was applied, or ``None`` while it is pending.

    Read-only: it takes no lock and creates nothing. A changed applied file raises
    ``MigrationError`` just as ``migrate`` would.
    """
    migrations = discover(directory if directory is not None else default_migrations_dir())
    conn = await _connect(dsn, statement_cache_size)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied = await _applied(conn) if exists else {}
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise _failure(exc, _address(dsn), "schema_migrations: cannot read it: "
                                  f"{_one_line(str(exc))}") from exc
    finally:
        await _close(conn)
    _check_unchanged(migrations, {v: checksum for v, (checksum, _) in applied.items()})
    return [
        (migration, applied[migration.version][1] if migration.version in applied else None)
        for migration in migrations
    ]
