"""PostgreSQL's errors, sorted by what to do about them. One place, for the reducer and for the
migrations a node runs at start-up.

- :data:`UNREACHABLE`: the database cannot be used *yet*: no connection, one lost mid-way
  (class 08), a server shutting down or starting up (57P01-03), too many connections, a
  timeout. Waiting fixes it.
- :data:`TRANSIENT`: those, and a conflict another session caused (deadlock, serialization
  failure, a lock not available, a statement timeout). Trying again fixes it.
- :data:`DATA_ERRORS`: what PostgreSQL (or asyncpg, encoding the arguments) says about the
  *data*: the same rows fail the same way however often they are sent.

Anything else that is not transient (no privilege, a missing table, a full disk) is a problem
of the database, not of the data: the reducer retries it so that an operator can fix it
without any event being set aside; a migration reports it and the node exits.
"""

from __future__ import annotations

import asyncpg

UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)

TRANSIENT: tuple[type[BaseException], ...] = (
    *UNREACHABLE,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,  # a statement timeout
    asyncpg.LockNotAvailableError,
)

DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # class 22, and asyncpg's own "invalid input for query argument"
    asyncpg.IntegrityConstraintViolationError,  # class 23
    UnicodeError,
    OverflowError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
)
