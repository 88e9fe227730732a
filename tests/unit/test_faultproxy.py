"""The fault proxy against a tiny echo server: each fault does what its name says, and the
proxy comes back to forwarding on OK."""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from stampflow.testing.faultproxy import Fault, FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, int]]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(params=["process", "thread"])
def proxy(request: pytest.FixtureRequest, echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=echo, mode=request.param) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=timeout)


def _connect_and_roundtrip(proxy: FaultProxy) -> bytes:
    fresh = _connect(proxy)
    time.sleep(0.05)
    try:
        return _roundtrip(fresh)
    finally:
        fresh.close()


def _roundtrip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


def _echoes(proxy: FaultProxy) -> bool:
    with _connect(proxy) as s:
        return _roundtrip(s) == b"ping"


def test_ok_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several chunks, in order
    with _connect(proxy) as s:
        assert _roundtrip(s, payload) == payload
    state = proxy.state
    assert state.fault is Fault.OK
    assert state.accepted >= 1
    assert state.bytes_up >= len(payload) and state.bytes_down >= len(payload)
    assert proxy.listen_port < 32768 or proxy.listen_port > 60999  # outside the usual range


def test_down_refuses_connects_and_resets_open_connections(proxy: FaultProxy) -> None:
    held = _connect(proxy)
    assert _roundtrip(held) == b"ping"
    proxy.set(Fault.DOWN)
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    with pytest.raises((ConnectionResetError, ConnectionError)):
        _roundtrip(held)
    held.close()
    assert proxy.state.resets >= 1
    proxy.set(Fault.OK)
    assert _echoes(proxy)  # the same port listens again


def test_hang_accepts_but_never_answers_then_resumes(proxy: FaultProxy) -> None:
    held = _connect(proxy)
    assert _roundtrip(held) == b"ping"
    proxy.set(Fault.HANG)
    fresh = _connect(proxy, timeout=0.5)  # the connect itself succeeds
    for sock in (fresh, held):
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            _roundtrip(sock)
    proxy.set(Fault.OK)
    # What was sent during the hang was held, not dropped: it arrives now.
    for sock in (fresh, held):
        sock.settimeout(3)
        assert sock.recv(100) == b"ping"
        assert _roundtrip(sock, b"again") == b"again"
        sock.close()
    assert Fault("timeout") is Fault.HANG is Fault.TIMEOUT


def test_latency_delays_every_chunk(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        t0 = time.monotonic()
        _roundtrip(s)
        base = time.monotonic() - t0
        proxy.set(Fault.LATENCY, ms=150)
        t0 = time.monotonic()
        _roundtrip(s)
        slow = time.monotonic() - t0
        proxy.set(Fault.OK)
        t0 = time.monotonic()
        _roundtrip(s)
        after = time.monotonic() - t0
    assert slow >= 0.29, f"{slow:.3f}s: 150 ms each way should add 300 ms"
    assert slow < 2.0
    assert base < 0.2 and after < 0.2
    with pytest.raises(ValueError, match="ms"):
        proxy.set(Fault.LATENCY)


def test_latency_is_pipelined_not_a_throughput_cap(proxy: FaultProxy) -> None:
    proxy.set(Fault.LATENCY, ms=100)
    with _connect(proxy, timeout=5) as s:
        t0 = time.monotonic()
        for i in range(20):  # 20 sends back to back: ~0.2 s in all, not 20 x 0.2 s
            s.sendall(b"%02d" % i)
        got = b""
        while len(got) < 40:
            got += s.recv(100)
        took = time.monotonic() - t0
    assert got == b"".join(b"%02d" % i for i in range(20))
    assert 0.19 <= took < 1.5


def test_reset_peer_cuts_open_connections_with_rst(proxy: FaultProxy) -> None:
    held = _connect(proxy)
    assert _roundtrip(held) == b"ping"
    proxy.set(Fault.RESET)
    time.sleep(0.05)
    with pytest.raises(ConnectionResetError):
        _roundtrip(held)
    held.close()
    # A new connection is accepted, then reset at once: on a busy machine the reset can
    # already be there when the connect returns.
    with pytest.raises(ConnectionResetError):
        _connect_and_roundtrip(proxy)
    proxy.set(Fault.OK)
    assert _echoes(proxy)


def test_timed_fault_ends_by_itself_and_context_restores_ok(proxy: FaultProxy) -> None:
    proxy.set(Fault.DOWN, seconds=0.4)
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    assert proxy.wait_ok(5)
    assert _echoes(proxy)
    with proxy.fault(Fault.DOWN, seconds=30):
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
    assert proxy.state.fault is Fault.OK and not proxy.state.scheduled
    assert _echoes(proxy)


def test_flap_alternates_then_ends_ok(proxy: FaultProxy) -> None:
    proxy.flap(period_s=0.4, duration_s=1.6)
    seen = set()
    deadline = time.monotonic() + 1.4
    while time.monotonic() < deadline:
        try:
            with _connect(proxy, timeout=0.5):
                seen.add("up")
        except ConnectionRefusedError:
            seen.add("down")
        time.sleep(0.03)
    assert seen == {"up", "down"}
    assert proxy.wait_ok(5)
    assert proxy.state.flips >= 3
    assert _echoes(proxy)
    with pytest.raises(ValueError, match="duty"):
        proxy.flap(period_s=1, duration_s=1, duty=1.0)


def test_upstream_refusing_resets_the_client(echo: tuple[str, int]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with FaultProxy(upstream=("127.0.0.1", dead), mode="thread") as p:
        # The reset may come before the connect returns on a busy machine, or after it.
        with pytest.raises(ConnectionError):
            _connect_and_roundtrip(p)


def test_process_proxy_outlives_a_stalled_caller_and_closes_cleanly(
    echo: tuple[str, int],
) -> None:
    p = FaultProxy(upstream=echo)
    try:
        p.set(Fault.DOWN, seconds=0.3)
        time.sleep(0.6)  # nothing in this process asks it to come back
        assert _echoes(p)
    finally:
        p.close()
    with pytest.raises(ConnectionRefusedError) as err:
        _connect(p)
    assert err.value.errno == errno.ECONNREFUSED
    with pytest.raises(RuntimeError, match="exited|closed|went away"):
        p.set(Fault.OK)
