"""Offset tracking and the circuit breaker: pure logic, no Kafka."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stampflow.contracts.nodes import CircuitBreakerPolicy, RetryPolicy
from stampflow.nodes.offsets import OffsetTracker
from stampflow.nodes.resilience import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Stopping,
    retry,
    unless_stopped,
)
from stampflow.observability import Throttle

P = ("t", 0)


def test_commit_waits_for_the_lowest_unfinished_offset() -> None:
    tr = OffsetTracker()
    for off in (10, 11, 12):
        tr.started(P, off)
    tr.finished(P, 12)
    tr.finished(P, 11)
    assert tr.committable() == {P: 10}
    tr.finished(P, 10)
    assert tr.committable() == {P: 13}


def test_offsets_must_increase() -> None:
    tr = OffsetTracker()
    tr.started(P, 5)
    with pytest.raises(ValueError, match="started after"):
        tr.started(P, 5)


@given(st.integers(1, 60), st.randoms())
def test_committable_never_passes_an_unfinished_record(n: int, rnd: random.Random) -> None:
    tr = OffsetTracker()
    offsets = sorted(rnd.sample(range(1000), n))
    for off in offsets:
        tr.started(P, off)
    order = offsets[:]
    rnd.shuffle(order)
    done: set[int] = set()
    for off in order:
        tr.finished(P, off)
        done.add(off)
        commit = tr.committable()[P]
        assert all(o in done for o in offsets if o < commit)
        unfinished = [o for o in offsets if o not in done]
        assert commit == (min(unfinished) if unfinished else offsets[-1] + 1)


def test_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker("db", CircuitBreakerPolicy(failure_threshold=2, reset_timeout_ms=1000),
                       clock=lambda: now[0])
    b.failure()
    assert b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match="db: circuit open"):
        b.check()
    now[0] = 1.5
    assert b.state is BreakerState.HALF_OPEN
    b.failure()  # the trial failed: open again
    assert b.state is BreakerState.OPEN
    now[0] = 3.0
    b.check()
    b.success()
    assert b.state is BreakerState.CLOSED


def test_backoff_grows_and_caps() -> None:
    p = RetryPolicy(initial_backoff_ms=100, max_backoff_ms=1000, multiplier=2)
    assert [p.backoff_ms(i) for i in (1, 2, 3, 4, 5)] == [100, 200, 400, 800, 1000]


async def test_retry_recovers_from_transient_errors() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    breaker = CircuitBreaker("x", CircuitBreakerPolicy(failure_threshold=10))
    policy = RetryPolicy(max_attempts=5, initial_backoff_ms=1, max_backoff_ms=2)
    assert await retry(flaky, policy=policy, breaker=breaker, transient=(ConnectionError,)) == "ok"
    assert len(calls) == 3


async def test_retry_gives_up_and_does_not_retry_other_errors() -> None:
    async def broken() -> None:
        raise ConnectionError("down")

    async def wrong() -> None:
        raise ValueError("bug")

    breaker = CircuitBreaker("x", CircuitBreakerPolicy(failure_threshold=100))
    policy = RetryPolicy(max_attempts=2, initial_backoff_ms=1, max_backoff_ms=1)
    with pytest.raises(ConnectionError):
        await retry(broken, policy=policy, breaker=breaker, transient=(ConnectionError,))
    with pytest.raises(ValueError, match="bug"):
        await retry(wrong, policy=policy, breaker=breaker, transient=(ConnectionError,))


async def test_retry_forever_outlasts_max_attempts_and_reports_each_failure() -> None:
    """The runners' records are never dropped: ``forever`` ignores max_attempts."""
    calls: list[int] = []
    seen: list[tuple[int, str]] = []

    async def down_for_a_while() -> str:
        calls.append(1)
        if len(calls) <= 7:
            raise ConnectionError(f"down {len(calls)}")
        return "up"

    policy = RetryPolicy(max_attempts=2, initial_backoff_ms=1, max_backoff_ms=1)
    result = await retry(down_for_a_while, policy=policy, transient=(ConnectionError,),
                         forever=True, on_retry=lambda n, err, wait: seen.append((n, str(err))))
    assert result == "up" and len(calls) == 8
    assert seen == [(n, f"down {n}") for n in range(1, 8)]


async def test_retry_raises_final_errors_at_once_and_counts_them_as_answers() -> None:
    """A record too large for the broker is final: retrying cannot help, and the broker did
    answer, so the breaker is not tripped by it."""

    class Transient(Exception):
        pass

    class Final(Transient):
        pass

    calls: list[int] = []

    async def too_large() -> None:
        calls.append(1)
        raise Final("too large")

    breaker = CircuitBreaker("x", CircuitBreakerPolicy(failure_threshold=1))
    policy = RetryPolicy(max_attempts=5, initial_backoff_ms=1, max_backoff_ms=1)
    with pytest.raises(Final):
        await retry(too_large, policy=policy, transient=(Transient,), final=(Final,),
                    breaker=breaker, forever=True)
    assert len(calls) == 1
    assert breaker.state is BreakerState.CLOSED


