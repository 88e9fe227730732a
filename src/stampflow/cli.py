"""The ``stampflow`` command line. Every expected error is one line on stderr, exit code 1
(2 for a bad setting or argument). Text that comes from the data (reasons, errors, dead
letters) is printed as it is, never read as rich markup."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts.events import NAMESPACE_PATTERN
from contracts.nodes import ContractError
from stampflow.errors import StampflowError
from stampflow.observability import configure_logging, redact
from stampflow.services import Endpoints
from stampflow.settings import ServiceSource, Settings

T = TypeVar("T")

app = typer.Typer(
    help="stampflow: BLAKE3 stamping and image generation workflows over Kafka and PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
services_app = typer.Typer(help="The embedded PostgreSQL server and Kafka-protocol broker.",
                           no_args_is_help=True)
contracts_app = typer.Typer(help="Event and node contracts.", no_args_is_help=True)
submit_app = typer.Typer(help="Publish requests to Kafka.", no_args_is_help=True)
roles_app = typer.Typer(help="Operator database roles limited to namespaces.",
                        no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(contracts_app, name="contracts")
app.add_typer(submit_app, name="submit")
models_app = typer.Typer(help="Diffusers models for the inference effect node.",
                         no_args_is_help=True)
app.add_typer(roles_app, name="roles")
app.add_typer(models_app, name="models")
dlq_app = typer.Typer(help="Dead-letter topics: inspect and re-drive poison messages.",
                      no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
TopicOpt = Annotated[str, typer.Option("--topic", "-t",
                                       help="requests or events (the logical topic).")]

# Wide enough for the tables when the output goes to a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class UsageError(StampflowError):
    """A bad setting or argument: exit code 2, as for the command line's own usage errors."""


def _check_namespace(value: str | None) -> str | None:
    if value is not None and not NAMESPACE_PATTERN.fullmatch(value):
        raise StampflowError(
            f"{value!r}: not a valid namespace (lowercase letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return value


def _check_namespaces(values: list[str]) -> list[str]:
    for value in values:
        _check_namespace(value)
    return values


NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="The namespace.",
                                           callback=_check_namespace)]
NamespaceFilter = Annotated[str | None, typer.Option("--namespace", "-n",
                                                     help="Only this namespace.",
                                                     callback=_check_namespace)]


def settings() -> Settings:
    """The STAMPFLOW_* settings; a bad one is one line naming the variable (exit code 2)."""
    try:
        return Settings()
    except ValidationError as e:
        raise UsageError("; ".join(_setting_problem(problem) for problem in e.errors())) from None
    except SettingsError as e:  # a JSON setting that does not parse
        name = str(e).split('"')[1] if str(e).count('"') >= 2 else "?"
        raise UsageError(f"{_shown(name)}: not valid JSON") from None


def _shown(field: str) -> str:
    """``STAMPFLOW_FIELD=value`` as set in the environment (cut short, one line)."""
    name = f"STAMPFLOW_{field.upper()}"
    value = next((v for k, v in os.environ.items() if k.upper() == name), None)
    if value is None:
        return name
    value = redact(value).encode("unicode_escape").decode("ascii")
    return f"{name}={value[:80]}" + ("..." if len(value) > 80 else "")


def _setting_problem(problem: Any) -> str:
    field = str(problem["loc"][0]) if problem["loc"] else "?"
    ctx = problem.get("ctx") or {}
    kind = problem["type"]
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        sign, key = bounds[kind]
        what = f"must be {sign} {ctx.get(key)}"
    elif kind == "enum":
        what = f"must be one of {ctx.get('expected', '?')}".replace("'", "")
    elif kind in ("int_parsing", "int_from_float"):
        what = "must be an integer"
    elif kind == "float_parsing":
        what = "must be a number"
    elif kind == "bool_parsing":
        what = "must be true or false"
    elif kind == "value_error":
        what = str(ctx.get("error", problem["msg"]))
    else:
        what = str(problem["msg"])[:1].lower() + str(problem["msg"])[1:]
    return f"{_shown(field)}: {what}"


