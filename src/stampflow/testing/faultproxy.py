"""A TCP fault proxy for the tests: put it between a client and a service, then make the
service look refused, hung, slow or cut off, for as long as a test likes, without root.

The vocabulary is Toxiproxy's::

    proxy = FaultProxy(upstream=("127.0.0.1", 5432))   # listens on proxy.listen_port
    proxy.set(Fault.DOWN)                  # refused: nothing listens, connects get ECONNREFUSED,
                                           #   open connections are reset
    proxy.set(Fault.HANG)                  # "timeout": connects succeed, nothing is forwarded,
                                           #   open connections stop forwarding (and resume on OK)
    proxy.set(Fault.LATENCY, ms=200)       # every chunk held 200 ms, in both directions
    proxy.set(Fault.RESET)                 # "reset_peer": open connections cut with a TCP RST
                                           #   (SO_LINGER 0); new ones are reset on accept
    proxy.set(Fault.OK)                    # forward everything again
    with proxy.fault(Fault.DOWN, seconds=180): ...   # OK again on leaving, or after 180 s
    proxy.flap(period_s=4, duration_s=60)  # DOWN half of every 4 s for a minute, then OK

The proxy runs in a child process of its own (``mode="process"``, the default) with its own
event loop, so a test whose loop is blocked, or a test process that is SIGSTOPped, never stalls
the traffic, and ``seconds=`` outages end on time regardless. ``mode="thread"`` runs the same
code on a thread of the calling process (cheaper to start; shares the GIL). Only the standard
library is imported here: the child runs this file as a script.

DOWN keeps the port: while down, the proxy holds it with a socket that is bound but does not
listen (connects are refused by the kernel; nobody else can take the port), and the port is
picked below the kernel's ephemeral range, so no outgoing connection is handed it meanwhile.

Why one file past 400 lines: the child process runs this very file as a script with the
standard library alone (no package import, so it starts in milliseconds and cannot be broken by
what it proxies), so the proxy, its control protocol and both modes must live together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # per direction: what a slow or hung side may hold before backpressure


class Fault(enum.StrEnum):
    """What the proxy does to the traffic (Toxiproxy's names as values)."""

    OK = "ok"
    DOWN = "down"
    HANG = "timeout"
    TIMEOUT = "timeout"  # alias of HANG
    LATENCY = "latency"
    RESET = "reset_peer"


@dataclass(frozen=True)
class ProxyState:
    """A snapshot of the proxy: its fault, whether a timed revert or flap is pending, and what
    it has seen (connections accepted and open, resets sent, bytes forwarded each way)."""

    fault: Fault
    latency_ms: float
    scheduled: bool
    accepted: int
    open: int
    resets: int
    bytes_up: int
    bytes_down: int
    flips: int


# --- the proxy itself (runs in the child process, or on a thread) --------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind_port_outside_ephemeral_range() -> socket.socket:
    """A socket bound (not listening) on a free port below the ephemeral range."""
    lo, _ = _ephemeral_range()
    rng = random.Random()
    if lo > 12_000:
        for _ in range(200):
            with contextlib.suppress(OSError):
                return _bind(rng.randrange(10_000, lo))
    return _bind(0)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST: SO_LINGER on, timeout 0, then abort."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.was_reset = False

    def reset(self) -> None:
        self.was_reset = True
        _rst(self.client)
        _rst(self.upstream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class _Proxy:
    def __init__(self, upstream: tuple[str, int], listen_port: int = 0) -> None:
        self.upstream = upstream
        self._held: socket.socket | None = (_bind(listen_port) if listen_port
                                            else _bind_port_outside_ephemeral_range())
        self.port: int = self._held.getsockname()[1]
        self.fault = Fault.OK
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._schedule: asyncio.Task[None] | None = None
        self.accepted = self.resets = self.bytes_up = self.bytes_down = self.flips = 0

    # --- listening ---

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock, self._held = self._held or _bind(self.port), None
        self._server = await asyncio.start_server(self._accept, sock=sock, backlog=256)

    def _unlisten(self) -> None:
        if self._server is None:
            return
        self._server.close()  # closes the listening socket now (3.11: nothing to wait for)
        self._server = None
        for attempt in range(50):  # hold the port again at once: bound, not listening
            try:
                self._held = _bind(self.port)
                return
            except OSError:
                time.sleep(0.01 * (attempt + 1))
        raise OSError(f"fault proxy: port {self.port} was taken while down")

    async def close(self) -> None:
        self._cancel_schedule()
        self._unlisten()
        if self._held is not None:
            self._held.close()
            self._held = None
        self._reset_all(count=False)

    # --- connections ---

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(writer)
        if self.fault is Fault.RESET:
            self.resets += 1
            _rst(writer)
            return
        self._conns.add(conn)
        try:
            await self._flowing.wait()  # HANG: accepted, never forwarded (until OK)
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                _rst(writer)  # the service itself refuses: so does the proxy's connection
                return
            conn.upstream = up_writer
            pipes = (asyncio.create_task(self._pipe(reader, up_writer, "up")),
                     asyncio.create_task(self._pipe(up_reader, writer, "down")))
            try:
                await asyncio.gather(*pipes)
            finally:
                for pipe in pipes:
                    pipe.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass  # a side went away: so does the other
        except asyncio.CancelledError:
            if not conn.was_reset:
                raise
            # Reset by a fault: end normally (asyncio's stream callback logs a cancelled
            # handler task as an error).
        finally:
            self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Forward one direction: a reader fills a bounded queue stamped with each chunk's due
        time (latency is pipelined, not a throughput cap); a writer empties it."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                delay = self.latency_s
                if self.jitter_s:
                    delay = max(0.0, delay + random.uniform(-self.jitter_s, self.jitter_s))
                await queue.put((time.monotonic() + delay, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

        tasks = (asyncio.create_task(read()), asyncio.create_task(write()))
        try:
            await asyncio.gather(*tasks)  # the first error ends both
        finally:
            for task in tasks:
                task.cancel()

    def _reset_all(self, count: bool = True) -> None:
        conns, self._conns = self._conns, set()
        for conn in conns:
            if count:
                self.resets += 1
            conn.reset()

    # --- faults ---

    async def set(self, fault: Fault, ms: float = 0.0, jitter_ms: float = 0.0,
                  seconds: float | None = None, *, scheduled: bool = False) -> None:
        if not scheduled:
            self._cancel_schedule()
        self.fault = fault
        self.latency_s = ms / 1000.0 if fault is Fault.LATENCY else 0.0
        self.jitter_s = jitter_ms / 1000.0 if fault is Fault.LATENCY else 0.0
        if fault is Fault.DOWN:
            self._unlisten()  # first: nothing new slips in
            self._reset_all()
        else:
            await self._listen()
        if fault is Fault.RESET:
            self._reset_all()
        if fault is Fault.HANG:
            self._flowing.clear()
        else:
            self._flowing.set()
        if seconds is not None and not scheduled:
            self._schedule = asyncio.create_task(self._revert_after(seconds))

    async def _revert_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.set(Fault.OK, scheduled=True)
        self._schedule = None

    async def flap(self, period_s: float, duration_s: float, fault: Fault, duty: float,
                   ms: float) -> None:
        self._cancel_schedule()
        self._schedule = asyncio.create_task(self._flap(period_s, duration_s, fault, duty, ms))

    async def _flap(self, period_s: float, duration_s: float, fault: Fault, duty: float,
                    ms: float) -> None:
        end = time.monotonic() + duration_s
        try:
            while time.monotonic() < end:
                await self.set(fault, ms=ms, scheduled=True)
                self.flips += 1
                await asyncio.sleep(max(0.0, min(period_s * duty, end - time.monotonic())))
                await self.set(Fault.OK, scheduled=True)
                await asyncio.sleep(max(0.0, min(period_s * (1 - duty), end - time.monotonic())))
        finally:
            if self.fault is not Fault.OK:
                await self.set(Fault.OK, scheduled=True)
            self._schedule = None

    def _cancel_schedule(self) -> None:
        task, self._schedule = self._schedule, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def state(self) -> dict[str, Any]:
        return {"fault": self.fault.value, "latency_ms": self.latency_s * 1000.0,
                "scheduled": self._schedule is not None, "accepted": self.accepted,
                "open": len(self._conns), "resets": self.resets, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "flips": self.flips}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """One control command (the child's stdin protocol, and the thread mode's calls)."""
        op = cmd.get("op")
        if op == "set":
            await self.set(Fault(cmd["fault"]), float(cmd.get("ms", 0)),
                           float(cmd.get("jitter_ms", 0)), cmd.get("seconds"))
        elif op == "flap":
            await self.flap(float(cmd["period_s"]), float(cmd["duration_s"]),
                            Fault(cmd.get("fault", "down")), float(cmd.get("duty", 0.5)),
                            float(cmd.get("ms", 0)))
        elif op == "close":
            await self.close()
        elif op != "state":
            raise ValueError(f"unknown op {op!r}")
        return self.state()


# --- the child process ------------------------------------------------------------------------


def _serve(upstream: tuple[str, int], listen_port: int) -> None:
    """The child: start the proxy, print its port, then obey JSON lines on stdin; exit when
    stdin closes (the test process ended, however it ended)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proxy = _Proxy(upstream, listen_port)
        await proxy.start()
        out = sys.stdout
        out.write(json.dumps({"port": proxy.port}) + "\n")
        out.flush()
        done = asyncio.Event()

        def read_commands() -> None:
            for line in sys.stdin:
                if not line.strip():
                    continue
                try:
                    cmd = json.loads(line)
                    reply = {"ok": True, **asyncio.run_coroutine_threadsafe(
                        proxy.handle(cmd), loop).result()}
                except Exception as err:  # noqa: BLE001 - told to the caller
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                out.write(json.dumps(reply) + "\n")
                out.flush()
                if reply.get("ok") and cmd.get("op") == "close":
                    break
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=read_commands, daemon=True).start()
        await done.wait()
        await proxy.close()

    asyncio.run(main())


# --- the handle tests use ---------------------------------------------------------------------


class FaultProxy:
    """A fault proxy in front of ``upstream``; clients connect to ``listen_port`` (127.0.0.1).

    Control calls are synchronous and take about a millisecond, so they are fine inside async
    tests too. ``seconds=`` and ``flap`` run on the proxy's own clock.
    """

    def __init__(self, upstream: tuple[str, int], *, listen_port: int = 0, name: str = "",
                 mode: Literal["process", "thread"] = "process") -> None:
        self.upstream = (upstream[0], int(upstream[1]))
        self.name = name or f"proxy->{upstream[0]}:{upstream[1]}"
        self.mode = mode
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proxy: _Proxy | None = None
        if mode == "process":
            self.listen_port = self._start_process(listen_port)
        elif mode == "thread":
            self.listen_port = self._start_thread(listen_port)
        else:
            raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")

    def __repr__(self) -> str:
        return f"FaultProxy({self.name}, 127.0.0.1:{self.listen_port}, {self.mode})"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    # --- starting ---

    def _start_process(self, listen_port: int) -> int:
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream",
             f"{self.upstream[0]}:{self.upstream[1]}", "--listen-port", str(listen_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True)  # a ^C or a signal to the test's group leaves it be
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if not first:
            code = self._proc.wait(5)
            raise RuntimeError(f"{self.name}: the proxy process exited at start ({code})")
        return int(json.loads(first)["port"])

    def _start_thread(self, listen_port: int) -> int:
        ready: list[Any] = []
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._proxy = _Proxy(self.upstream, listen_port)
                loop.run_until_complete(self._proxy.start())
                ready.append(self._proxy.port)
            except BaseException as err:  # noqa: BLE001 - raised in the caller
                ready.append(err)
                started.set()
                return
            started.set()
            loop.run_forever()
            # Connections still open: cancelled and awaited, so none is destroyed pending.
            loop.run_until_complete(_cancel_all(asyncio.all_tasks(loop)))
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait(10)
        if not ready or isinstance(ready[0], BaseException):
            raise RuntimeError(f"{self.name}: the proxy thread did not start: {ready}")
        return int(ready[0])

    # --- control ---

    def _call(self, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with self._lock:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: the proxy process has exited "
                                       f"({self._proc.returncode})")
                assert self._proc.stdin is not None and self._proc.stdout is not None
                self._proc.stdin.write(json.dumps(cmd) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.name}: the proxy process went away")
                reply: dict[str, Any] = json.loads(line)
                if not reply.pop("ok"):
                    raise RuntimeError(f"{self.name}: {reply.get('error')}")
                return reply
            if self._loop is None or self._proxy is None or self._loop.is_closed():
                raise RuntimeError(f"{self.name} is closed")
            return asyncio.run_coroutine_threadsafe(self._proxy.handle(cmd),
                                                    self._loop).result(timeout)

    def set(self, fault: Fault | str, *, ms: float = 0.0, jitter_ms: float = 0.0,
            seconds: float | None = None) -> None:
        """Switch to ``fault`` now (ending any timed fault or flap). ``ms``/``jitter_ms``: the
        latency per chunk, for LATENCY. ``seconds``: the proxy itself returns to OK then."""
        fault = Fault(fault)
        if fault is Fault.LATENCY and ms <= 0:
            raise ValueError("Fault.LATENCY needs ms > 0")
        self._call({"op": "set", "fault": fault.value, "ms": ms, "jitter_ms": jitter_ms,
                    "seconds": seconds})

    def ok(self) -> None:
        self.set(Fault.OK)

    @contextlib.contextmanager
    def fault(self, fault: Fault | str, *, seconds: float | None = None, ms: float = 0.0,
              jitter_ms: float = 0.0) -> Iterator[FaultProxy]:
        """``fault`` for the block (OK again on leaving it), and at most ``seconds``."""
        self.set(fault, ms=ms, jitter_ms=jitter_ms, seconds=seconds)
        try:
            yield self
        finally:
            self.set(Fault.OK)

    def flap(self, period_s: float, duration_s: float, *, fault: Fault | str = Fault.DOWN,
             duty: float = 0.5, ms: float = 0.0) -> None:
        """For ``duration_s``: ``fault`` for ``duty`` of every ``period_s``, OK for the rest;
        OK afterwards. Returns at once; the proxy keeps the time."""
        if period_s <= 0 or duration_s < 0 or not 0 < duty < 1:
            raise ValueError("flap needs period_s > 0, duration_s >= 0 and 0 < duty < 1")
        self._call({"op": "flap", "period_s": period_s, "duration_s": duration_s,
                    "fault": Fault(fault).value, "duty": duty, "ms": ms})

    @property
    def state(self) -> ProxyState:
        s = self._call({"op": "state"})
        return ProxyState(fault=Fault(s["fault"]), latency_ms=s["latency_ms"],
                          scheduled=s["scheduled"], accepted=s["accepted"], open=s["open"],
                          resets=s["resets"], bytes_up=s["bytes_up"],
                          bytes_down=s["bytes_down"], flips=s["flips"])

    def wait_ok(self, timeout: float) -> bool:
        """Block until the fault is OK with nothing scheduled (a timed fault or flap ended)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state
            if s.fault is Fault.OK and not s.scheduled:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # --- ending ---

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    assert proc.stdin is not None
                    proc.stdin.close()  # EOF: the child closes its sockets and exits
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if pipe is not None:
                        pipe.close()
        loop, self._loop = self._loop, None
        if loop is not None and self._proxy is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._proxy.close(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a TCP fault proxy controlled by JSON lines on stdin")
    p.add_argument("--upstream", type=_address, required=True)
    p.add_argument("--listen-port", type=int, default=0)
    args = p.parse_args()
    _serve(args.upstream, args.listen_port)
