"""Retries with capped, jittered exponential backoff behind a circuit breaker.

- :class:`Backoff` is one caller's retry schedule: its own attempt count (never a count
  shared between callers), a cap per wait, and jitter, so replicas that failed together do
  not retry in lock-step.
- :class:`CircuitBreaker` counts consecutive failures; once open it refuses calls until the
  reset timeout passes, then lets exactly one trial call through (half-open).
- :func:`sleep_unless` waits, but returns early when a stop event is set.

The breaker and the backoff read an injected clock and random source, so their logic is
tested without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, TypeVar

from stampflow.contracts.nodes import CircuitBreakerPolicy, RetryPolicy

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through; failures are counted
    OPEN = "open"  # calls are refused until the reset timeout passes
    HALF_OPEN = "half_open"  # one trial call decides: success closes, failure reopens


class CircuitOpen(Exception):
    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"{name}: circuit open, next try in {retry_in_s:.1f}s")
        self.retry_in_s = retry_in_s


class Backoff:
    """The waits of one caller's retries: ``next_s()`` grows from the policy's first wait to
    its cap and draws each wait from ``[(1 - jitter) * w, w]``. Never raises, however many
    attempts (a shared failure count once overflowed ``multiplier ** attempt``)."""

    def __init__(self, policy: RetryPolicy, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.attempt = 0
        self._rng = rng

    def next_s(self) -> float:
        self.attempt += 1
        ceiling = self.policy.backoff_ms(self.attempt) / 1000.0
        return ceiling * (1.0 - self.policy.jitter * self._rng())

    def reset(self) -> None:
        self.attempt = 0


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
        self._trial_since: float | None = None  # when the half-open trial call was let through

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._remaining() <= 0:
            self._state = BreakerState.HALF_OPEN
            self._trial_since = None
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures so far."""
        return self._failures

    def _reset_s(self) -> float:
        return self.policy.reset_timeout_ms / 1000.0

    def _remaining(self) -> float:
        return self._opened_at + self._reset_s() - self._clock()

    def check(self) -> None:
        """Raise :class:`CircuitOpen` when this call is refused right now.

        Half-open, the first caller becomes the trial and every other caller is refused until
        the trial reports :meth:`success` or :meth:`failure`. A trial that never reports (its
        caller was cancelled) is replaced after one reset timeout.
        """
        state = self.state
        if state is BreakerState.OPEN:
            raise CircuitOpen(self.name, self._remaining())
        if state is BreakerState.HALF_OPEN:
            now = self._clock()
            if self._trial_since is not None and now - self._trial_since < self._reset_s():
                raise CircuitOpen(self.name, self._trial_since + self._reset_s() - now)
            self._trial_since = now

    def success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._trial_since = None

    def failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._failures >= self.policy.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_since = None


class Stopping(Exception):  # noqa: N818 - a signal, not an error
    """The node was told to stop before this work was acknowledged: it stays uncommitted and
    is done again by whoever owns its partition next."""


async def unless_stopped(stop: asyncio.Event, call: Callable[[], Awaitable[T]], *,
                         timeout: float | None = None, unwind_s: float = 1.0) -> T:
    """``call()``, within ``timeout``, abandoned as soon as ``stop`` is set (then
    :class:`Stopping` is raised): a service that hangs must not hold a stopping node. The
    abandoned call is cancelled and given ``unwind_s`` to unwind. ``call`` is a factory, so
    nothing is created that is never awaited when the stop came first."""
    if stop.is_set():
        raise Stopping

    async def run() -> T:
        return await asyncio.wait_for(call(), timeout)

    task = asyncio.ensure_future(run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=unwind_s)
        raise Stopping
    return task.result()


async def bounded(call: Awaitable[Any], what: str, seconds: float,
                  log: Callable[..., Any] | None = None) -> None:
    """Await ``call`` for at most ``seconds`` on a node's way out, and go on whatever happens:
    a timeout, an error, or a cancellation from inside a client library (aiokafka's consumer
    stop re-raises its fetcher's). Only a cancellation of the caller itself goes through."""
    try:
        await asyncio.wait_for(call, seconds)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        if log is not None:
            log(f"{what} was cancelled while stopping")
    except Exception as err:  # noqa: BLE001 - shutting down: note it and go on
        if log is not None:
            log(f"{what} did not finish cleanly while stopping",
                error=str(err).splitlines()[0] if str(err) else type(err).__name__)


async def sleep_unless(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``; return True at once if ``stop`` is (or becomes) set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if stop.is_set():
        return True
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    transient: tuple[type[BaseException], ...],
    breaker: CircuitBreaker | None = None,
    final: tuple[type[BaseException], ...] = (),
    stop: asyncio.Event | None = None,
    forever: bool = False,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """``call()`` until it succeeds, waiting a capped, jittered backoff of this call's own
    between tries. The one retry loop of the nodes (the effect node's calls, every record
    and write of the runners, dead letters, start-up).

    - Only ``transient`` errors are retried; anything else is raised at once. ``final`` errors
      (subclasses of a transient one that retrying cannot fix, e.g. a record too large for the
      broker) are raised at once too, and count as the service answering.
    - Behind ``breaker``: while it is open, waiting replaces calling; a transient error counts
      as a failure, a success or a final error as a success.
    - ``forever``: never give up (a node's records must not be dropped); otherwise give up
      after ``policy.max_attempts`` tries and raise the last error.
    - ``stop``: every wait ends when it is set, and :class:`Stopping` is raised: the work
      stays undone, to be redone by whoever owns it next.
    - ``on_retry(attempt, error, wait_s)`` is told of each transient failure before its wait.
    """
    backoff = Backoff(policy)
    attempt = 0
    while True:
        attempt += 1
        try:
            if breaker is not None:
                breaker.check()
            result = await call()
        except CircuitOpen as err:
            if not forever and attempt >= policy.max_attempts:
                raise
            wait = max(0.01, err.retry_in_s + backoff.next_s() * 0.1)
        except final:
            if breaker is not None:
                breaker.success()
            raise
        except transient as err:
            if breaker is not None:
                breaker.failure()
            if not forever and attempt >= policy.max_attempts:
                raise
            wait = backoff.next_s()
            if on_retry is not None:
                on_retry(attempt, err, wait)
        else:
            if breaker is not None:
                breaker.success()
            return result
        if await sleep_unless(stop, wait):
            raise Stopping
