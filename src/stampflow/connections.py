"""How stampflow's clients reach managed services, from settings: ``KafkaOptions`` (the Kafka
security settings, turned into aiokafka keyword arguments by :meth:`KafkaOptions.client_kwargs`,
the one place that does it) and :func:`pool_options`/:func:`connect_options` (asyncpg's pool
size and statement cache, PgBouncer-safe when ``database_pgbouncer`` is on).

PostgreSQL's TLS needs nothing here: ``sslmode`` and ``sslrootcert`` (and ``sslcert``,
``sslkey``) in ``STAMPFLOW_DATABASE_URL`` are read by asyncpg from the URL itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from stampflow.errors import StampflowError
from stampflow.settings import Settings

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaOptions:
    """How clients talk to the Kafka-protocol broker. The default is the embedded broker's:
    plaintext, no login, and Tansu's workarounds on (``tansu``: stampflow.bus.GroupConsumer
    leaves its group even in generation 0). :func:`kafka_options` builds the options of
    external services from settings, with ``tansu`` off. ``repr`` hides the password."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    tansu: bool = True

    def __post_init__(self) -> None:
        problem = _problem(self.security_protocol, self.sasl_mechanism, self.sasl_username,
                           self.sasl_password, self.ssl_certfile, self.ssl_keyfile)
        if problem:
            raise StampflowError(f"Kafka client settings: {problem}")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context: the CA file given (else the system's CAs), the client certificate
        and key if given; host names are checked. One line when a file cannot be used."""
        from aiokafka.helpers import create_ssl_context

        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile)
            return context
        except (OSError, ssl.SSLError) as err:
            files = ", ".join(f for f in (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
                              if f)
            reason = getattr(err, "strerror", None) or " ".join(str(err).split())
            raise StampflowError(f"Kafka TLS settings: cannot load {files}: {reason}") from None

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every AIOKafkaProducer, AIOKafkaConsumer and
        AIOKafkaAdminClient that stampflow builds gets (aiokafka 0.13+)."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


def _problem(protocol: str, mechanism: str | None, username: str | None,
             password: str | None, certfile: str | None, keyfile: str | None) -> str | None:
    """What is wrong with a combination of Kafka security settings, in one line, or None."""
    if protocol not in SECURITY_PROTOCOLS:
        return (f"STAMPFLOW_KAFKA_SECURITY_PROTOCOL={protocol!r}: expected one of "
                f"{', '.join(SECURITY_PROTOCOLS)}")
    if protocol.startswith("SASL_"):
        if mechanism not in SASL_MECHANISMS:
            return (f"STAMPFLOW_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                    f"STAMPFLOW_KAFKA_SASL_MECHANISM, one of {', '.join(SASL_MECHANISMS)} "
                    f"(got {mechanism!r})")
        missing = [name for name, value in (("STAMPFLOW_KAFKA_SASL_USERNAME", username),
                                            ("STAMPFLOW_KAFKA_SASL_PASSWORD", password))
                   if not value]
        if missing:
            return (f"STAMPFLOW_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                    f"{' and '.join(missing)} to be set")
    elif mechanism or username or password:
        return (f"STAMPFLOW_KAFKA_SASL_* are set but STAMPFLOW_KAFKA_SECURITY_PROTOCOL="
                f"{protocol} does not log in (use SASL_PLAINTEXT or SASL_SSL)")
    if keyfile and not certfile:
        return "STAMPFLOW_KAFKA_SSL_KEYFILE is set without STAMPFLOW_KAFKA_SSL_CERTFILE"
    return None


# The embedded broker's options: plaintext, Tansu's workarounds on.
PLAINTEXT = KafkaOptions()


def kafka_problem(settings: Settings) -> str | None:
    """What is wrong with the Kafka security settings, or None (Settings validates with it)."""
    password = settings.kafka_sasl_password
    return _problem(settings.kafka_security_protocol, settings.kafka_sasl_mechanism,
                    settings.kafka_sasl_username,
                    password.get_secret_value() if password else None,
                    _str(settings.kafka_ssl_certfile), _str(settings.kafka_ssl_keyfile))


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)


def kafka_options(settings: Settings) -> KafkaOptions:
    """The Kafka client options that settings name, for an external broker (Tansu's
    workaround only with ``kafka_tansu``)."""
    password = settings.kafka_sasl_password
    return KafkaOptions(
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=password.get_secret_value() if password else None,
        ssl_cafile=_str(settings.kafka_ssl_cafile),
        ssl_certfile=_str(settings.kafka_ssl_certfile),
        ssl_keyfile=_str(settings.kafka_ssl_keyfile),
        tansu=settings.kafka_tansu,
    )


def connect_options(settings: Settings) -> dict[str, Any]:
    """asyncpg.connect() keyword arguments: no statement cache behind PgBouncer (its
    transaction pooling hands each transaction to any server connection, where a prepared
    statement of another one does not exist)."""
    return {"statement_cache_size": 0} if settings.database_pgbouncer else {}


def pool_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """asyncpg.create_pool() keyword arguments: ``database_pool_size`` connections at most
    (one kept open), and :func:`connect_options`. ``overrides`` win."""
    options: dict[str, Any] = {"min_size": 1, "max_size": settings.database_pool_size,
                               **connect_options(settings)}
    options.update(overrides)
    return options


__all__ = [
    "PLAINTEXT",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaOptions",
    "connect_options",
    "kafka_options",
    "kafka_problem",
    "pool_options",
]