def _text(value: object) -> Text:
    """A table cell or line from the data: shown literally, never parsed as markup."""
    return Text("" if value is None else str(value))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def main() -> None:
    """Entry point: expected errors become one line and exit code 1, no traceback."""
    # Commands report failures themselves, as one line; nodes configure their own logs.
    configure_logging("WARNING", "json", libraries="CRITICAL")
    try:
        app()
    except (StampflowError, ContractError) as e:
        err.print(f"stampflow: {redact(str(e))}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


# --- services ---------------------------------------------------------------------------------


@services_app.command("up")
def services_up() -> None:
    """Start the embedded services in the background and print their addresses.

    The password is not printed: other stampflow commands read the URL from services.json in
    the state directory (mode 0600).
    """
    from stampflow.services import STATE_FILE, EmbeddedServices

    s = settings()
    endpoints = EmbeddedServices.start_detached(s.state_dir)
    out.print(f"PostgreSQL  {redact(endpoints.database_url)}", markup=False, highlight=False)
    out.print(f"Kafka       {endpoints.bootstrap_servers}", markup=False, highlight=False)
    out.print(f"credentials {s.state_dir.resolve() / STATE_FILE} (readable by its owner only)",
              markup=False, highlight=False)


@services_app.command("down")
def services_down() -> None:
    """Stop the embedded services started by `services up`."""
    from stampflow.services import EmbeddedServices

    stopped = EmbeddedServices.stop_from_state(settings().state_dir)
    out.print("stopped" if stopped else "no embedded services were running")


# --- schema and contracts -----------------------------------------------------------------------


@app.command("migrate")
def migrate_cmd(
    status: Annotated[bool, typer.Option("--status", help="List migrations, apply none.")] = False,
    lock_timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Seconds to wait for the migration lock (default: "
        "STAMPFLOW_MIGRATE_LOCK_TIMEOUT, 60).")] = None,
) -> None:
    """Apply pending SQL migrations (safe to run from several nodes at once)."""
    from stampflow import migrate as migrations

    s = settings()
    url = endpoints_for(s, need_broker=False).database_url
    if status:
        for migration, applied_at in run(migrations.status(url)):
            when = applied_at.isoformat() if applied_at else "pending"
            out.print(f"{migration.version:04d}  {migration.name:<30} {when}")
        return
    applied = run(migrations.migrate(url, lock_timeout=lock_timeout or s.migrate_lock_timeout))
    out.print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))


@contracts_app.command("export")
def contracts_export(directory: Path) -> None:
    """Write the JSON Schema of every event (and of the node contract format) to DIRECTORY."""
    from contracts.schema import export_schemas

    written = export_schemas(directory)
    out.print(f"wrote {len(written)} schema(s) to {directory}")


@contracts_app.command("check")
def contracts_check(
    directory: Annotated[Path | None, typer.Argument(help="Contracts directory.")] = None,
) -> None:
    """Load and validate every node contract (the built-in ones by default)."""
    from contracts.nodes import load_contracts

    for name, contract in load_contracts(directory).items():
        out.print(f"{name:<13} {contract.kind.value:<13} v{contract.version}  ok")


# --- stamping locally ----------------------------------------------------------------------------


@app.command("stamp")
def stamp_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories.")],
    namespace: NamespaceOpt = "default",
) -> None:
    """Stamp files locally with BLAKE3 and print one stamp line per file."""
    from nodes.stamping import StampError, StampingNode

    s = settings()
    node = StampingNode(Path("/"), max_bytes=s.max_content_bytes)
    failed = 0
    for path in _expand(paths):
        try:
            stamp = node.stamp_path(path.resolve(), namespace=namespace)
            out.print(f"{stamp.line()}  {path}", markup=False, highlight=False, soft_wrap=True)
        except StampError as e:
            err.print(f"stampflow: {e}", markup=False, highlight=False)
            failed += 1
    if failed:
        raise typer.Exit(1)


