"""Retries with exponential backoff behind a circuit breaker. The breaker reads an injected
clock, so its logic is tested without sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from contracts.nodes import CircuitBreakerPolicy, RetryPolicy

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through; failures are counted
    OPEN = "open"  # calls are refused until the reset timeout passes
    HALF_OPEN = "half_open"  # one trial call decides: success closes, failure reopens


class CircuitOpen(Exception):
    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"{name}: circuit open, next try in {retry_in_s:.1f}s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    def __init__(
        self, name: str, policy: CircuitBreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._remaining() <= 0:
            self._state = BreakerState.HALF_OPEN
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures so far (at least 1 once anything failed)."""
        return max(1, self._failures)

    def _remaining(self) -> float:
        return self._opened_at + self.policy.reset_timeout_ms / 1000.0 - self._clock()

    def check(self) -> None:
        """Raise :class:`CircuitOpen` when calls are refused right now."""
        if self.state is BreakerState.OPEN:
            raise CircuitOpen(self.name, self._remaining())

    def success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._failures >= self.policy.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    transient: tuple[type[BaseException], ...],
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run ``call`` until it succeeds, waiting between tries; give up after max_attempts.

    Only ``transient`` errors are retried. While the breaker is open, waiting replaces calling.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            breaker.check()
            result = await call()
        except CircuitOpen as err:
            if attempt >= policy.max_attempts:
                raise
            await asyncio.sleep(max(0.01, err.retry_in_s))
            continue
        except transient as err:
            breaker.failure()
            if attempt >= policy.max_attempts:
                raise
            wait = policy.backoff_ms(attempt) / 1000.0
            if on_retry is not None:
                on_retry(attempt, err, wait)
            await asyncio.sleep(wait)
            continue
        breaker.success()
        return result
