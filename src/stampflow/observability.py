"""Structured JSON logs, Prometheus metrics, and the /healthz, /readyz and /metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@\s]*@", re.I)


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return _SECRET_IN_URL.sub(r"\g<scheme>\g<user>:***@", text)


def _redact_processor(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact(value)
    return event


class Throttle:
    """Lets one log line of a kind through per ``interval_s`` and counts the rest. Pure: the
    clock is injected. A dead broker made aiokafka and the runners repeat the same warning
    ten times a second (15,600 lines in five minutes); now each kind shows once per interval,
    carrying how many like it were held back."""

    def __init__(self, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._kinds: dict[tuple[str, ...], tuple[float, int]] = {}

    def admit(self, *kind: str) -> int | None:
        """None: hold this line back. A number: log it, noting that many held back before."""
        now = self._clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self.interval_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return None
        if len(self._kinds) > 10_000:  # kinds come from a fixed set of messages; stay bounded
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        return last[1] if last is not None else 0


THROTTLE = Throttle()
_THROTTLED_LEVELS = frozenset({"warning", "error", "critical", "exception"})


def _throttle_processor(
    _: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Only lines that ask for it (``throttle=True``): a dead letter or a refused request keeps
    # its own line, since each names a different input.
    if not event.pop("throttle", False) or method not in _THROTTLED_LEVELS:
        return event
    held = THROTTLE.admit("structlog", method, str(event.get("event", "")))
    if held is None:
        raise structlog.DropEvent
    if held:
        event["repeated"] = held
    return event


class _ThrottleFilter(logging.Filter):
    """The same for standard-library loggers (aiokafka, asyncpg): keyed by the unformatted
    message, so "Unable connect to node %s" is one kind whatever the node."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        held = THROTTLE.admit(record.name, str(record.levelno), str(record.msg))
        if held is None:
            return False
        if held:
            record.msg = f"{record.msg} (and {held} more like this since it was last logged)"
        return True


def configure_logging(level: str = "INFO", fmt: str = "json",
                      libraries: str = "WARNING") -> None:
    """JSON lines on stderr; the correlation id comes from bound context variables.

    Standard-library loggers (aiokafka, asyncpg) go through the same processors, at the
    ``libraries`` level.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ThrottleFilter())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelNamesMapping().get(libraries.upper(), logging.WARNING))
    structlog.configure(
        processors=[
            _throttle_processor,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


# --- health endpoint ----------------------------------------------------------------------------


class HealthServer:
    """A tiny HTTP server: /healthz (alive), /readyz (ready() is true), /metrics."""

    def __init__(self, ready: Callable[[], bool], host: str = "127.0.0.1", port: int = 0) -> None:
        self._ready = ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("health server not started: call start() first")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b""):
                pass
            if path == "/healthz":
                status, body, ctype = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = self._ready()
                status, body, ctype = (200, b"ready\n", "text/plain") if ok else (
                    503, b"not ready\n", "text/plain")
            elif path == "/metrics":
                status, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
