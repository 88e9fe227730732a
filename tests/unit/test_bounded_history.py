"""The reducer's bounded exactly-once bookkeeping (ids remembered in each workflow's row, and
orphans on their own) and the retention planner (pure)."""

from __future__ import annotations

from datetime import date, timedelta
from uuid import uuid4

from hypothesis import given, settings
from hypothesis import strategies as st

from stampflow.nodes.reducer import retention
from stampflow.nodes.reducer.core import ReducerState, reduce
from stampflow.nodes.reducer.retention import Partition, plan
from tests.unit.test_cores import FSMS, core, request, run_stamp


def test_every_event_applied_is_remembered_in_its_workflow_row() -> None:
    events = run_stamp(core(), request("a"))
    state, writes = reduce(ReducerState(), events, FSMS)
    (row,) = writes.workflows.values()
    assert row.applied == tuple(e.event_id for e in events)
    assert not writes.orphans
    assert writes.duplicates == 0


def test_a_redelivered_batch_changes_nothing() -> None:
    events = run_stamp(core(), request("a"))
    state, _ = reduce(ReducerState(), events, FSMS)
    _, again = reduce(state, events, FSMS)
    assert again.duplicates == len(events)
    assert not again.workflows and not again.transitions and not again.stamps
    assert not again.aggregates and not again.anomalies and not again.orphans


def test_a_redelivered_tail_is_skipped_and_the_rest_applied() -> None:
    events = run_stamp(core(), request("a"))
    state, _ = reduce(ReducerState(), events[:4], FSMS)
    _, rest = reduce(state, events[2:], FSMS)  # 2 and 3 again, then 4 and 5 new
    assert rest.duplicates == 2
    (row,) = rest.workflows.values()
    assert row.state == "completed"
    assert row.applied == tuple(e.event_id for e in events)
    assert rest.aggregates["a"].completed == 1


def test_an_event_of_no_workflow_is_an_orphan_and_counted_once() -> None:
    events = run_stamp(core(), request("a"))
    stray = events[-1]  # workflow.completed of a workflow never created
    state, first = reduce(ReducerState(), [stray], FSMS)
    assert first.orphans == [(stray.event_id, "a")]
    assert first.aggregates["a"].anomalies == 1
    # Re-delivered, even after its workflow has come into being: skipped.
    seen = ReducerState(seen=frozenset({stray.event_id}))
    _, again = reduce(seen, [*events[:-1], stray], FSMS)
    assert again.duplicates == 1
    assert not any(a.event_id == stray.event_id for a in again.anomalies)


def test_a_second_result_under_another_id_is_an_anomaly_not_counted() -> None:
    c = core()
    events = run_stamp(c, request("a"), digest="11" * 32)
    result = next(e for e in events if e.event_type == "stamp.created")
    forged = result.model_copy(update={"event_id": uuid4(), "payload": result.payload.model_copy(
        update={"hash": "22" * 32})})
    _, writes = reduce(ReducerState(), [*events, forged], FSMS)
    assert writes.aggregates["a"].stamps == 1
    assert [a.kind for a in writes.anomalies] == ["duplicate_result"]
    (row,) = writes.workflows.values()
    assert row.hash == "11" * 32


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_redelivery_pattern_counts_each_workflow_once(data: st.DataObject) -> None:
    """Batches cut anywhere, each delivered one or more times: the totals equal one clean
    delivery's."""
    c = core()
    events = []
    for i in range(data.draw(st.integers(1, 4))):
        events += run_stamp(c, request(f"n{i % 2}"), digest=f"{i % 3}" * 64,
                            fail=data.draw(st.booleans()))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=5)))
    batches = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    state = ReducerState()
    totals: dict[str, int] = {}
    for batch in batches:
        for _ in range(data.draw(st.integers(1, 3))):
            # Each delivery starts from what the database holds after the previous commit.
            state, writes = reduce(state, batch, FSMS)
            for ns, d in writes.aggregates.items():
                totals[ns] = totals.get(ns, 0) + d.workflows * 1000 + d.stamps * 10 + d.completed
    _, clean = reduce(ReducerState(), events, FSMS)
    expected = {ns: d.workflows * 1000 + d.stamps * 10 + d.completed
                for ns, d in clean.aggregates.items()}
    assert totals == expected


# --- retention planner ------------------------------------------------------------------------

TODAY = date(2026, 12, 10)


def _existing(*days: date, until: date | None = None) -> list[Partition]:
    out: list[Partition] = []
    for table in retention.HISTORY_TABLES:
        out.append(Partition(table, f"{table}_default", None, None))
        if until is not None:
            out.append(Partition(table, f"{table}_until_{until:%Y%m%d}", None, until))
        out += [Partition(table, retention.day_name(table, d), d, d + timedelta(days=1))
                for d in days]
    return out


def test_names_parse_back_to_their_ranges() -> None:
    assert retention.parse("workflows", "workflows_d20261210") == Partition(
        "workflows", "workflows_d20261210", date(2026, 12, 10), date(2026, 12, 11))
    assert retention.parse("workflows", "workflows_until_20261203") == Partition(
        "workflows", "workflows_until_20261203", None, date(2026, 12, 3))
    assert retention.parse("workflows", "workflows_default") is not None
    assert retention.parse("workflows", "workflow_transitions_d20261210") is None
    assert retention.parse("workflows", "workflows_old") is None


