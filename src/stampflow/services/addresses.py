"""Where the services are: ``Endpoints`` (a PostgreSQL URL and the Kafka bootstrap servers,
``repr`` hiding any password), the endpoints of external services as settings name them, helpers
that read or rewrite a PostgreSQL URL without showing its credentials, and the TCP ports on
127.0.0.1 that the embedded servers pick and probe.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from stampflow.connections import PLAINTEXT, KafkaOptions, kafka_options
from stampflow.errors import StampflowError
from stampflow.observability import redact
from stampflow.settings import Settings


@dataclass(frozen=True)
class Endpoints:
    """Where PostgreSQL and the Kafka-protocol broker are, and how clients reach the broker
    (``kafka``: TLS and SASL options; plaintext to the embedded broker by default). ``repr``
    hides any password."""

    database_url: str
    bootstrap_servers: str
    kafka: KafkaOptions = field(default=PLAINTEXT)

    def with_database(self, database_url: str) -> Endpoints:
        return replace(self, database_url=database_url)

    def redacted(self) -> str:
        return f"PostgreSQL {redact(self.database_url)}, Kafka {self.bootstrap_servers}"

    def __repr__(self) -> str:
        return (f"Endpoints(database_url={redact(self.database_url)!r}, "
                f"bootstrap_servers={self.bootstrap_servers!r}, kafka={self.kafka!r})")


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


def external_endpoints(settings: Settings, *, need_broker: bool = True) -> Endpoints:
    """Endpoints of services already running, from settings, with the Kafka security
    options they name. A command that only queries PostgreSQL passes ``need_broker=False``."""
    database_url = settings.database_url.get_secret_value() if settings.database_url else ""
    wanted = [("STAMPFLOW_DATABASE_URL", database_url)]
    if need_broker:
        wanted.append(("STAMPFLOW_BOOTSTRAP_SERVERS", settings.bootstrap_servers or ""))
    missing = [name for name, value in wanted if not value.strip()]
    if missing:
        raise StampflowError(f"external services need {' and '.join(missing)} to be set")
    return Endpoints(database_url, settings.bootstrap_servers or "", kafka_options(settings))