def _expand(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


# --- running nodes -------------------------------------------------------------------------------


EXIT_DEADLINE_S = 28.0


@contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``. Every step of a node's way out is bounded; as a last
    net, a process still alive ``EXIT_DEADLINE_S`` after the first signal exits anyway (its
    unacknowledged work is uncommitted and will be redone)."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            from stampflow.app import exit_deadline

            exit_deadline(EXIT_DEADLINE_S)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@app.command("run")
def run_cmd(node: Annotated[str, typer.Argument(help="orchestrator or reducer")]) -> None:
    """Run one node against the configured services until SIGTERM or Ctrl-C.

    Scale out by running more of these processes: they share one consumer group.
    """
    from stampflow.app import NODE_NAMES, run_nodes

    if node not in NODE_NAMES:
        raise StampflowError(f"{node}: no such node; choose one of {', '.join(NODE_NAMES)}")
    s = settings()
    configure_logging(s.log_level, s.log_format)
    endpoints = endpoints_for(s)

    async def main() -> None:
        stop = asyncio.Event()
        with _signals(stop):
            await run_nodes(s, endpoints, [node], stop)

    run(main())


@app.command("up")
def up_cmd() -> None:
    """Embedded services plus every node in one process, until Ctrl-C."""
    from stampflow.app import NODE_NAMES, run_nodes
    from stampflow.services import EmbeddedServices

    s = settings()
    configure_logging(s.log_level, s.log_format)
    with EmbeddedServices(s.state_dir) as services:
        endpoints = services.endpoints
        err.print(f"PostgreSQL {redact(endpoints.database_url)}  "
                  f"Kafka {endpoints.bootstrap_servers}", markup=False, highlight=False)

        async def main() -> None:
            stop = asyncio.Event()
            with _signals(stop):
                await run_nodes(s, endpoints, list(NODE_NAMES), stop)

        run(main())


@app.command("demo")
def demo_cmd(
    per_namespace: Annotated[int, typer.Option(help="Stamp requests per namespace.")] = 25,
    generations: Annotated[int, typer.Option(help="Generations per namespace.")] = 2,
) -> None:
    """The main job: stamp content and generate images in 4 namespaces, print the aggregates."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from stampflow.demo import run_demo

    s = settings()
    configure_logging("WARNING", "console")
    rows = run_demo(s, per_namespace=per_namespace, generations=generations, console=err)
    _print_summary(rows, title="stampflow demo: per-namespace aggregates")


# --- submitting ----------------------------------------------------------------------------------


@submit_app.command("stamp")
def submit_stamp(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (content root).")],
    namespace: NamespaceOpt = "default",
) -> None:
    """Publish one stamp request per file (directories are walked), with a progress bar."""
    from rich.progress import Progress

    from stampflow.client import Client

    s = settings()
    endpoints = endpoints_for(s)
    files = list(_expand(paths))
    if not files:
        raise StampflowError(f"{', '.join(map(str, paths))}: no files to submit")

    async def main() -> list[str]:
        async with Client(s, endpoints) as client:
            ids = []
            with Progress(console=err, transient=True) as progress:
                task = progress.add_task("submitting", total=len(files))
                for path in files:
                    ids.append(str(await client.submit_stamp(namespace, path=str(path))))
                    progress.advance(task)
            return ids

    ids = run(main())
    out.print(f"submitted {len(ids)} stamp request(s) to namespace {namespace}")


@submit_app.command("generate")
def submit_generate(
    prompt: str,
    namespace: NamespaceOpt = "default",
    seed: Annotated[int | None, typer.Option(help="Default: derived from the request id.")] = None,
    steps: Annotated[int, typer.Option(help="Inference steps.")] = 4,
    width: Annotated[int, typer.Option(help="A multiple of 16.")] = 512,
    height: Annotated[int, typer.Option(help="A multiple of 16.")] = 512,
    model: Annotated[str, typer.Option(help="A registered name (STAMPFLOW_MODELS).")]
    = "flux-schnell",
    negative_prompt: Annotated[str | None, typer.Option(help="Acts when --true-cfg > 1.")] = None,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 0.0,
    true_cfg: Annotated[float, typer.Option(help="True CFG scale (1: off).")] = 1.0,
) -> None:
    """Publish one image-generation request."""
    from pydantic import ValidationError

    from contracts.events import GenerationRequested
    from nodes.deadletter import one_line
    from stampflow.client import Client

    try:
        request = GenerationRequested(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=steps, guidance_scale=guidance, true_cfg_scale=true_cfg,
            seed=seed, model=model)
    except ValidationError as e:
        raise StampflowError(f"generation request: {one_line(e)}") from None
    s = settings()
    endpoints = endpoints_for(s)

    async def main() -> str:
        async with Client(s, endpoints) as client:
            return str(await client.submit_generation(namespace, request))

    request_id = run(main())
    out.print(f"submitted generation request {request_id} to namespace {namespace}")


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Path,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a tiny FluxPipeline with random weights, locally, and save it to DIRECTORY."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StampflowError(f"{directory}: cannot create it: {e.strerror or e}") from None
    from inference import make_tiny_flux

    try:
        path = make_tiny_flux(directory, seed=seed)
    except OSError as e:
        raise StampflowError(f"{directory}: cannot save the pipeline there: "
                             f"{e.strerror or e}") from None
    out.print(f"tiny FluxPipeline saved to {path}", markup=False, highlight=False)
    out.print(f'use it: STAMPFLOW_MODELS=\'{{"tiny": "{path}"}}\' and --model tiny', markup=False,
              highlight=False)


# --- operator queries ----------------------------------------------------------------------------


@app.command("status")
def status_cmd(namespace: NamespaceFilter = None) -> None:
    """Per-namespace aggregates (from the namespace_summary view)."""
    from stampflow.queries import summary

    rows = run(summary(endpoints_for(settings(), need_broker=False).database_url, namespace))
    _print_summary(rows, title="stampflow status")


@app.command("check")
def check_cmd(namespace: NamespaceFilter = None) -> None:
    """Recompute aggregates from the base rows and compare; exit 1 on any difference."""
    from stampflow.queries import connect
    from stampflow.reconcile import check

    url = endpoints_for(settings(), need_broker=False).database_url

    async def main() -> list[str]:
        conn = await connect(url)
        try:
            return [str(d) for d in await check(conn, namespace)]
        finally:
            await conn.close()

    differences = run(main())
    for line in differences:
        out.print(f"DIFFERS  {line}", markup=False, highlight=False)
    if differences:
        raise typer.Exit(1)
    out.print("consistent: stored aggregates equal those recomputed from the base rows")


@dlq_app.command("list")
def dlq_list(topic: TopicOpt = "requests",
             limit: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Show the records of <topic>.dlq: where each came from, why, and its first bytes."""
    from stampflow.dlq import read_dead_letters

    s = settings()
    letters = run(read_dead_letters(endpoints_for(s).bootstrap_servers, _topic(s, topic),
                                    limit=limit))
    table = Table("dlq offset", "from", "failed at", "node", "error", "value")
    for d in letters:
        table.add_row(*map(_text, (f"{d.dlq_partition}:{d.dlq_offset}",
                                   f"{d.topic}[{d.partition}]@{d.offset}", d.failed_at[:19],
                                   d.node, d.error[:60], repr(d.value[:40]))))
    out.print(table)
    out.print(f"{len(letters)} dead letter(s)")


@dlq_app.command("replay")
def dlq_replay(
    to: Annotated[str, typer.Option(
        "--to", help="requests or events: the topic to publish to (required; never taken "
        "from the dead letters).")],
    topic: TopicOpt = "requests",
    offset: Annotated[list[str] | None, typer.Option(
        help="PARTITION:OFFSET of a dead letter (repeatable); default: all.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replay letters replayed before, again.")] = False,
) -> None:
    """Publish dead letters' original bytes, with their keys, to the topic --to names (after a
    fix). Each letter once: dlq_replays records what was replayed, where, when and by whom."""
    from stampflow.dlq import read_dead_letters, replay

    s = settings()
    target = _topic(s, to)
    endpoints = endpoints_for(s)
    source = _topic(s, topic)
    letters = run(read_dead_letters(endpoints.bootstrap_servers, source))
    if offset:
        wanted = set(offset)
        letters = [d for d in letters if f"{d.dlq_partition}:{d.dlq_offset}" in wanted]
        found = {f"{d.dlq_partition}:{d.dlq_offset}" for d in letters}
        if wanted - found:
            raise StampflowError(f"{', '.join(sorted(wanted - found))}: no such dead letter in "
                                 f"{source}.dlq")
    done = run(replay(endpoints.bootstrap_servers, endpoints.database_url, f"{source}.dlq",
                      letters, target, force=force))
    for skipped in done.skipped:
        d = skipped.letter
        hint = " (--force replays it again)" if skipped.reason.startswith("replayed") else ""
        out.print(_text(f"skipped {d.dlq_partition}:{d.dlq_offset}: {skipped.reason}{hint}"))
    summary = f"replayed {len(done.sent)} dead letter(s) to {target}"
    if done.skipped:
        summary += f"; skipped {len(done.skipped)}"
    out.print(_text(summary))


def _topic(s: Settings, logical: str) -> str:
    if logical not in ("requests", "events"):
        raise UsageError(f"{logical}: not a topic; choose requests or events")
    return s.topic(logical)


@app.command("workflows")
def workflows_cmd(
    namespace: NamespaceFilter = None,
    state: Annotated[str | None, typer.Option("--state", "-s")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Recent workflows, newest first."""
    from stampflow.queries import workflows

    rows = run(workflows(endpoints_for(settings(), need_broker=False).database_url,
                         namespace, state, limit))
    table = Table("workflow", "namespace", "kind", "state", "outcome", "updated", "reason")
    for r in rows:
        table.add_row(*map(_text, (r["workflow_id"], r["namespace"], r["kind"], r["state"],
                                   r["outcome"], r["updated_at"].isoformat(timespec="seconds"),
                                   (r["reason"] or "")[:60])))
    out.print(table)


@app.command("workflow")
def workflow_cmd(workflow_id: str) -> None:
    """One workflow's transition history."""
    from stampflow.queries import history

    rows = run(history(endpoints_for(settings(), need_broker=False).database_url, workflow_id))
    table = Table("seq", "from", "to", "trigger", "at", "reason", title=_text(workflow_id))
    for r in rows:
        table.add_row(*map(_text, (r["seq"], r["from_state"], r["to_state"], r["trigger"],
                                   r["occurred_at"].isoformat(timespec="milliseconds"),
                                   r["reason"])))
    out.print(table)


@app.command("verify")
def verify_cmd(path: Path, namespace: NamespaceOpt = "default") -> None:
    """Is this exact content stamped in NAMESPACE? Exit 0 if yes, 1 if not."""
    from nodes.stamping import StampError, StampingNode
    from stampflow.queries import find_stamp

    s = settings()
    try:
        local = StampingNode(Path("/"), max_bytes=2**62).stamp_path(path.resolve(),
                                                                    namespace=namespace)
    except StampError as e:  # exit 1 means "not stamped": a file that cannot be read is not
        raise UsageError(str(e).replace(str(path.resolve()), str(path), 1)) from None
    row = run(find_stamp(endpoints_for(s, need_broker=False).database_url, namespace,
                         local.hash))
    if row is None:
        out.print(_text(f"NOT STAMPED  {path}  blake3:{local.hash}  (namespace {namespace})"))
        raise typer.Exit(1)
    out.print(_text(f"STAMPED  {path}  blake3:{local.hash}  size={row['size']}  "
                    f"at={row['stamped_at'].isoformat()}  namespace={namespace}"))


@roles_app.command("create")
def roles_create(
    role: str,
    namespace: Annotated[list[str], typer.Option("--namespace", "-n", help="Repeatable.",
                                                 callback=_check_namespaces)],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the login password from standard input (one line).")]
    = False,
    password_prompt: Annotated[bool, typer.Option(
        "--password-prompt", help="Ask for the login password (hidden, typed twice).")]
    = False,
) -> None:
    """Create (or extend) a login role that can read only the given namespaces.

    A password is never taken on the command line (other users see a process's arguments):
    give it on standard input or at the prompt. Without either the role keeps the password it
    has; a new one has none and cannot log in until it gets one.
    """
    from stampflow.queries import check_role_name, create_role

    check_role_name(role)
    if password_stdin and password_prompt:
        raise UsageError("--password-stdin and --password-prompt: choose one")
    password: str | None = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password_prompt:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if password is not None and not password:
        raise UsageError("the password is empty")
    url = endpoints_for(settings(), need_broker=False).database_url
    run(create_role(url, role, namespace, password))
    out.print(_text(f"role {role} may read namespace(s): {', '.join(namespace)}"))


def _print_summary(rows: list[dict[str, Any]], *, title: str) -> None:
    table = Table("namespace", "workflows", "completed", "failed", "in flight", "duplicates",
                  "stamps", "bytes", "generations", "pixels", "compute s", "anomalies",
                  title=title)
    for r in rows:
        table.add_row(*map(_text, (r["namespace"], r["workflows"], r["completed"], r["failed"],
                                   r["in_flight"], r["duplicates"], r["stamps"],
                                   f"{r['total_bytes']:,}", r["generations"],
                                   f"{r['total_pixels']:,}", f"{r['compute_seconds']:.2f}",
                                   r["anomalies"])))
    out.print(table)


def endpoints_for(s: Settings, *, need_broker: bool = True) -> Endpoints:
    """The services this command talks to: external ones, or the running embedded ones."""
    from stampflow.services import EmbeddedServices, external_endpoints

    if s.services is ServiceSource.EXTERNAL or s.database_url is not None:
        return external_endpoints(s, need_broker=need_broker)
    found = EmbeddedServices.read_state(s.state_dir)
    if found is None:
        raise StampflowError(
            f"{s.state_dir}: no embedded services running; start them with "
            "`stampflow services up`, or set STAMPFLOW_SERVICES=external with "
            "STAMPFLOW_DATABASE_URL and STAMPFLOW_BOOTSTRAP_SERVERS"
        )
    return found
