"""The health server's port: the documented default, a free one when several nodes share a
machine, and one clear error for a port set on purpose that is taken."""

from __future__ import annotations

import socket

import pytest

from stampflow.app import RunningNodes, start_health
from stampflow.errors import StampflowError
from stampflow.settings import Settings


def _taken() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_a_node_left_on_the_default_port_moves_when_it_is_taken() -> None:
    settings = Settings()  # no STAMPFLOW_HTTP_PORT: the default, 9464
    assert "http_port" not in settings.model_fields_set
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", settings.http_port))
        holder.listen()
    except OSError:
        pass  # something else holds it already: taken either way
    try:
        health = await start_health(RunningNodes(), settings)
        try:
            assert health.port not in (0, settings.http_port)
        finally:
            await health.stop()
    finally:
        holder.close()


async def test_a_port_set_on_purpose_that_is_taken_is_one_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with _taken() as other:
        port = other.getsockname()[1]
        monkeypatch.setenv("STAMPFLOW_HTTP_PORT", str(port))
        settings = Settings()
        assert "http_port" in settings.model_fields_set
        with pytest.raises(StampflowError, match=f"STAMPFLOW_HTTP_PORT={port}: cannot listen"):
            await start_health(RunningNodes(), settings)


def test_the_documented_defaults() -> None:
    settings = Settings()
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 9464)