async def test_retry_waiting_ends_with_stopping_when_told_to_stop() -> None:
    stop = asyncio.Event()

    async def down() -> None:
        stop.set()  # the node is told to stop while this call fails
        raise ConnectionError("down")

    policy = RetryPolicy(max_attempts=5, initial_backoff_ms=60_000, max_backoff_ms=60_000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(Stopping):
        await retry(down, policy=policy, transient=(ConnectionError,), stop=stop, forever=True)
    assert loop.time() - t0 < 1.0  # not the minute's backoff


# --- per-record backoff, half-open, jitter (issue 11) ----------------------------------------


def test_backoff_never_overflows_however_many_attempts() -> None:
    """The shared failure count passed 1,024 in a two-minute refusing outage and
    ``2.0 ** 1024`` raised OverflowError inside the retry handler, losing the record."""
    p = RetryPolicy(initial_backoff_ms=100, max_backoff_ms=5000, multiplier=2.0)
    assert p.backoff_ms(1025) == 5000
    assert p.backoff_ms(10**9) == 5000
    worst = RetryPolicy(initial_backoff_ms=10**6, max_backoff_ms=10**7, multiplier=10.0)
    assert worst.backoff_ms(10**6) == 10**7
    b = Backoff(p)
    waits = [b.next_s() for _ in range(5000)]
    assert max(waits) <= 5.0 and b.attempt == 5000


def test_backoff_is_jittered_within_its_bounds() -> None:
    p = RetryPolicy(initial_backoff_ms=1000, max_backoff_ms=1000, jitter=0.5)
    rng = random.Random(7)
    waits = [Backoff(p, rng=rng.random).next_s() for _ in range(200)]
    assert all(0.5 <= w <= 1.0 for w in waits)
    assert len({round(w, 3) for w in waits}) > 50  # replicas do not retry in lock-step
    assert Backoff(p.model_copy(update={"jitter": 0.0})).next_s() == 1.0


def test_half_open_lets_exactly_one_trial_through() -> None:
    now = [0.0]
    b = CircuitBreaker("broker", CircuitBreakerPolicy(failure_threshold=1, reset_timeout_ms=1000),
                       clock=lambda: now[0])
    b.failure()
    now[0] = 1.5
    b.check()  # the trial
    for _ in range(50):  # everyone else waits for its verdict
        with pytest.raises(CircuitOpen):
            b.check()
    b.success()
    b.check()
    b.check()


def test_a_trial_that_never_reports_is_replaced_after_one_reset_timeout() -> None:
    now = [0.0]
    b = CircuitBreaker("db", CircuitBreakerPolicy(failure_threshold=1, reset_timeout_ms=1000),
                       clock=lambda: now[0])
    b.failure()
    now[0] = 1.0
    b.check()  # the trial's caller is cancelled and never reports
    now[0] = 1.5
    with pytest.raises(CircuitOpen):
        b.check()
    now[0] = 2.1
    b.check()  # a new trial


def test_throttle_lets_one_line_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    t = Throttle(interval_s=10.0, clock=lambda: now[0])
    assert t.admit("aiokafka", "Unable connect to node %s") == 0
    held = [t.admit("aiokafka", "Unable connect to node %s") for _ in range(1000)]
    assert held == [None] * 1000
    assert t.admit("other") == 0  # another kind is not held back
    now[0] = 10.5
    assert t.admit("aiokafka", "Unable connect to node %s") == 1000


async def test_unless_stopped_abandons_a_hanging_call_and_creates_nothing_once_stopped() -> None:
    stop = asyncio.Event()
    made: list[int] = []

    async def hang() -> None:
        made.append(1)
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(unless_stopped(stop, hang, unwind_s=0.5))
    await asyncio.sleep(0.05)
    stop.set()
    with pytest.raises(Stopping):
        await asyncio.wait_for(task, 2)
    # Stopped already: the call is never made (no coroutine left un-awaited).
    with pytest.raises(Stopping):
        await unless_stopped(stop, hang)
    assert made == [1]
    with pytest.raises(TimeoutError):
        await unless_stopped(asyncio.Event(), hang, timeout=0.05)


# --- the broker-side fetch wait (nodes.consuming.FetchWaitPolicy) -----------------------------


def test_fetch_wait_doubles_only_when_starved_for_two_whole_waits() -> None:
    from stampflow.nodes.consuming import FetchWaitPolicy

    p = FetchWaitPolicy(50, ceiling_ms=2000, now=0.0)
    assert p.after_poll(0, behind=True, now=0.05) == 50  # one poll timed out: not yet
    assert p.after_poll(0, behind=True, now=0.10) == 100  # two whole waits without records
    assert p.after_poll(0, behind=True, now=0.15) == 100  # the new wait gets its own chance
    assert p.after_poll(0, behind=True, now=0.31) == 200
    t = 0.31
    for _ in range(20):
        t += 10.0
        p.after_poll(0, behind=True, now=t)
    assert p.ms == 2000  # never past the ceiling


def test_fetch_wait_stays_put_when_idle_and_settles_back_when_records_flow() -> None:
    from stampflow.nodes.consuming import FetchWaitPolicy

    p = FetchWaitPolicy(50, now=0.0)
    for t in range(100):  # nothing waiting: idle, not starved
        assert p.after_poll(0, behind=False, now=float(t)) == 50
    p.ms = 800
    for t in range(2000):
        p.after_poll(10, behind=False, now=100.0 + t)
    assert p.ms == 50  # back down to the floor, a tenth at a time


def test_fetch_wait_does_not_settle_back_into_a_wait_that_starved() -> None:
    from stampflow.nodes.consuming import FetchWaitPolicy

    p = FetchWaitPolicy(50, ceiling_ms=2000, now=0.0)
    t = 0.0
    while p.ms < 400:  # starved at 50, 100 and 200 ms
        t += 1.0
        p.after_poll(0, behind=True, now=t)
    for _ in range(2000):  # records flow: down, but not below twice the longest that starved
        t += 0.01
        p.after_poll(500, behind=False, now=t)
    assert p.ms == 400
    p.after_poll(0, behind=False, now=t + 1)  # caught up: nothing waiting
    for _ in range(2000):
        t += 0.01
        p.after_poll(5, behind=False, now=t)
    assert p.ms == 50
