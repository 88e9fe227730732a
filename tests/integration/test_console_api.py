"""The console over HTTP (httpx against the ASGI app), on a real stack: row-level security on
every API answer and image, keyset pagination and filters, one-line 400s, the security
headers, the CSRF and Origin checks of the replay, and a replay that happens once."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from stampflow.console import create_app
from stampflow.console.access import Credentials
from stampflow.console.security import CSRF_COOKIE, HEADERS
from stampflow.testing.stack import fetch
from tests.integration.console_stack import ACME, OTHER, POISON, World, console_world

__all__ = ["console_world"]  # the session fixture, used through `world`

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "http://console.test"


@pytest.fixture(scope="module")
async def app(console_world: World) -> AsyncIterator[FastAPI]:
    app = create_app(console_world.config)
    yield app
    await app.state.pools.close()


@pytest.fixture
def world(console_world: World) -> World:
    return console_world


def client(app: FastAPI, creds: Credentials | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                             auth=(creds.role, creds.password) if creds else None)


async def get(app: FastAPI, creds: Credentials | None, url: str,
              **kw: Any) -> httpx.Response:
    async with client(app, creds) as c:
        return await c.get(url, **kw)


def assert_one_line(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    text = str(response.json()["detail"]) if response.url.path.startswith("/api/") \
        else response.text
    assert "\n" not in text.strip(), text
    for needle in needles:
        assert needle in text, text
    return text


# --- who may log in -------------------------------------------------------------------------------


async def test_no_credentials_or_a_wrong_password_is_401_with_a_challenge(
        app: FastAPI, world: World) -> None:
    for creds in (None, Credentials(world.limited.role, "not-the-password"),
                  Credentials("no_such_role_x", "x")):
        response = await get(app, creds, "/api/namespaces")
        assert_one_line(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Basic realm=")
    page = await get(app, None, "/workflows")
    assert page.status_code == 401 and "unauthorized" in page.text
    assert (await get(app, world.limited, "/api/me")).json() == {
        "role": world.limited.role, "may_replay": False}
    assert (await get(app, world.ops, "/api/me")).json() == {
        "role": world.ops.role, "may_replay": True}


# --- row-level security ---------------------------------------------------------------------------


async def test_a_limited_role_sees_only_its_namespace_in_the_api(app: FastAPI,
                                                                 world: World) -> None:
    ops = (await get(app, world.ops, "/api/namespaces")).json()
    assert sorted(n["namespace"] for n in ops["namespaces"]) == [ACME, OTHER]
    limited = (await get(app, world.limited, "/api/namespaces")).json()
    assert [n["namespace"] for n in limited["namespaces"]] == [ACME]
    acme = limited["namespaces"][0]
    assert acme["workflows"] == len(world.workflows[ACME])
    assert sum(b["created"] for b in acme["activity"]) == len(world.workflows[ACME])
    assert sum(b["failed"] for b in acme["activity"]) == 1

    page = (await get(app, world.limited, "/api/workflows", params={"limit": "200"})).json()
    assert {w["namespace"] for w in page["items"]} == {ACME}
    assert len(page["items"]) == len(world.workflows[ACME])
    # Asking for the other namespace by name finds nothing rather than its rows.
    other = (await get(app, world.limited, "/api/workflows",
                       params={"namespace": OTHER})).json()
    assert other["items"] == []
    images = (await get(app, world.limited, "/api/images")).json()
    assert [i["namespace"] for i in images["items"]] == [ACME]
    failures = (await get(app, world.ops, "/api/failures")).json()
    assert [f["namespace"] for f in failures] == [ACME]
    assert (await get(app, world.limited, "/api/failures",
                      params={"namespace": OTHER})).json() == []


async def test_another_namespaces_workflow_and_image_are_404_by_url(app: FastAPI,
                                                                    world: World) -> None:
    foreign = world.workflow(OTHER, "generation")
    for url in (f"/api/workflows/{foreign['workflow_id']}",
                f"/workflows/{foreign['workflow_id']}",
                f"/artifacts/{world.images[OTHER]}.png"):
        assert_one_line(await get(app, world.limited, url), 404, "not visible to this role")
        assert (await get(app, world.ops, url)).status_code == 200, url
    # A hash that exists nowhere is the same 404 as a hidden one.
    response = await get(app, world.limited, f"/artifacts/{'0' * 64}.png")
    assert_one_line(response, 404, "no such image")
    own = world.workflow(ACME, "generation")
    detail = (await get(app, world.limited, f"/api/workflows/{own['workflow_id']}")).json()
    assert detail["generation"]["image_url"] == f"/artifacts/{world.images[ACME]}.png"
    # The image comes with what was asked for, on the page too (escaped by the template).
    assert detail["generation"]["prompt"] == "a console test picture 11"
    page = (await get(app, world.limited, f"/workflows/{own['workflow_id']}")).text
    assert "a console test picture 11" in page


async def test_an_image_is_served_by_hash_and_cached_as_immutable(app: FastAPI,
                                                                  world: World) -> None:
    digest = world.images[ACME]
    response = await get(app, world.limited, f"/artifacts/{digest}.png")
    assert response.status_code == 200
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert response.headers["content-type"] == "image/png"
    assert response.headers["etag"] == f'"{digest}"'
    assert "immutable" in response.headers["cache-control"]
    assert "private" in response.headers["cache-control"]
    again = await get(app, world.limited, f"/artifacts/{digest}.png",
                      headers={"if-none-match": f'"{digest}"'})
    assert again.status_code == 304 and again.content == b""
    # The ETag answer comes only after the access check: a foreign hash stays 404.
    foreign = await get(app, world.limited, f"/artifacts/{world.images[OTHER]}.png",
                        headers={"if-none-match": f'"{world.images[OTHER]}"'})
    assert foreign.status_code == 404


# --- filters and pagination -----------------------------------------------------------------------


async def test_keyset_pagination_walks_every_workflow_once_in_order(app: FastAPI,
                                                                    world: World) -> None:
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await get(app, world.ops, "/api/workflows", params=params)).json()
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    everything = await fetch(world.database_url, "SELECT workflow_id::text AS id FROM workflows "
                                                 "ORDER BY created_at DESC, workflow_id DESC")
    assert [w["workflow_id"] for w in seen] == [r["id"] for r in everything]
    assert pages == -(-len(everything) // 2)  # the last page says there is no next one


async def test_filters_narrow_the_workflows(app: FastAPI, world: World) -> None:
    async def ids(**params: str) -> list[str]:
        page = (await get(app, world.ops, "/api/workflows",
                          params={"limit": "200", **params})).json()
        return [w["workflow_id"] for w in page["items"]]

    def expected(pred: Any) -> list[str]:
        rows = sorted((w for ws in world.workflows.values() for w in ws),
                      key=lambda w: (w["created_at"], w["workflow_id"]), reverse=True)
        return [str(w["workflow_id"]) for w in rows if pred(w)]

    assert await ids(kind="generation") == expected(lambda w: w["kind"] == "generation")
    assert len(await ids(kind="generation")) == 2
    assert await ids(state="failed") == expected(lambda w: w["state"] == "failed")
    assert await ids(outcome="duplicate", namespace=ACME) == expected(
        lambda w: w["outcome"] == "duplicate" and w["namespace"] == ACME)
    assert len(await ids(outcome="duplicate")) == 1
    middle = sorted(w["created_at"] for ws in world.workflows.values() for w in ws)[4]
    assert await ids(since=middle.isoformat()) == expected(lambda w: w["created_at"] >= middle)
    assert await ids(until=middle.isoformat()) == expected(lambda w: w["created_at"] < middle)


@pytest.mark.parametrize(("url", "needle"), [
    ("/api/workflows?state=exploded", "state: 'exploded' is not one of"),
    ("/api/workflows?kind=video", "kind: 'video' is not one of generation, stamp"),
    ("/api/workflows?outcome=maybe", "outcome:"),
    ("/api/workflows?namespace=Not%20A%20Namespace", "namespace:"),
    ("/api/workflows?cursor=!!not-a-cursor!!", "cursor: not a cursor this console made"),
    ("/api/workflows?cursor=Zm9vfGJhcg", "cursor: not a cursor this console made"),
    ("/api/workflows?limit=0", "limit: 0 is not between 1 and 200"),
    ("/api/workflows?limit=ten", "limit: 'ten' is not a whole number"),
    ("/api/workflows?since=yesterday", "since: 'yesterday' is not an ISO 8601 time"),
    ("/api/workflows?since=2026-02-01&until=2026-01-01", "since: must be earlier than until"),
    ("/api/workflows/not-a-uuid", "workflow id: 'not-a-uuid' is not a UUID"),
    ("/api/images?cursor=xyz", "cursor:"),
    ("/api/dead-letters?topic=jobs", "topic: 'jobs' is not one of requests, events"),
    ("/workflows?state=exploded", "state: 'exploded' is not one of"),
    ("/workflows/rows?newer_than=bad", "newer_than: not a cursor this console made"),
    ("/workflows/rows", "newer_than: Field required"),
    ("/artifacts/abc.png", "hash: 'abc' is not 64 lowercase hex characters"),
])
async def test_bad_input_is_one_400_line(app: FastAPI, world: World, url: str,
                                         needle: str) -> None:
    assert_one_line(await get(app, world.ops, url), 400, "bad request: ", needle)


async def test_live_updates_return_only_newer_rows(app: FastAPI, world: World) -> None:
    first = (await get(app, world.ops, "/api/workflows", params={"limit": "3"})).json()
    # Rows newer than the third one are the first two, newest first.
    third = first["next_cursor"]
    newer = (await get(app, world.ops, "/api/workflows",
                       params={"newer_than": third})).json()
    assert [w["workflow_id"] for w in newer["items"]] == \
        [w["workflow_id"] for w in first["items"][:2]]
    none = (await get(app, world.ops, "/api/workflows",
                      params={"newer_than": first["newest_cursor"]})).json()
    assert none["items"] == [] and none["newest_cursor"] == first["newest_cursor"]
    rows = await get(app, world.ops, "/workflows/rows", params={"newer_than": third})
    assert rows.status_code == 200
    assert rows.text.count("<tr ") == 2
    assert rows.headers["x-newest-cursor"] == first["newest_cursor"]


# --- headers, OpenAPI -----------------------------------------------------------------------------


async def test_every_answer_carries_the_security_headers(app: FastAPI, world: World) -> None:
    for creds, url in ((world.ops, "/namespaces"), (world.ops, "/api/workflows"),
                       (None, "/api/workflows"), (world.limited, "/api/workflows/" + "0" * 8),
                       (world.ops, f"/artifacts/{world.images[ACME]}.png"),
                       (world.ops, "/static/console.js")):
        response = await get(app, creds, url)
        for name, value in HEADERS.items():
            assert response.headers.get(name) == value, (url, name)
    csp = HEADERS["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    page = (await get(app, world.ops, "/namespaces")).text
    assert "<script>" not in page and " style=" not in page  # nothing inline for the CSP


async def test_the_api_is_described_by_openapi(app: FastAPI, world: World) -> None:
    doc = (await get(app, None, "/api/openapi.json")).json()
    assert {"/api/namespaces", "/api/workflows", "/api/workflows/{workflow_id}",
            "/api/images", "/api/failures", "/api/anomalies",
            "/api/dead-letters"} <= set(doc["paths"])
    assert not any(p.startswith("/workflows") for p in doc["paths"])  # pages are not API
    assert "WorkflowPage" in doc["components"]["schemas"]


async def test_the_keyset_queries_can_use_their_indexes(world: World) -> None:
    conn = await asyncpg.connect(world.database_url)
    try:
        # So few rows would be scanned; without that choice the planner shows what it can use.
        await conn.execute("SET enable_seqscan = off; SET enable_sort = off")
        for where, index in (("namespace = 'acme' AND ", "workflows_namespace_created_keyset"),
                             ("", "workflows_created_keyset")):
            plan = await conn.fetch(
                f"EXPLAIN SELECT workflow_id FROM workflows WHERE {where}"
                "(created_at, workflow_id) < (now(), gen_random_uuid()) "
                "ORDER BY created_at DESC, workflow_id DESC LIMIT 50")
            text = " ".join(r[0] for r in plan)
            # workflows is partitioned by day: each partition has its own copy of the index
            parts = {r["name"] for r in await conn.fetch(
                "SELECT inhrelid::regclass::text AS name FROM pg_inherits "
                "WHERE inhparent = $1::regclass", index)}
            assert parts, index
            assert "Seq Scan" not in text and any(f"using {p} " in text for p in parts), text
    finally:
        await conn.close()


# --- dead letters and the replay ---------------------------------------------------------------


async def _confirm_page(c: httpx.AsyncClient, letter: str) -> tuple[str, str]:
    page = await c.get(f"/dead-letters/requests/{letter.replace(':', '/')}")
    assert page.status_code == 200, page.text
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None, page.text
    return token.group(1), page.cookies.get(CSRF_COOKIE) or c.cookies.get(CSRF_COOKIE) or ""


async def test_dead_letters_are_listed_only_for_roles_that_may_replay(
        app: FastAPI, world: World) -> None:
    letters = (await get(app, world.ops, "/api/dead-letters")).json()["items"]
    values = {d["value_preview"] for d in letters}
    assert {repr(p) for p in POISON} <= values
    assert_one_line(await get(app, world.limited, "/api/dead-letters"), 403, "stampflow_replay")
    assert (await get(app, world.limited, "/dead-letters")).status_code == 403
    nav = (await get(app, world.limited, "/namespaces")).text
    assert "/dead-letters" not in nav
    assert "/dead-letters" in (await get(app, world.ops, "/namespaces")).text
    page = (await get(app, world.ops, "/dead-letters")).text
    assert "&lt;script&gt;alert(1)" in page and "<script>alert" not in page  # data is text


async def test_a_replay_without_a_valid_token_or_origin_is_refused(
        app: FastAPI, world: World) -> None:
    letters = (await get(app, world.ops, "/api/dead-letters")).json()["items"]
    letter = next(d for d in letters if d["replayed"] is None)
    where = f"{letter['dlq_partition']}:{letter['dlq_offset']}"
    url = f"/dead-letters/requests/{where.replace(':', '/')}/replay"
    own = {"origin": BASE}
    async with client(app, world.ops) as c:
        token, cookie = await _confirm_page(c, where)
        assert cookie == token
        form = {"csrf": token, "confirm": "yes", "to": "requests"}
        cases = [
            ({"confirm": "yes", "to": "requests"}, own, "CSRF token is missing"),
            # (the last character changed: "0" unless it was "0" already)
            ({**form, "csrf": token[:-1] + ("1" if token.endswith("0") else "0")}, own,
             "does not match its cookie"),
            (form, {"origin": "https://evil.example"}, "Origin https://evil.example"),
            (form, {}, "neither Origin nor Referer"),
            (form, {"referer": "https://evil.example/x"}, "Referer from https://evil.example"),
        ]
        for data, headers, needle in cases:
            response = await c.post(url, data=data, headers=headers)
            assert_one_line(response, 403, "replay refused", needle)
        c.cookies.clear()
        c.cookies.set(CSRF_COOKIE, token)
        # The form posted without confirmation is not a replay either.
        no = await c.post(url, data={**form, "confirm": ""}, headers=own)
        assert_one_line(no, 400, "not confirmed")
    # Another role cannot use ops' token, and the limited role may not replay at all.
    async with client(app, world.limited) as c:
        c.cookies.set(CSRF_COOKIE, token)
        response = await c.post(url, data=form, headers=own)
        assert_one_line(response, 403, "not valid for this role")
    replays = await fetch(world.database_url, 'SELECT * FROM dlq_replays WHERE partition = $1 '
                          'AND "offset" = $2', letter["dlq_partition"], letter["dlq_offset"])
    assert replays == []


async def test_a_limited_role_cannot_replay_even_with_its_own_token(
        app: FastAPI, world: World) -> None:
    from stampflow.console.security import CsrfTokens

    tokens: CsrfTokens = app.state.csrf
    token = tokens.issue(world.limited.role)
    async with client(app, world.limited) as c:
        c.cookies.set(CSRF_COOKIE, token)
        response = await c.post("/dead-letters/requests/0/0/replay",
                                data={"csrf": token, "confirm": "yes", "to": "requests"},
                                headers={"origin": BASE})
    assert_one_line(response, 403, "stampflow_replay")


async def test_a_replay_happens_once(app: FastAPI, world: World) -> None:
    letters = (await get(app, world.ops, "/api/dead-letters")).json()["items"]
    letter = next(d for d in letters if d["replayed"] is None)
    where = f"{letter['dlq_partition']}:{letter['dlq_offset']}"
    url = f"/dead-letters/requests/{where.replace(':', '/')}/replay"
    async with client(app, world.ops) as c:
        token, _ = await _confirm_page(c, where)
        form = {"csrf": token, "confirm": "yes", "to": "requests"}
        first = await c.post(url, data=form, headers={"origin": BASE})
        assert first.status_code == 200, first.text
        assert "Replayed" in first.text and f"{world.stack.settings.requests_topic}" in first.text
        second = await c.post(url, data=form, headers={"origin": BASE})
        assert second.status_code == 409, second.text
        assert "Not replayed" in second.text and "replayed before" in second.text
        again = await c.get(f"/dead-letters/requests/{where.replace(':', '/')}")
        assert 'id="replay-form"' not in again.text and "Replayed before" in again.text
    rows = await fetch(world.database_url,
                       'SELECT replayed_to, by_role, times FROM dlq_replays '
                       'WHERE partition = $1 AND "offset" = $2',
                       letter["dlq_partition"], letter["dlq_offset"])
    assert [(r["replayed_to"], r["by_role"], r["times"]) for r in rows] == [
        (world.stack.settings.requests_topic, world.ops.role, 1)]
    listed = (await get(app, world.ops, "/api/dead-letters")).json()["items"]
    marked = next(d for d in listed if (d["dlq_partition"], d["dlq_offset"]) ==
                  (letter["dlq_partition"], letter["dlq_offset"]))
    assert marked["replayed"]["by_role"] == world.ops.role


async def test_run_nodes_serves_the_console_beside_them(world: World) -> None:
    """What `stampflow up` and the demo do: the console on the settings' host and port."""
    import asyncio

    from stampflow.app import RunningNodes, run_nodes

    settings = world.stack.settings.model_copy(update={"console_port": 0})
    stop, started, running = asyncio.Event(), asyncio.Event(), RunningNodes()
    task = asyncio.create_task(run_nodes(settings, world.stack.endpoints, ["reducer"], stop,
                                         started=started, running=running, console=True))
    try:
        await asyncio.wait_for(started.wait(), 60)
        assert running.console_url is not None
        assert running.console_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=running.console_url) as c:
            assert (await c.get("/api/openapi.json")).status_code == 200
            me = await c.get("/api/me", auth=(world.limited.role, world.limited.password))
            assert me.json() == {"role": world.limited.role, "may_replay": False}
            assert me.headers["x-frame-options"] == "DENY"
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)
    async with httpx.AsyncClient(base_url=running.console_url) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/api/openapi.json")


