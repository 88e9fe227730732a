"""The schema and the contracts: `stampflow migrate` and `stampflow contracts`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stampflow.cli.common import endpoints_for, out, run, settings

contracts_app = typer.Typer(help="Event and node contracts.", no_args_is_help=True)


def migrate_cmd(
    status: Annotated[bool, typer.Option("--status", help="List migrations, apply none.")] = False,
    lock_timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Seconds to wait for the migration lock (default: "
        "STAMPFLOW_MIGRATE_LOCK_TIMEOUT, 60).")] = None,
) -> None:
    """Apply pending SQL migrations (safe to run from several nodes at once)."""
    from stampflow import migrate as migrations
    from stampflow.connections import connect_options

    s = settings()
    url = endpoints_for(s, need_broker=False).database_url
    if status:
        for migration, applied_at in run(migrations.status(url, **connect_options(s))):
            when = applied_at.isoformat() if applied_at else "pending"
            out.print(f"{migration.version:04d}  {migration.name:<30} {when}")
        return
    applied = run(migrations.migrate(url, lock_timeout=lock_timeout or s.migrate_lock_timeout,
                                     **connect_options(s)))
    out.print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))


@contracts_app.command("export")
def contracts_export(directory: Path) -> None:
    """Write the JSON Schema of every event (and of the node contract format) to DIRECTORY."""
    from stampflow.contracts.schema import export_schemas

    written = export_schemas(directory)
    out.print(f"wrote {len(written)} schema(s) to {directory}")


@contracts_app.command("check")
def contracts_check(
    directory: Annotated[Path | None, typer.Argument(help="Contracts directory.")] = None,
) -> None:
    """Load and validate every node contract (the built-in ones by default)."""
    from stampflow.contracts.nodes import load_contracts

    for name, contract in load_contracts(directory).items():
        out.print(f"{name:<13} {contract.kind.value:<13} v{contract.version}  ok")


def asyncapi_text() -> str:
    """The AsyncAPI 3.0 document for the current STAMPFLOW_* settings (topic names, groups)."""
    from stampflow import __version__
    from stampflow.contracts.asyncapi import asyncapi_document, asyncapi_yaml
    from stampflow.contracts.nodes import load_contracts

    s = settings()
    contracts = load_contracts(s.contracts_dir)
    logical = ("requests", "events", "inference-jobs", "inference-results")
    return asyncapi_yaml(asyncapi_document(
        contracts, topics={t: s.topic(t) for t in logical}, dead_letter_topic=s.dlq_topic,
        groups={name: f"{s.consumer_group_prefix}-{name}" for name, c in contracts.items()
                if c.consumes},
        partitions=s.topic_partitions, replicas=s.topic_replication_factor,
        version=__version__))


@contracts_app.command("asyncapi")
def contracts_asyncapi(
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write the document here (default: standard output).")] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of the topics and events (YAML), from the contracts."""
    text = asyncapi_text()
    if out_file is None:
        print(text, end="")
        return
    try:
        out_file.write_text(text, encoding="utf-8")
    except OSError as err:
        raise typer.BadParameter(f"{out_file}: cannot write: {err.strerror}") from None
    out.print(f"wrote {out_file}")
