"""The CI-sized fault campaign: 10,000 seeded mixed requests across 8 namespaces while node
processes are killed with SIGKILL, the broker is frozen for 10 s, PostgreSQL restarts and a
second orchestrator joins; and a smaller one in which the broker itself is SIGKILLed (on S3
storage). Outages through fault proxies are in test_outages.py. The long run is
`python -m tests.integration.campaign`."""

from __future__ import annotations

from pathlib import Path

import pytest

from stampflow.services import EmbeddedBroker, Endpoints
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.s3 import moto_server_command
from tests.integration.campaign import (
    Config,
    make_plan,
    run_campaign,
    s3_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_ten_thousand_requests_under_faults_lose_nothing_and_count_nothing_twice(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
    tiny_flux_model: Path,
) -> None:
    if services.postgres is None or services.broker is None:
        pytest.skip("fault injection needs services it controls (embedded or containers)")
    cfg = Config(requests=10_000, kills=10, freeze_s=10.0, postgres_restarts=1,
                 second_orchestrator=True, generation_share=0.003)
    report = await run_campaign(
        cfg, services.endpoints.with_database(fresh_database_url), services.postgres,
        services.broker, tmp_path, tiny_model=tiny_flux_model,
        topic_prefix=topic_prefix)
    assert report.failures == [], "\n".join(report.failures)
    assert report.kills >= 10
    assert {f.what.split(" (")[0] for f in report.faults} >= {
        "broker frozen 10s", "restart postgres", "second orchestrator"}
    assert report.checks["workflows"] == report.workflows_expected
    assert report.dead_letters == report.requests_by_kind["garbage"] > 0
    assert report.checks["stampflow_check_exit"] == 0


def test_the_plan_is_seeded_and_mixed() -> None:
    a, b = make_plan(Config(requests=3000, seed=3)), make_plan(Config(requests=3000, seed=3))
    assert [(r.kind, r.event_id) for r in a.requests] == [(r.kind, r.event_id) for r in b.requests]
    kinds = {r.kind for r in a.requests}
    assert kinds >= {"inline", "file", "escape", "missing", "too_large", "invalid", "garbage",
                     "replay"}
    assert len({r.namespace for r in a.requests}) == 8
    c = make_plan(Config(requests=3000, seed=4))
    assert [r.event_id for r in c.requests] != [r.event_id for r in a.requests]


async def test_broker_killed_on_s3_storage_loses_nothing(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
) -> None:
    """The broker itself SIGKILLed and restarted, twice, among node kills: with Tansu's S3
    storage engine (on moto's S3-API server) its topics, records and committed offsets
    outlive it, and the campaign loses and doubles nothing."""
    if services.postgres is None:
        pytest.skip("fault injection needs services it controls (embedded or containers)")
    if moto_server_command() is None:
        pytest.skip("no S3-API server for Tansu's S3 storage: pip install 'moto[server]' (or "
                    "name a moto_server in STAMPFLOW_TEST_MOTO_SERVER)")
    with s3_server(tmp_path / "moto.log") as env:
        broker = EmbeddedBroker(tmp_path / "broker.log", storage="s3://tansu/",
                                storage_env=env)
        broker.start()
        try:
            # Small: Tansu's S3 engine reads slower the more batch objects a partition holds
            # (on moto: ~33 single-record batches/s consumed at 1,000 objects, ~3/s at 3,000).
            cfg = Config(requests=400, kills=1, freezes=0, postgres_restarts=0,
                         second_orchestrator=False, broker_kills=2, rate=40.0,
                         generation_share=0.0, stall_timeout_s=120.0)
            report = await run_campaign(
                cfg, Endpoints(fresh_database_url, broker.bootstrap_servers), services.postgres,
                broker, tmp_path, topic_prefix=topic_prefix)
        finally:
            broker.stop()
    assert report.failures == [], "\n".join(report.failures)
    assert sum(f.what.startswith("broker kill -9") for f in report.faults) == 2
    assert report.checks["workflows"] == report.workflows_expected
