"""Errors the CLI reports as one line, without a traceback."""

from __future__ import annotations


class StampflowError(Exception):
    """An expected failure: ``str()`` is one line naming the thing and the reason."""


class ServiceUnavailable(StampflowError):
    """PostgreSQL or the broker cannot be reached. Names which one, and at what address."""

    def __init__(self, service: str, address: str, reason: str) -> None:
        super().__init__(f"{service} at {address} is unreachable: {reason}")
        self.service = service
        self.address = address
        self.reason = reason
