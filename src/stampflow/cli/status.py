"""Operator queries against PostgreSQL: `stampflow status`, `check`, `workflows`,
`workflow` and `verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stampflow.cli.common import (
    NamespaceFilter,
    NamespaceOpt,
    UsageError,
    _print_summary,
    _text,
    endpoints_for,
    out,
    run,
    settings,
)


def status_cmd(namespace: NamespaceFilter = None) -> None:
    """Per-namespace aggregates (from the namespace_summary view)."""
    from stampflow.queries import summary

    rows = run(summary(endpoints_for(settings(), need_broker=False).database_url, namespace))
    _print_summary(rows, title="stampflow status")


def check_cmd(namespace: NamespaceFilter = None) -> None:
    """Recompute aggregates from the base rows and compare; exit 1 on any difference."""
    from stampflow.queries import connect
    from stampflow.reconcile import check

    url = endpoints_for(settings(), need_broker=False).database_url

    async def main() -> list[str]:
        conn = await connect(url)
        try:
            return [str(d) for d in await check(conn, namespace)]
        finally:
            await conn.close()

    differences = run(main())
    for line in differences:
        out.print(f"DIFFERS  {line}", markup=False, highlight=False)
    if differences:
        raise typer.Exit(1)
    out.print("consistent: stored aggregates equal those recomputed from the base rows")


def workflows_cmd(
    namespace: NamespaceFilter = None,
    state: Annotated[str | None, typer.Option("--state", "-s")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Recent workflows, newest first."""
    from stampflow.queries import workflows

    rows = run(workflows(endpoints_for(settings(), need_broker=False).database_url,
                         namespace, state, limit))
    table = Table("workflow", "namespace", "kind", "state", "outcome", "updated", "reason")
    for r in rows:
        table.add_row(*map(_text, (r["workflow_id"], r["namespace"], r["kind"], r["state"],
                                   r["outcome"], r["updated_at"].isoformat(timespec="seconds"),
                                   (r["reason"] or "")[:60])))
    out.print(table)


def workflow_cmd(workflow_id: str) -> None:
    """One workflow's transition history."""
    from stampflow.queries import history

    rows = run(history(endpoints_for(settings(), need_broker=False).database_url, workflow_id))
    table = Table("seq", "from", "to", "trigger", "at", "reason", title=_text(workflow_id))
    for r in rows:
        table.add_row(*map(_text, (r["seq"], r["from_state"], r["to_state"], r["trigger"],
                                   r["occurred_at"].isoformat(timespec="milliseconds"),
                                   r["reason"])))
    out.print(table)


def verify_cmd(path: Path, namespace: NamespaceOpt = "default") -> None:
    """Is this exact content stamped in NAMESPACE? Exit 0 if yes, 1 if not."""
    from stampflow.nodes.stamping import StampError, StampingNode
    from stampflow.queries import find_stamp

    s = settings()
    try:
        local = StampingNode(Path("/"), max_bytes=2**62).stamp_path(path.resolve(),
                                                                    namespace=namespace)
    except StampError as e:  # exit 1 means "not stamped": a file that cannot be read is not
        raise UsageError(str(e).replace(str(path.resolve()), str(path), 1)) from None
    row = run(find_stamp(endpoints_for(s, need_broker=False).database_url, namespace,
                         local.hash))
    if row is None:
        out.print(_text(f"NOT STAMPED  {path}  blake3:{local.hash}  (namespace {namespace})"))
        raise typer.Exit(1)
    out.print(_text(f"STAMPED  {path}  blake3:{local.hash}  size={row['size']}  "
                    f"at={row['stamped_at'].isoformat()}  namespace={namespace}"))
