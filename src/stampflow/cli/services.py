"""`stampflow services`: start and stop the embedded PostgreSQL server and Kafka-protocol
broker in the background."""

from __future__ import annotations

import typer

from stampflow.cli.common import out, settings
from stampflow.observability import redact

services_app = typer.Typer(help="The embedded PostgreSQL server and Kafka-protocol broker.",
                           no_args_is_help=True)


@services_app.command("up")
def services_up() -> None:
    """Start the embedded services in the background and print their addresses.

    The password is not printed: other stampflow commands read the URL from services.json in
    the state directory (mode 0600).
    """
    from stampflow.services import STATE_FILE, EmbeddedServices

    s = settings()
    endpoints = EmbeddedServices.start_detached(s.state_dir)
    out.print(f"PostgreSQL  {redact(endpoints.database_url)}", markup=False, highlight=False)
    out.print(f"Kafka       {endpoints.bootstrap_servers}", markup=False, highlight=False)
    out.print(f"credentials {s.state_dir.resolve() / STATE_FILE} (readable by its owner only)",
              markup=False, highlight=False)


@services_app.command("down")
def services_down() -> None:
    """Stop the embedded services started by `services up`."""
    from stampflow.services import EmbeddedServices

    stopped = EmbeddedServices.stop_from_state(settings().state_dir)
    out.print("stopped" if stopped else "no embedded services were running")