async def test_postgresql_itself_refuses_a_replay_by_a_role_outside_stampflow_replay(
        world: World) -> None:
    """The console's own check aside, the claim in dlq_replays is what PostgreSQL refuses:
    a namespace role has no INSERT there, and a member of stampflow_replay cannot force."""
    from stampflow.console.access import operator_url
    from stampflow.dlq import read_dead_letters, replay
    from stampflow.errors import StampflowError

    settings = world.stack.settings
    letters = await read_dead_letters(world.config.bootstrap_servers, settings.requests_topic,
                                      kafka=world.config.kafka)
    dlq = settings.dlq_topic(settings.requests_topic)
    with pytest.raises(StampflowError, match="permission denied for table dlq_replays"):
        await replay(world.config.bootstrap_servers,
                     operator_url(world.database_url, world.limited), dlq, letters[:1],
                     settings.requests_topic, kafka=world.config.kafka)
    with pytest.raises(StampflowError, match="permission denied for table dlq_replays"):
        await replay(world.config.bootstrap_servers,
                     operator_url(world.database_url, world.ops), dlq, letters[:1],
                     settings.requests_topic, force=True, kafka=world.config.kafka)
    rows = await fetch(world.database_url, 'SELECT * FROM dlq_replays WHERE partition = $1 '
                       'AND "offset" = $2', letters[0].dlq_partition, letters[0].dlq_offset)
    assert all(r["by_role"] != world.limited.role for r in rows)
