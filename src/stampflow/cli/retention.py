"""`stampflow retention`: the history tables' day partitions, and what retention would do."""

from __future__ import annotations

from typing import Annotated

import typer

from stampflow.cli.common import endpoints_for, out, run, settings


def retention_cmd(
    apply: Annotated[bool, typer.Option(
        "--apply", help="Make the partitions due and drop the expired ones now (the reducers "
                        "also do it every STAMPFLOW_HISTORY_MAINTENANCE_INTERVAL_S).")] = False,
) -> None:
    """The history tables' partitions, and what retention would make and drop."""
    from datetime import UTC, datetime

    from stampflow.nodes.reducer import retention
    from stampflow.queries import connect

    config = settings()
    url = endpoints_for(config, need_broker=False).database_url
    keep, ahead = config.history_retention_days, config.history_partitions_ahead

    async def main() -> tuple[list[retention.Partition], retention.Plan,
                              retention.Report | None]:
        conn = await connect(url)
        try:
            existing = await retention.partitions(conn)
            wanted = retention.plan(existing, datetime.now(UTC).date(), keep_days=keep,
                                    ahead_days=ahead,
                                    default_days=await retention.default_days(conn))
            report = (await retention.maintain(conn, keep_days=keep, ahead_days=ahead)
                      if apply else None)
            return existing, wanted, report
        finally:
            await conn.close()

    existing, wanted, report = run(main())
    kept = f"{keep} days" if keep else "forever"
    out.print(f"history kept {kept}; partitions made {ahead} days ahead", markup=False)
    for p in existing:
        span = ("rows no day partition covers" if p.is_default else
                f"before {p.end}" if p.first is None else f"{p.first}")
        out.print(f"  {p.name:<44} {span}", markup=False, highlight=False)
    if report is not None:
        if report.skipped:
            out.print("another session is maintaining the partitions; nothing done",
                      markup=False)
        else:
            out.print(f"made {len(report.created)}, dropped {len(report.dropped)}, moved "
                      f"{report.moved} rows out of default partitions", markup=False)
    elif wanted.empty:
        out.print("nothing due", markup=False)
    else:
        out.print(f"due: make {len(wanted.create)}, drop {len(wanted.drop)} "
                  f"({', '.join(p.name for p in wanted.drop) or 'none'}); --apply does it",
                  markup=False, highlight=False)
