"""What every command shares: the consoles, the one-line errors (UsageError), the
STAMPFLOW_* settings with their one-line problems, the namespace options, the services a
command talks to, and small printing helpers. Imports no other module of this package."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stampflow.contracts.events import NAMESPACE_PATTERN
from stampflow.errors import StampflowError
from stampflow.observability import redact
from stampflow.services import Endpoints
from stampflow.settings import ServiceSource, Settings

T = TypeVar("T")

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
    if not problem["loc"] and problem["type"] == "value_error":
        # A check across settings (the Kafka security ones): its message names them.
        return str((problem.get("ctx") or {}).get("error", problem["msg"]))
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


def _expand(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


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
