"""Whether the services answer: ``check_database`` (connect and ``select 1``) and
``check_broker`` (reach a bootstrap server over TCP, then list topics), each raising
ServiceUnavailable with one line, free of passwords, saying where and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import asyncpg

from stampflow.connections import PLAINTEXT, KafkaOptions
from stampflow.errors import ServiceUnavailable
from stampflow.observability import redact
from stampflow.services.addresses import database_address


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


async def check_broker(bootstrap: str, timeout: float = 5.0, *,
                       kafka: KafkaOptions | None = None) -> None:
    """Reach a bootstrap server over TCP, then list topics (with ``kafka``'s TLS and SASL
    options); ServiceUnavailable otherwise."""
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
                                request_timeout_ms=max(1000, int(timeout * 1000)),
                                **(kafka or PLAINTEXT).client_kwargs())
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
