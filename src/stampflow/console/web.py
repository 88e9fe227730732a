"""The console's ASGI app: server-rendered pages and the JSON API behind them.

Pages and API share one set of view functions (``_namespaces``, ``_workflow_page``, ...), each
running its queries on the operator's own connection, so both see exactly what row-level
security lets that role see. Read-only apart from the replay of a dead letter, a POST that
asks for confirmation first and carries a CSRF token (stampflow.console.security).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from stampflow.console import charts, filters
from stampflow.console import queries as q
from stampflow.console.access import (
    REALM,
    Credentials,
    RolePools,
    Unauthorized,
    Unavailable,
    operator_url,
    parse_basic,
)
from stampflow.console.config import ConsoleConfig
from stampflow.console.filters import BadRequest, Cursor
from stampflow.console.models import (
    ActivityBar,
    Anomaly,
    DeadLetter,
    DeadLetters,
    EarlierReplay,
    Failure,
    Generation,
    Image,
    ImagePage,
    Me,
    Namespace,
    Namespaces,
    Stamp,
    Transition,
    Workflow,
    WorkflowDetail,
    WorkflowPage,
)
from stampflow.console.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CsrfTokens,
    SecureHeaders,
    origin_problem,
)
from stampflow.dlq import DeadLetter as Letter
from stampflow.dlq import read_dead_letters
from stampflow.dlq import replay as replay_letters
from stampflow.errors import StampflowError
from stampflow.nodes.deadletter import dlq_topic
from stampflow.nodes.objectstore import content_key

HERE = Path(__file__).parent
# Images are content-addressed: a hash names its bytes forever. "private": each response was
# authorized for one operator, so shared caches must not keep it.
IMAGE_CACHE = "private, max-age=31536000, immutable"
DEAD_LETTER_LIMIT = 1000


class NotFound(Exception):
    """Nothing this role may see by that name: 404 (the same for absent and for hidden)."""


class Forbidden(Exception):
    """The role may not do this: 403, one line."""


# --- views shared by the pages and the API -------------------------------------------------------


def operator(request: Request) -> Credentials:
    return parse_basic(request.headers.get("authorization"))


Operator = Annotated[Credentials, Depends(operator)]


@asynccontextmanager
async def connection(request: Request, creds: Credentials) -> AsyncIterator[asyncpg.Connection]:
    pools: RolePools = request.app.state.pools
    async with pools.connection(creds) as conn:
        yield conn


def _config(request: Request) -> ConsoleConfig:
    config: ConsoleConfig = request.app.state.config
    return config


def image_url(hash_hex: str) -> str:
    return f"/artifacts/{hash_hex}.png"


async def _me(conn: asyncpg.Connection, creds: Credentials) -> Me:
    return Me(role=creds.role, may_replay=await q.may_replay(conn))


async def _namespaces(conn: asyncpg.Connection) -> Namespaces:
    rows = await q.summary(conn)
    first, last = await q.activity_span(conn)
    w = charts.window(first, last)
    bars: dict[str, list[ActivityBar]] = {}
    if w is not None:
        for r in await q.activity(conn, w.bucket, w.start):
            bars.setdefault(r["namespace"], []).append(
                ActivityBar(start=r["bucket"], created=r["created"], failed=r["failed"]))
    return Namespaces(
        bucket_seconds=int(w.bucket.total_seconds()) if w else None,
        since=w.start if w else None,
        namespaces=[Namespace(**r, activity=bars.get(r["namespace"], [])) for r in rows])


async def _workflow_page(request: Request, conn: asyncpg.Connection, *, namespace: str | None,
                         kind: str | None, state: str | None, outcome: str | None,
                         since: str | None, until: str | None, cursor: str | None,
                         newer_than: str | None, limit: str | None,
                         ) -> tuple[filters.WorkflowFilter, WorkflowPage]:
    f = filters.workflow_filter(_config(request).states, namespace_=namespace, kind=kind,
                                state=state, outcome=outcome, since=since, until=until)
    n = filters.limit(limit)
    after = filters.cursor(cursor)
    newer = filters.cursor(newer_than, "newer_than")
    if newer is not None:
        if after is not None:
            raise BadRequest("cursor and newer_than: give one of them")
        rows = await q.newer_workflows(conn, f, newer, n)
        more = False
    else:
        rows = await q.workflows(conn, f, after, n)
        more = len(rows) > n
        rows = rows[:n]
    items = [Workflow(**r) for r in rows]
    next_cursor = Cursor(rows[-1]["created_at"], rows[-1]["workflow_id"]).encode() \
        if more else None
    newest = (Cursor(rows[0]["created_at"], rows[0]["workflow_id"]).encode() if rows
              else newer_than)
    return f, WorkflowPage(items=items, next_cursor=next_cursor, newest_cursor=newest or None)


async def _workflow_detail(conn: asyncpg.Connection, workflow_id: str) -> WorkflowDetail:
    wid = filters.workflow_id(workflow_id)
    row = await q.workflow(conn, wid)
    if row is None:
        raise NotFound(f"workflow {wid}: no such workflow (or not visible to this role)")
    steps = await q.transitions(conn, wid)
    transitions = []
    for i, t in enumerate(steps):
        after = ((t["occurred_at"] - steps[i - 1]["occurred_at"]).total_seconds() * 1000
                 if i else None)
        transitions.append(Transition(**t, after_ms=after))
    stamp = generation = None
    if row["kind"] == "generation":
        g = await q.generation(conn, wid)
        if g is not None:
            generation = Generation(**g, image_url=image_url(g["hash"]))
    if row["hash"]:
        s = await q.stamp(conn, row["namespace"], row["hash"])
        stamp = Stamp(**s) if s is not None else None
    return WorkflowDetail(workflow=Workflow(**row), transitions=transitions, stamp=stamp,
                          generation=generation)


async def _images(conn: asyncpg.Connection, namespace: str | None, cursor: str | None,
                  limit: str | None) -> ImagePage:
    ns = filters.namespace(namespace)
    n = filters.limit(limit, default=48)
    rows = await q.images(conn, ns, filters.cursor(cursor), n)
    more = len(rows) > n
    rows = rows[:n]
    return ImagePage(
        items=[Image(**r, image_url=image_url(r["hash"])) for r in rows],
        next_cursor=Cursor(rows[-1]["created_at"], rows[-1]["workflow_id"]).encode()
        if more else None)


async def _raw_letters(request: Request, conn: asyncpg.Connection,
                       topic: str) -> tuple[str, list[Letter]]:
    """Dead letters live on the broker, not in PostgreSQL, so row-level security cannot
    filter them by namespace: only roles that may replay (stampflow_replay) see them."""
    logical = filters.logical_topic(topic)
    if not await q.may_replay(conn):
        raise Forbidden("dead letters are shown only to roles that may replay them "
                        "(members of stampflow_replay)")
    config = _config(request)
    source = config.topic(logical)
    return source, await read_dead_letters(config.bootstrap_servers, source,
                                           limit=DEAD_LETTER_LIMIT, kafka=config.kafka)


def _letter(logical: str, d: Letter, earlier: dict[str, Any] | None) -> DeadLetter:
    return DeadLetter(
        dlq_topic=logical, dlq_partition=d.dlq_partition, dlq_offset=d.dlq_offset,
        topic=d.topic, partition=d.partition, offset=d.offset, error=d.error,
        failed_at=d.failed_at, node=d.node,
        key=d.key.decode("utf-8", "replace") if d.key is not None else None,
        value_preview=repr(d.value[:120]), value_size=len(d.value),
        replayed=EarlierReplay(**earlier) if earlier else None)


async def _dead_letters(request: Request, conn: asyncpg.Connection, topic: str) -> DeadLetters:
    source, letters = await _raw_letters(request, conn, topic)
    done = await q.replays(conn, dlq_topic(source))
    return DeadLetters(topic=topic, items=[
        _letter(topic, d, done.get((d.dlq_partition, d.dlq_offset))) for d in letters[::-1]])


async def _one_letter(request: Request, conn: asyncpg.Connection, topic: str, partition: str,
                      offset: str) -> tuple[str, Letter, DeadLetter]:
    p = filters.non_negative("partition", partition)
    o = filters.non_negative("offset", offset)
    source, letters = await _raw_letters(request, conn, topic)
    found = next((d for d in letters if (d.dlq_partition, d.dlq_offset) == (p, o)), None)
    if found is None:
        raise NotFound(f"{topic} dead letter {p}:{o}: no such dead letter")
    done = await q.replays(conn, dlq_topic(source))
    return source, found, _letter(topic, found, done.get((p, o)))


# --- the JSON API ---------------------------------------------------------------------------------

api = APIRouter(prefix="/api")


@api.get("/me")
async def api_me(request: Request, creds: Operator) -> Me:
    """The logged-in role, and whether it may replay dead letters."""
    async with connection(request, creds) as conn:
        return await _me(conn, creds)


@api.get("/namespaces")
async def api_namespaces(request: Request, creds: Operator) -> Namespaces:
    """Per-namespace aggregates and their activity over time (workflows created and failed per
    bucket), for the namespaces this role may see."""
    async with connection(request, creds) as conn:
        return await _namespaces(conn)


@api.get("/workflows")
async def api_workflows(
    request: Request, creds: Operator, namespace: str | None = None, kind: str | None = None,
    state: str | None = None, outcome: str | None = None,
    since: Annotated[str | None, Query(description="ISO 8601; UTC when no zone")] = None,
    until: Annotated[str | None, Query(description="ISO 8601, exclusive")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of a page")] = None,
    newer_than: Annotated[str | None, Query(description="newest_cursor of a page")] = None,
    limit: Annotated[str | None, Query(description="1 to 200, default 50")] = None,
) -> WorkflowPage:
    """Workflows newest first (created_at, then id), filtered; keyset pagination."""
    async with connection(request, creds) as conn:
        _, page = await _workflow_page(
            request, conn, namespace=namespace, kind=kind, state=state, outcome=outcome,
            since=since, until=until, cursor=cursor, newer_than=newer_than, limit=limit)
        return page


@api.get("/workflows/{workflow_id}")
async def api_workflow(request: Request, creds: Operator, workflow_id: str) -> WorkflowDetail:
    """One workflow: its transitions with timings, and its stamp or generation."""
    async with connection(request, creds) as conn:
        return await _workflow_detail(conn, workflow_id)


@api.get("/images")
async def api_images(request: Request, creds: Operator, namespace: str | None = None,
                     cursor: str | None = None, limit: str | None = None) -> ImagePage:
    """Generated images, newest first; each image_url is served through the console."""
    async with connection(request, creds) as conn:
        return await _images(conn, namespace, cursor, limit)


@api.get("/failures")
async def api_failures(request: Request, creds: Operator, namespace: str | None = None,
                       limit: str | None = None) -> list[Failure]:
    async with connection(request, creds) as conn:
        rows = await q.failures(conn, filters.namespace(namespace), filters.limit(limit, 100))
        return [Failure(**r) for r in rows]


@api.get("/anomalies")
async def api_anomalies(request: Request, creds: Operator, namespace: str | None = None,
                        limit: str | None = None) -> list[Anomaly]:
    async with connection(request, creds) as conn:
        rows = await q.anomalies(conn, filters.namespace(namespace), filters.limit(limit, 100))
        return [Anomaly(**r) for r in rows]


@api.get("/dead-letters")
async def api_dead_letters(request: Request, creds: Operator,
                           topic: str = "requests") -> DeadLetters:
    """Dead letters of <topic>.dlq (requests or events): only for roles that may replay."""
    async with connection(request, creds) as conn:
        return await _dead_letters(request, conn, topic)


# --- pages ----------------------------------------------------------------------------------------

pages = APIRouter(include_in_schema=False)


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@pages.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/namespaces", status_code=303)


@pages.get("/namespaces", response_class=HTMLResponse)
async def namespaces_page(request: Request, creds: Operator) -> Response:
    async with connection(request, creds) as conn:
        data = await _namespaces(conn)
        me = await _me(conn, creds)
    drawn = {}
    if data.since is not None and data.bucket_seconds is not None:
        w = charts.Window(data.since, timedelta(seconds=data.bucket_seconds))
        for ns in data.namespaces:
            drawn[ns.namespace] = charts.chart(
                w, [{"bucket": b.start, "created": b.created, "failed": b.failed}
                    for b in ns.activity])
        label = w.label()
    else:
        label = "no activity yet"
    return _render(request, "namespaces.html", me=me, data=data, charts=drawn,
                   chart_label=label, page="namespaces")


@pages.get("/workflows", response_class=HTMLResponse)
async def workflows_page(
    request: Request, creds: Operator, namespace: str | None = None, kind: str | None = None,
    state: str | None = None, outcome: str | None = None, since: str | None = None,
    until: str | None = None, cursor: str | None = None, limit: str | None = None,
) -> Response:
    async with connection(request, creds) as conn:
        f, page = await _workflow_page(
            request, conn, namespace=namespace, kind=kind, state=state, outcome=outcome,
            since=since, until=until, cursor=cursor, newer_than=None, limit=limit)
        me = await _me(conn, creds)
        visible = await q.namespaces(conn)
    base = f.query_items() + ([("limit", limit)] if limit else [])
    next_url = (f"/workflows?{urlencode([*base, ('cursor', page.next_cursor)])}"
                if page.next_cursor else None)
    live_url = None if cursor else f"/workflows/rows?{urlencode(base)}"
    return _render(request, "workflows.html", me=me, page=page, f=f, next_url=next_url,
                   first_url=f"/workflows?{urlencode(base)}", live_url=live_url,
                   namespaces=visible, kinds=filters.KINDS, outcomes=filters.OUTCOMES,
                   states=sorted(_config(request).states), paged=bool(cursor),
                   page_name="workflows")


@pages.get("/workflows/rows", response_class=HTMLResponse)
async def workflow_rows(
    request: Request, creds: Operator, newer_than: str, namespace: str | None = None,
    kind: str | None = None, state: str | None = None, outcome: str | None = None,
    since: str | None = None, until: str | None = None, limit: str | None = None,
) -> Response:
    """Live updates: the rows of workflows created since ``newer_than``, as HTML to put on
    top of the table; the new newest cursor in the X-Newest-Cursor header."""
    async with connection(request, creds) as conn:
        _, page = await _workflow_page(
            request, conn, namespace=namespace, kind=kind, state=state, outcome=outcome,
            since=since, until=until, cursor=None, newer_than=newer_than, limit=limit)
    response = _render(request, "_workflow_rows.html", items=page.items)
    response.headers["x-newest-cursor"] = page.newest_cursor or newer_than
    response.headers["cache-control"] = "no-store"
    return response


@pages.get("/workflows/{workflow_id}", response_class=HTMLResponse)
async def workflow_page(request: Request, creds: Operator, workflow_id: str) -> Response:
    async with connection(request, creds) as conn:
        detail = await _workflow_detail(conn, workflow_id)
        me = await _me(conn, creds)
    return _render(request, "workflow.html", me=me, d=detail, page_name="workflows")


@pages.get("/images", response_class=HTMLResponse)
async def images_page(request: Request, creds: Operator, namespace: str | None = None,
                      cursor: str | None = None, limit: str | None = None) -> Response:
    async with connection(request, creds) as conn:
        page = await _images(conn, namespace, cursor, limit)
        me = await _me(conn, creds)
        visible = await q.namespaces(conn)
    base = [("namespace", namespace)] if namespace else []
    next_url = (f"/images?{urlencode([*base, ('cursor', page.next_cursor)])}"
                if page.next_cursor else None)
    return _render(request, "images.html", me=me, page=page, namespace=namespace or "",
                   namespaces=visible, next_url=next_url, page_name="images")


@pages.get("/artifacts/{name}")
async def artifact(request: Request, creds: Operator, name: str) -> Response:
    """An image, through the console: found first among the generations this role sees (a
    hash of another namespace is 404, like one that does not exist), then read from the
    artifact store. Content-addressed, so the hash is the ETag and it never changes."""
    digest = filters.content_hash(name.removesuffix(".png"))
    if not name.endswith(".png"):
        raise NotFound(f"{name[:100]}: no such image")
    async with connection(request, creds) as conn:
        if not await q.image_visible(conn, digest):
            raise NotFound(f"image {digest}: no such image (or not visible to this role)")
    headers = {"etag": f'"{digest}"', "cache-control": IMAGE_CACHE}
    if request.headers.get("if-none-match") in (f'"{digest}"', f'W/"{digest}"'):
        return Response(status_code=304, headers=headers)
    store = _config(request).artifacts
    try:
        data = await asyncio.to_thread(store.get, content_key(digest, ".png"))
    except FileNotFoundError:
        raise NotFound(f"image {digest}: recorded, but not in the artifact store at "
                       f"{store.uri}") from None
    return Response(data, media_type="image/png", headers=headers)


@pages.get("/failures", response_class=HTMLResponse)
async def failures_page(request: Request, creds: Operator, namespace: str | None = None,
                        limit: str | None = None) -> Response:
    async with connection(request, creds) as conn:
        ns, n = filters.namespace(namespace), filters.limit(limit, 100)
        rows = [Failure(**r) for r in await q.failures(conn, ns, n)]
        anomalies = [Anomaly(**r) for r in await q.anomalies(conn, ns, n)]
        me = await _me(conn, creds)
        visible = await q.namespaces(conn)
    return _render(request, "failures.html", me=me, failures=rows, anomalies=anomalies,
                   namespace=ns or "", namespaces=visible, page_name="failures")


@pages.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters_page(request: Request, creds: Operator,
                            topic: str = "requests") -> Response:
    async with connection(request, creds) as conn:
        me = await _me(conn, creds)
        letters = await _dead_letters(request, conn, topic)
    return _render(request, "dead_letters.html", me=me, letters=letters,
                   topics=filters.LOGICAL_TOPICS, page_name="dead-letters")


@pages.get("/dead-letters/{topic}/{partition}/{offset}", response_class=HTMLResponse)
async def replay_confirm(request: Request, creds: Operator, topic: str, partition: str,
                         offset: str) -> Response:
    """The confirmation page: what would be replayed, where to, and the button."""
    async with connection(request, creds) as conn:
        me = await _me(conn, creds)
        _, _, letter = await _one_letter(request, conn, topic, partition, offset)
    tokens: CsrfTokens = request.app.state.csrf
    token = tokens.issue(creds.role)
    origin_topic = letter.topic.removeprefix(f"{_config(request).topic_prefix}.")
    target = next((t for t in filters.LOGICAL_TOPICS if origin_topic == f"{t}.v1"), topic)
    response = _render(request, "replay_confirm.html", me=me, d=letter, csrf=token,
                       targets=filters.LOGICAL_TOPICS, target=target,
                       page_name="dead-letters")
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    response.headers["cache-control"] = "no-store"
    return response


@pages.post("/dead-letters/{topic}/{partition}/{offset}/replay", response_class=HTMLResponse)
async def replay(
    request: Request, creds: Operator, topic: str, partition: str, offset: str,
    to: Annotated[str, Form()] = "",
    confirm: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form(alias=CSRF_FIELD)] = "",
) -> Response:
    """Replay one dead letter, once: its original bytes and key, to the topic ``to`` names."""
    problem = origin_problem(request.headers.get("origin"), request.headers.get("referer"),
                             request.url.scheme, request.headers.get("host"))
    tokens: CsrfTokens = request.app.state.csrf
    problem = problem or tokens.problem(creds.role, request.cookies.get(CSRF_COOKIE), csrf)
    if problem is not None:
        raise Forbidden(f"replay refused: {problem}")
    if confirm != "yes":
        raise BadRequest("confirm: the replay was not confirmed")
    target = filters.logical_topic(to)
    config = _config(request)
    async with connection(request, creds) as conn:
        me = await _me(conn, creds)
        source, raw, d = await _one_letter(request, conn, topic, partition, offset)
    try:
        done = await replay_letters(config.bootstrap_servers,
                                    operator_url(config.database_url, creds), dlq_topic(source),
                                    [raw], config.topic(target), kafka=config.kafka)
    except StampflowError as err:
        if "permission denied" in str(err) or "row-level security" in str(err):
            raise Forbidden(f"replay refused by PostgreSQL: {err}") from None
        raise
    skipped = done.skipped[0].reason if done.skipped else None
    return _render(request, "replay_done.html", 200 if done.sent else 409, me=me, d=d,
                   target=config.topic(target), sent=bool(done.sent), skipped=skipped,
                   page_name="dead-letters")


# --- the app --------------------------------------------------------------------------------------


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _line(request: Request, status: int, line: str,
          headers: dict[str, str] | None = None) -> Response:
    line = " ".join(line.split())
    if _is_api(request):
        return JSONResponse({"detail": line}, status_code=status, headers=headers)
    return PlainTextResponse(line + "\n", status_code=status, headers=headers)


def create_app(config: ConsoleConfig, *, csrf_secret: bytes | None = None) -> FastAPI:
    """The console as an ASGI app. Its pools close when the app's lifespan ends."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await app.state.pools.close()

    app = FastAPI(title="stampflow console API", version="1",
                  description="Read-only JSON API of the stampflow operator console. Log in "
                  "with HTTP Basic: your PostgreSQL role and its password; row-level security "
                  "decides which namespaces you see.",
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.config = config
    app.state.pools = RolePools(config)
    app.state.csrf = CsrfTokens(csrf_secret)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else v
    templates.env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S") if v else ""
    templates.env.filters["ms"] = lambda v: "" if v is None else f"{v:,.1f} ms"
    app.state.templates = templates
    app.include_router(api)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(SecureHeaders)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> Response:
        return _line(request, 401, f"unauthorized: {exc}", {"www-authenticate": REALM})

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> Response:
        return _line(request, 503, str(exc))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return _line(request, 400, f"bad request: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return _line(request, 400, f"bad request: {where or 'request'}: "
                                   f"{first.get('msg', 'invalid')}")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return _line(request, 404, str(exc))

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return _line(request, 403, str(exc))

    @app.exception_handler(StampflowError)
    async def failed(request: Request, exc: StampflowError) -> Response:
        return _line(request, 502, str(exc))

    return app
