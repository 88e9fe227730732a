"""`stampflow check`: recompute every namespace's aggregates from the base rows and compare.

The reducer maintains ``namespace_aggregates`` and ``namespace_state_counts`` incrementally;
this recomputes them from ``workflows``, ``stamps``, ``generations`` and ``anomalies`` in one
snapshot, so a lost or doubled update shows up as a difference. What retention dropped with old
partitions was added to ``namespace_retired`` in the same transaction as the drop, and counts
here beside the rows that remain (the state counts cover the rows that remain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

# Integer aggregates recomputed exactly; compute_seconds is compared within a tolerance.
RECOMPUTE = """
WITH ns AS (
    SELECT namespace FROM namespace_aggregates
    UNION SELECT namespace FROM workflows
    UNION SELECT namespace FROM stamps
    UNION SELECT namespace FROM namespace_retired
), w AS (
    SELECT namespace, count(*) AS workflows,
           count(*) FILTER (WHERE state = 'completed') AS completed,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE outcome = 'duplicate') AS duplicates
    FROM workflows GROUP BY namespace
), s AS (
    SELECT namespace, count(*) AS stamps, coalesce(sum(size), 0) AS total_bytes
    FROM stamps GROUP BY namespace
), g AS (
    SELECT namespace, count(*) AS generations,
           coalesce(sum(width::bigint * height), 0) AS total_pixels,
           coalesce(sum(compute_seconds), 0) AS compute_seconds
    FROM generations GROUP BY namespace
), a AS (
    SELECT namespace, count(*) AS anomalies FROM anomalies GROUP BY namespace
)
SELECT ns.namespace,
       coalesce(w.workflows, 0) + coalesce(r.workflows, 0) AS workflows,
       coalesce(w.completed, 0) + coalesce(r.completed, 0) AS completed,
       coalesce(w.failed, 0) + coalesce(r.failed, 0) AS failed,
       coalesce(w.duplicates, 0) + coalesce(r.duplicates, 0) AS duplicates,
       coalesce(s.stamps, 0) AS stamps, coalesce(s.total_bytes, 0) AS total_bytes,
       coalesce(g.generations, 0) + coalesce(r.generations, 0) AS generations,
       coalesce(g.total_pixels, 0) + coalesce(r.total_pixels, 0) AS total_pixels,
       coalesce(g.compute_seconds, 0) + coalesce(r.compute_seconds, 0) AS compute_seconds,
       coalesce(a.anomalies, 0) + coalesce(r.anomalies, 0) AS anomalies
FROM ns
LEFT JOIN w USING (namespace) LEFT JOIN s USING (namespace)
LEFT JOIN g USING (namespace) LEFT JOIN a USING (namespace)
LEFT JOIN namespace_retired r USING (namespace)
WHERE $1::text IS NULL OR ns.namespace = $1
ORDER BY ns.namespace
"""

STORED = """
SELECT namespace, workflows, completed, failed, duplicates, stamps, total_bytes, generations,
       total_pixels, compute_seconds, anomalies
FROM namespace_aggregates WHERE $1::text IS NULL OR namespace = $1
"""

STATE_COUNTS = """
SELECT coalesce(c.namespace, w.namespace) AS namespace, coalesce(c.kind, w.kind) AS kind,
       coalesce(c.state, w.state) AS state, coalesce(c.count, 0) AS stored,
       coalesce(w.n, 0) AS recomputed
FROM (SELECT * FROM namespace_state_counts WHERE count <> 0) c
FULL JOIN (SELECT namespace, kind, state, count(*) AS n FROM workflows
           GROUP BY namespace, kind, state) w
  ON c.namespace = w.namespace AND c.kind = w.kind AND c.state = w.state
WHERE ($1::text IS NULL OR coalesce(c.namespace, w.namespace) = $1)
  AND coalesce(c.count, 0) <> coalesce(w.n, 0)
"""

FIELDS = ("workflows", "completed", "failed", "duplicates", "stamps", "total_bytes",
          "generations", "total_pixels", "anomalies")


@dataclass(frozen=True, slots=True)
class Difference:
    namespace: str
    field: str
    stored: Any
    recomputed: Any

    def __str__(self) -> str:
        return (f"{self.namespace}.{self.field}: stored {self.stored}, "
                f"recomputed {self.recomputed}")


async def check(conn: asyncpg.Connection, namespace: str | None = None) -> list[Difference]:
    """Every difference between the stored aggregates and the base rows (one snapshot)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        recomputed = {r["namespace"]: r for r in await conn.fetch(RECOMPUTE, namespace)}
        stored = {r["namespace"]: r for r in await conn.fetch(STORED, namespace)}
        counts = await conn.fetch(STATE_COUNTS, namespace)
    out: list[Difference] = []
    for ns in sorted(recomputed.keys() | stored.keys()):
        want, have = recomputed.get(ns), stored.get(ns)
        for name in (*FIELDS, "compute_seconds"):
            expected = want[name] if want is not None else 0
            actual = have[name] if have is not None else 0
            if name == "compute_seconds":
                if abs(float(expected) - float(actual)) > 1e-6 * max(1.0, abs(float(expected))):
                    out.append(Difference(ns, name, actual, expected))
            elif expected != actual:
                out.append(Difference(ns, name, actual, expected))
    for r in counts:
        out.append(Difference(r["namespace"], f"state_count[{r['kind']}/{r['state']}]",
                              r["stored"], r["recomputed"]))
    return out
