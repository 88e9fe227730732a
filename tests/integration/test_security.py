"""Secrets stay out of logs: a planted password in the database URL appears nowhere in what
the nodes and the CLI print, in normal work or on the error paths. (Path confinement, size
limits and row-level security: test_workflows.py, test_stamping.py, test_fuzz_decode.py and
test_operators.py.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stampflow.app import prepare
from stampflow.client import Client
from tests.integration.stack import NodeProcess, finished_count, settings_for, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLANTED = "PLANTED-s3cret-XYZ"


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAMPFLOW_SERVICES": "external", "STAMPFLOW_DATABASE_URL": url,
           "STAMPFLOW_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    return subprocess.run([sys.executable, "-m", "stampflow", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_a_planted_password_never_reaches_the_logs(
    services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    url = fresh_database_url
    secret = urlsplit(url).password
    if secret is None:  # the embedded server trusts: plant one, it is accepted and ignored
        url = url.replace("postgres@", f"postgres:{PLANTED}@")
        secret = PLANTED
    endpoints = services.endpoints.with_database(url)
    settings = settings_for(endpoints, topic_prefix, tmp_path)
    await prepare(settings, endpoints)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = [NodeProcess(n, settings, logs / f"{n}.log", extra_env={"STAMPFLOW_LOG_LEVEL": "DEBUG"})
             for n in ("orchestrator", "reducer")]
    unreachable = url.replace(urlsplit(url).netloc.split("@")[-1], "127.0.0.1:1")
    try:
        async with Client(settings, endpoints, source="security") as client:
            for i in range(20):
                await client.submit_stamp("sec", content=f"secret-free {i}".encode())
        await wait_for(lambda: _done(fresh_database_url, 20), 60, "20 workflows")
        # The error paths: a node and two commands pointed at a database that is not there.
        broken = settings_for(endpoints.with_database(unreachable), topic_prefix, tmp_path)
        lost = NodeProcess("reducer", broken, logs / "unreachable.log")
        code = await asyncio.to_thread(lost.proc.wait, 60)
        lost.kill()  # already exited: closes its log
        assert code != 0
        status = await asyncio.to_thread(_cli, "status", url=unreachable)
        check = await asyncio.to_thread(_cli, "check", url=unreachable)
    finally:
        for node in nodes:
            node.kill()
    printed = {p.name: p.read_text(errors="replace") for p in logs.glob("*.log")}
    printed["status"] = status.stdout + status.stderr
    printed["check"] = check.stdout + check.stderr
    for where, text in printed.items():
        assert secret not in text, f"the password appears in {where}"
    # ... while the same output does name the database, so the test looks at the right text.
    assert status.returncode == 1 and "127.0.0.1:1" in printed["status"]
    assert check.returncode == 1 and "127.0.0.1:1" in printed["check"]
    assert "127.0.0.1:1" in printed["unreachable.log"]
    assert '"workflow finished"' in printed["orchestrator.log"]


async def _done(url: str, n: int) -> bool:
    return await finished_count(url) >= n