def test_plan_makes_today_and_the_days_ahead_once() -> None:
    first = plan(_existing(until=TODAY), TODAY, keep_days=30, ahead_days=2)
    per_table = {t: sorted(d for tt, d in first.create if tt == t)
                 for t in retention.HISTORY_TABLES}
    assert all(days == [TODAY + timedelta(days=n) for n in range(3)]
               for days in per_table.values())
    assert not first.drop
    done = _existing(*(TODAY + timedelta(days=n) for n in range(3)), until=TODAY)
    assert plan(done, TODAY, keep_days=30, ahead_days=2).empty


def test_plan_drops_only_partitions_wholly_older_than_the_window() -> None:
    days = [TODAY - timedelta(days=n) for n in range(40)]
    wanted = plan(_existing(*days, until=TODAY - timedelta(days=40)), TODAY,
                  keep_days=30, ahead_days=0)
    dropped = {(p.table, p.first) for p in wanted.drop}
    cutoff = TODAY - timedelta(days=30)
    for table in retention.HISTORY_TABLES:
        assert (table, None) in dropped  # the old partition, everything before day -40
        for d in days:
            assert ((table, d) in dropped) == (d + timedelta(days=1) <= cutoff)


def test_keep_days_zero_keeps_everything() -> None:
    days = [TODAY - timedelta(days=n) for n in range(400)]
    assert not plan(_existing(*days, until=TODAY - timedelta(days=400)), TODAY,
                    keep_days=0, ahead_days=0).drop


def test_rows_waiting_in_the_default_get_their_day_made_and_expired_ones_dropped() -> None:
    old, recent = TODAY - timedelta(days=60), TODAY - timedelta(days=2)
    wanted = plan(_existing(TODAY), TODAY, keep_days=30, ahead_days=0,
                  default_days={"workflows": {old, recent}})
    assert ("workflows", old) in wanted.create and ("workflows", recent) in wanted.create
    assert [p.name for p in wanted.drop] == [retention.day_name("workflows", old)]


def test_a_topic_that_outlives_the_history_is_named() -> None:
    day = 86_400_000
    assert retention.topic_retention_problem(7 * day, 30) is None
    assert "forever" in (retention.topic_retention_problem(-1, 30) or "")
    assert "30 days" in (retention.topic_retention_problem(30 * day, 30) or "")
    assert "does not report" in (retention.topic_retention_problem(None, 30) or "")
    assert retention.topic_retention_problem(-1, 0) is None  # history kept forever


def test_the_fold_never_changes_the_rows_it_was_given() -> None:
    """Rows are mutable inside one fold for speed: the state passed in (and a state returned
    before) must come out as it went in."""
    from dataclasses import asdict

    events = run_stamp(core(), request("a"))
    state, _ = reduce(ReducerState(), events[:2], FSMS)
    before = {k: asdict(v) for k, v in state.workflows.items()}
    later, writes = reduce(state, events[2:], FSMS)
    assert {k: asdict(v) for k, v in state.workflows.items()} == before
    (row,) = writes.workflows.values()
    assert row.state == "completed" and row is not next(iter(state.workflows.values()))
    assert later.workflows[row.workflow_id] is row


# --- the reducer's maintenance loop ------------------------------------------------------------


class _Store:
    """A store whose retention run fails, then hangs: what a refusing, then hung, database
    does to it."""

    def __init__(self) -> None:
        self.calls = 0

    async def maintain(self, *, keep_days: int, ahead_days: int) -> retention.Report:
        import asyncio

        self.calls += 1
        if self.calls == 1:
            raise ConnectionRefusedError("PostgreSQL refused")
        await asyncio.Event().wait()  # hangs until cancelled
        raise AssertionError("unreachable")


def _reducer(store: _Store, interval: float, timeout: float) -> object:
    from stampflow.contracts.nodes import builtin_contract
    from stampflow.nodes.reducer.runner import Reducer, ReducerConfig

    config = ReducerConfig(events_topic="e", group_id="g", max_batch_size=10,
                           max_batch_wait_ms=10, retention_days=30,
                           maintenance_interval_s=interval, maintenance_timeout_s=timeout)
    return Reducer(contract=builtin_contract("reducer"), config=config, consumer=None,  # type: ignore[arg-type]
                   store=store, publisher=None)  # type: ignore[arg-type]


async def test_maintenance_outlives_a_refusing_and_a_hung_database_and_stops_at_once() -> None:
    import asyncio
    import time

    store = _Store()
    reducer = _reducer(store, interval=0.05, timeout=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(reducer._maintain(stop))  # type: ignore[attr-defined]
    await asyncio.sleep(0.6)  # refused, then hung past its timeout, then tried again
    assert not task.done()
    assert store.calls >= 3, store.calls
    t0 = time.monotonic()
    stop.set()
    task.cancel()  # as run() does on its way out, whatever the run is waiting for
    await asyncio.gather(task, return_exceptions=True)
    assert time.monotonic() - t0 < 1.0
