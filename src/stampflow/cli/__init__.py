"""The ``stampflow`` command line. Every expected error is one line on stderr, exit code 1
(2 for a bad setting or argument). Text that comes from the data (reasons, errors, dead
letters) is printed as it is, never read as rich markup.

This package holds the root app and `main()`; each command group is a module of its own,
and all of them import their shared helpers from `stampflow.cli.common`."""

from __future__ import annotations

import sys

import typer

from stampflow.cli.common import UsageError, endpoints_for, err, out, run, settings
from stampflow.cli.dlq import dlq_app
from stampflow.cli.models import models_app
from stampflow.cli.nodes import console_cmd, demo_cmd, run_cmd, up_cmd
from stampflow.cli.retention import retention_cmd
from stampflow.cli.roles import roles_app
from stampflow.cli.schema import contracts_app, migrate_cmd
from stampflow.cli.services import services_app
from stampflow.cli.stamp import stamp_cmd
from stampflow.cli.status import check_cmd, status_cmd, verify_cmd, workflow_cmd, workflows_cmd
from stampflow.cli.submit import submit_app
from stampflow.contracts.nodes import ContractError
from stampflow.errors import StampflowError
from stampflow.observability import configure_logging, redact

__all__ = ["UsageError", "app", "endpoints_for", "err", "main", "out", "run", "settings"]

app = typer.Typer(
    help="stampflow: BLAKE3 stamping and image generation workflows over Kafka and PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# The commands in the order `--help` lists them, then the command groups.
app.command("migrate")(migrate_cmd)
app.command("stamp")(stamp_cmd)
app.command("run")(run_cmd)
app.command("up")(up_cmd)
app.command("demo")(demo_cmd)
app.command("console")(console_cmd)
app.command("status")(status_cmd)
app.command("check")(check_cmd)
app.command("workflows")(workflows_cmd)
app.command("workflow")(workflow_cmd)
app.command("verify")(verify_cmd)
app.command("retention")(retention_cmd)
app.add_typer(services_app, name="services")
app.add_typer(contracts_app, name="contracts")
app.add_typer(submit_app, name="submit")
app.add_typer(roles_app, name="roles")
app.add_typer(models_app, name="models")
app.add_typer(dlq_app, name="dlq")


def main() -> None:
    """Entry point: expected errors become one line and exit code 1, no traceback."""
    # Commands report failures themselves, as one line; nodes configure their own logs.
    configure_logging("WARNING", "json", libraries="CRITICAL")
    try:
        app()
    except (StampflowError, ContractError) as e:
        err.print(f"stampflow: {redact(str(e))}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
