"""Who the operator is, and the connection the console uses on their behalf.

An operator logs in with HTTP Basic: their PostgreSQL role name and its password. The console
keeps no accounts: it opens a small asyncpg pool *as that role* (``user=role,
password=...`` against the configured server and database), so PostgreSQL checks the password
(SCRAM) and row-level security decides what every query sees. A wrong password is PostgreSQL's
refusal, answered with 401. Pools are keyed by role and a hash of the password, so a changed
password opens a new pool; the least recently used pool is closed past ``max_pools``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from stampflow.console.config import ConsoleConfig
from stampflow.queries import ROLE_NAME

REALM = 'Basic realm="stampflow console", charset="UTF-8"'
# asyncpg raises these when PostgreSQL refuses the login itself.
_REFUSED = (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)


class Unauthorized(Exception):
    """No credentials, or credentials PostgreSQL refused: 401 with a Basic challenge."""


class Unavailable(Exception):
    """PostgreSQL cannot be reached: 503, one line."""


@dataclass(frozen=True, slots=True)
class Credentials:
    role: str
    password: str = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.role, hashlib.sha256(self.password.encode()).hexdigest()


def parse_basic(header: str | None) -> Credentials:
    """The role and password of an ``Authorization: Basic`` header; :class:`Unauthorized`."""
    if not header:
        raise Unauthorized("log in with your PostgreSQL role")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("only HTTP Basic is accepted")
    try:
        role, sep, password = base64.b64decode(encoded.strip(), validate=True).decode(
            "utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    if not sep or not password or not ROLE_NAME.fullmatch(role):
        raise Unauthorized("a role name and a password are needed")
    return Credentials(role, password)


def operator_url(database_url: str, creds: Credentials) -> str:
    """The server's URL with the operator's own login (for code that takes a URL: dlq.replay)."""
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    login = f"{quote(creds.role, safe='')}:{quote(creds.password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


class OperatorConnection(asyncpg.Connection):  # type: ignore[misc]
    """An operator's connection. Returned to its pool, it is reset without
    ``pg_advisory_unlock_all()``: operators' roles may not call the advisory-lock functions
    (revoked, so that no operator can hold the migration lock), and the console takes none."""

    def get_reset_query(self) -> str:  # asyncpg >= 0.30
        return "CLOSE ALL;\nUNLISTEN *;\nRESET ALL;"


class RolePools:
    """One small pool per operator role, created on first use, checked by PostgreSQL."""

    def __init__(self, config: ConsoleConfig) -> None:
        self._config = config
        self._pools: OrderedDict[tuple[str, str], asyncpg.Pool] = OrderedDict()
        self._lock = asyncio.Lock()

    async def _pool(self, creds: Credentials) -> asyncpg.Pool:
        async with self._lock:
            pool = self._pools.get(creds.key)
            if pool is not None:
                self._pools.move_to_end(creds.key)
                return pool
            try:
                pool = await asyncpg.create_pool(
                    self._config.database_url, user=creds.role, password=creds.password,
                    min_size=1, max_size=self._config.pool_size, timeout=10.0,
                    command_timeout=30.0, connection_class=OperatorConnection,
                    **self._config.connect_options)
            except _REFUSED:
                raise Unauthorized("PostgreSQL refused this role and password") from None
            except (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                    asyncpg.CannotConnectNowError) as err:
                raise Unavailable(f"PostgreSQL cannot be reached: {type(err).__name__}") \
                    from None
            self._pools[creds.key] = pool
            while len(self._pools) > self._config.max_pools:
                _, oldest = self._pools.popitem(last=False)
                await oldest.close()
            return pool

    @asynccontextmanager
    async def connection(self, creds: Credentials) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._pool(creds)
        async with pool.acquire() as conn:
            yield conn

    async def close(self) -> None:
        async with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), 3.0)
            except TimeoutError:
                pool.terminate()
