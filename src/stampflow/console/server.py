"""Serving the console: uvicorn in the running event loop, beside the nodes or alone.

The process's own signal handling stays in charge (`stampflow console`, `stampflow up`): the
server is stopped by :meth:`ConsoleServer.stop`, never by uvicorn's signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from stampflow.console.config import ConsoleConfig
from stampflow.console.web import create_app
from stampflow.errors import StampflowError
from stampflow.services import Endpoints
from stampflow.settings import Settings

log = structlog.get_logger("stampflow.console")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller's signal handlers stop us


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ConsoleServer:
    """The console on ``host:port`` (0: any free port; :attr:`port` says which)."""

    def __init__(self, config: ConsoleConfig, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.requested_port = port
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, *, fallback: bool = False) -> None:
        """Listen; with ``fallback``, a taken port gives way to any free one (logged)."""
        try:
            sock = _bind(self.host, self.requested_port)
        except OSError as err:
            if not fallback:
                raise StampflowError(
                    f"STAMPFLOW_CONSOLE_PORT={self.requested_port}: cannot listen on "
                    f"{self.host}:{self.requested_port}: {err.strerror or err}") from None
            sock = _bind(self.host, 0)
            log.warning("the console's default port is taken; listening on another",
                        default=self.requested_port, port=sock.getsockname()[1])
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(create_app(self.config), log_config=None, access_log=False,
                                lifespan="on", server_header=False, proxy_headers=False)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="console")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise StampflowError(f"the console did not start on {self.url}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 5.0) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()


async def start_console(settings: Settings, endpoints: Endpoints) -> ConsoleServer:
    """The console of these services on ``console_host:console_port``, started. A port left
    at its default that is taken gives way to a free one; a port set on purpose must be
    free."""
    config = ConsoleConfig.from_settings(settings, endpoints.database_url,
                                         endpoints.bootstrap_servers, endpoints.kafka)
    server = ConsoleServer(config, settings.console_host, settings.console_port)
    await server.start(fallback="console_port" not in settings.model_fields_set)
    log.info("console listening", url=server.url)
    return server
