"""Running nodes in the foreground: `stampflow run`, `stampflow up` and `stampflow demo`, with
the SIGINT/SIGTERM handling that stops them."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from stampflow.cli.common import _print_summary, endpoints_for, err, run, settings
from stampflow.errors import StampflowError
from stampflow.observability import configure_logging, redact

EXIT_DEADLINE_S = 28.0


@contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``. Every step of a node's way out is bounded; as a last
    net, a process still alive ``EXIT_DEADLINE_S`` after the first signal exits anyway (its
    unacknowledged work is uncommitted and will be redone)."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            from stampflow.app import exit_deadline

            exit_deadline(EXIT_DEADLINE_S)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_cmd(node: Annotated[str, typer.Argument(
        help="orchestrator, inference (a GPU worker) or reducer")]) -> None:
    """Run one node against the configured services until SIGTERM or Ctrl-C.

    Scale out by running more of these processes: each kind shares one consumer group.
    """
    from stampflow.app import NODE_NAMES, run_nodes

    if node not in NODE_NAMES:
        raise StampflowError(f"{node}: no such node; choose one of {', '.join(NODE_NAMES)}")
    s = settings()
    configure_logging(s.log_level, s.log_format)
    endpoints = endpoints_for(s)

    async def main() -> None:
        stop = asyncio.Event()
        with _signals(stop):
            await run_nodes(s, endpoints, [node], stop)

    run(main())


def up_cmd() -> None:
    """Embedded services plus every node in one process, until Ctrl-C."""
    from stampflow.app import NODE_NAMES, run_nodes
    from stampflow.services import EmbeddedServices

    s = settings()
    configure_logging(s.log_level, s.log_format)
    with EmbeddedServices(s.state_dir) as services:
        endpoints = services.endpoints
        err.print(f"PostgreSQL {redact(endpoints.database_url)}  "
                  f"Kafka {endpoints.bootstrap_servers}", markup=False, highlight=False)

        async def main() -> None:
            stop = asyncio.Event()
            with _signals(stop):
                await run_nodes(s, endpoints, list(NODE_NAMES), stop, console=True)

        run(main())


def console_cmd() -> None:
    """Serve the operator console (STAMPFLOW_CONSOLE_HOST:_PORT, 127.0.0.1:8470) until Ctrl-C.

    Operators log in with their PostgreSQL role and password (`stampflow roles create`):
    row-level security decides what each sees.
    """
    from stampflow.console import start_console

    s = settings()
    configure_logging(s.log_level, s.log_format)
    endpoints = endpoints_for(s)

    async def main() -> None:
        stop = asyncio.Event()
        with _signals(stop):
            server = await start_console(s, endpoints)
            err.print(f"stampflow console on {server.url} (log in with a PostgreSQL role)",
                      markup=False, highlight=False)
            try:
                await stop.wait()
            finally:
                await server.stop()

    run(main())


def demo_cmd(
    per_namespace: Annotated[int, typer.Option(help="Stamp requests per namespace.")] = 25,
    generations: Annotated[int, typer.Option(help="Generations per namespace.")] = 2,
    serve: Annotated[bool, typer.Option(
        "--serve", help="Keep the console (and the nodes) running after the check, until "
        "Ctrl-C.")] = False,
) -> None:
    """The main job: stamp content and generate images in 4 namespaces, print the aggregates."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from stampflow.demo import run_demo

    s = settings()
    configure_logging("WARNING", "console")
    rows = run_demo(s, per_namespace=per_namespace, generations=generations, console=err,
                    serve=serve)
    _print_summary(rows, title="stampflow demo: per-namespace aggregates")
