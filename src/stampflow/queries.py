"""What operators ask PostgreSQL: the views, one workflow's history, stamps, roles."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import asyncpg

from stampflow.contracts.events import NAMESPACE_PATTERN
from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.observability import redact
from stampflow.services import database_address, password_clause

# Anchored with \Z, not $: ``$`` also matches before a trailing newline.
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


async def connect(url: str, timeout: float = 10.0) -> asyncpg.Connection:
    """A connection, or one clear line naming the server's address and why not."""
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresConnectionError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError) as err:
        reason = redact(str(err) or type(err).__name__)
        raise ServiceUnavailable("PostgreSQL", database_address(url), reason) from None


async def _fetch(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await connect(url)
    try:
        return [dict(row) for row in await conn.fetch(query, *args)]
    except asyncpg.UndefinedTableError as err:
        raise StampflowError(f"PostgreSQL at {database_address(url)}: {err}; "
                             "run `stampflow migrate` first") from None
    finally:
        await conn.close()


async def summary(url: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return await _fetch(
        url,
        "SELECT * FROM namespace_summary WHERE $1::text IS NULL OR namespace = $1 "
        "ORDER BY namespace",
        namespace,
    )


async def workflows(url: str, namespace: str | None, state: str | None,
                    limit: int = 50) -> list[dict[str, Any]]:
    return await _fetch(
        url,
        "SELECT * FROM workflow_overview WHERE ($1::text IS NULL OR namespace = $1) "
        "AND ($2::text IS NULL OR state = $2) ORDER BY updated_at DESC LIMIT $3",
        namespace, state, limit,
    )


async def history(url: str, workflow_id: str) -> list[dict[str, Any]]:
    try:
        wid = UUID(workflow_id)
    except ValueError:
        raise StampflowError(f"{workflow_id}: not a workflow id (expected a UUID)") from None
    rows = await _fetch(
        url, "SELECT * FROM workflow_transitions WHERE workflow_id = $1 ORDER BY seq", wid
    )
    if not rows:
        raise StampflowError(f"{workflow_id}: no such workflow (or not visible to this role)")
    return rows


async def find_stamp(url: str, namespace: str, hash_hex: str) -> dict[str, Any] | None:
    rows = await _fetch(url, "SELECT * FROM stamps WHERE namespace = $1 AND hash = $2",
                        namespace, hash_hex)
    return rows[0] if rows else None


def check_role_name(role: str) -> str:
    """``role`` if it is a name `stampflow roles create` may use, else StampflowError."""
    if not ROLE_NAME.fullmatch(role) or role.startswith("pg_"):
        raise StampflowError(f"{role!r}: not a valid role name (lowercase letters, digits and "
                             "'_', not starting with a digit or pg_, at most 63 characters)")
    return role


async def create_role(url: str, role: str, namespaces: list[str], password: str | None,
                      *, replay: bool = False) -> None:
    """A login role that reads only ``namespaces`` (row-level security on every table);
    ``replay`` makes it a member of ``stampflow_replay`` (migration 0004: it may replay dead
    letters from the console).

    The password travels as a SCRAM verifier where it can (stampflow.services.password_clause),
    so that not even a failed statement in the server's log shows it.
    """
    check_role_name(role)
    for namespace in namespaces:
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise StampflowError(f"{namespace!r}: not a valid namespace")
    conn = await connect(url)
    try:
        await _create_role(conn, role, namespaces, password, replay=replay)
    except asyncpg.PostgresError as err:
        raise StampflowError(f"PostgreSQL at {database_address(url)}: cannot create role "
                             f"{role}: {' '.join(str(err).split())}") from None
    finally:
        await conn.close()


async def _create_role(conn: asyncpg.Connection, role: str, namespaces: list[str],
                       password: str | None, *, replay: bool = False) -> None:
    async with conn.transaction():
        found = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles "
                                    "WHERE rolname = $1", role)
        if found is not None and (found["rolsuper"] or found["rolbypassrls"]):
            raise StampflowError(f"{role}: a superuser or a role that bypasses row-level "
                                 "security; a namespace role must be an ordinary one")
        if found is None:
            await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        if password is not None:
            await conn.execute(f'ALTER ROLE "{role}" {password_clause(password)}')
        await conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        await conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        await conn.execute(
            "INSERT INTO namespace_grants (role_name, namespace) "
            "SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            role, namespaces,
        )
        if replay:
            await conn.execute(f'GRANT stampflow_replay TO "{role}"')
