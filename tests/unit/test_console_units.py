"""The console's pure parts: parameters and cursors, charts, Basic credentials, CSRF tokens
and the Origin check."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

import stampflow.console
from stampflow.console import charts, filters
from stampflow.console.access import Credentials, Unauthorized, operator_url, parse_basic
from stampflow.console.security import CsrfTokens, origin_problem

STATES = frozenset({"received", "stamping", "completed", "failed"})


def test_the_public_surface() -> None:
    assert stampflow.console.__all__ == ["ConsoleConfig", "ConsoleServer", "create_app",
                                         "start_console"]


def test_a_cursor_round_trips_and_garbage_is_a_bad_request() -> None:
    c = filters.Cursor(datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC), uuid4())
    assert filters.Cursor.decode(c.encode()) == c
    for bad in ("", "@@@", base64.urlsafe_b64encode(b"2026-01-01|x").decode(),
                base64.urlsafe_b64encode(f"2026-01-01T00:00:00|{uuid4()}".encode()).decode()):
        with pytest.raises(filters.BadRequest, match="cursor: not a cursor"):
            filters.Cursor.decode(bad)


def test_filters_check_each_value_and_name_it() -> None:
    f = filters.workflow_filter(STATES, namespace_="acme", kind="stamp", state="failed",
                                outcome="", since="2026-01-01T00:00", until=None)
    assert f.since == datetime(2026, 1, 1, tzinfo=UTC) and f.outcome is None
    assert ("since", "2026-01-01T00:00:00+00:00") in f.query_items()
    cases = {
        "namespace": dict(namespace_="ACME"), "kind": dict(kind="video"),
        "state": dict(state="exploded"), "outcome": dict(outcome="maybe"),
        "since": dict(since="noon"),
    }
    for name, kw in cases.items():
        args = {"namespace_": None, "kind": None, "state": None, "outcome": None,
                "since": None, "until": None, **kw}
        with pytest.raises(filters.BadRequest, match=f"^{name}: "):
            filters.workflow_filter(STATES, **args)
    with pytest.raises(filters.BadRequest, match="earlier than until"):
        filters.workflow_filter(STATES, namespace_=None, kind=None, state=None, outcome=None,
                                since="2026-02-01", until="2026-01-01")
    assert filters.limit(None) == 50 and filters.limit("200") == 200
    for bad in ("0", "201", "-1", "x"):
        with pytest.raises(filters.BadRequest, match="^limit: "):
            filters.limit(bad)
    with pytest.raises(filters.BadRequest, match="^hash: "):
        filters.content_hash("A" * 64)


def test_the_chart_window_and_bars() -> None:
    last = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    w = charts.window(last - timedelta(minutes=3), last)
    assert w is not None and w.bucket == timedelta(minutes=1)
    assert w.start + w.bucket * charts.BUCKETS > last >= w.start + w.bucket * (charts.BUCKETS - 1)
    assert charts.window(None, None) is None
    wide = charts.window(last - timedelta(days=3), last)
    assert wide is not None and wide.bucket == timedelta(hours=6)
    rows = [{"bucket": w.start + w.bucket * 39, "created": 10, "failed": 5},
            {"bucket": w.start + w.bucket * 20, "created": 5, "failed": 0},
            {"bucket": w.start - w.bucket, "created": 99, "failed": 99}]  # outside: ignored
    c = charts.chart(w, rows)
    assert (c.peak, c.total, c.failed) == (10, 15, 5)
    tall, short = sorted(c.bars, key=lambda b: -b.ok_height - b.failed_height)
    assert tall.ok_height + tall.failed_height == charts.HEIGHT and tall.failed_height == 30
    assert short.ok_height == 30 and short.failed_height == 0


def test_basic_credentials() -> None:
    def basic(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    assert parse_basic(basic("alice:s3:cr:et")) == Credentials("alice", "s3:cr:et")
    for header in (None, "", "Bearer x", "Basic !!", basic("alice"), basic("alice:"),
                   basic("Robert'); DROP:x"), basic("pg_x:") + "y"):
        with pytest.raises(Unauthorized):
            parse_basic(header)
    url = operator_url("postgresql://owner:secret@db:5432/stampflow?sslmode=require",
                       Credentials("alice", "p@ss/word"))
    assert url == "postgresql://alice:p%40ss%2Fword@db:5432/stampflow?sslmode=require"
    assert "secret" not in repr(Credentials("alice", "secret"))


def test_csrf_tokens_are_bound_to_the_role_and_the_process() -> None:
    tokens = CsrfTokens()
    token = tokens.issue("alice")
    assert tokens.problem("alice", token, token) is None
    assert "missing" in (tokens.problem("alice", None, token) or "")
    assert "does not match" in (tokens.problem("alice", token, tokens.issue("alice")) or "")
    assert "not valid for this role" in (tokens.problem("bob", token, token) or "")
    assert "not valid" in (CsrfTokens().problem("alice", token, token) or "")


def test_the_origin_check() -> None:
    assert origin_problem("http://127.0.0.1:8470", None, "http", "127.0.0.1:8470") is None
    assert origin_problem(None, "http://127.0.0.1:8470/dead-letters/x", "http",
                          "127.0.0.1:8470") is None
    assert origin_problem("null", None, "http", "127.0.0.1:8470") is not None
    assert origin_problem("http://127.0.0.1:9999", None, "http", "127.0.0.1:8470") is not None
    assert origin_problem(None, None, "http", "127.0.0.1:8470") is not None
