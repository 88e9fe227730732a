"""`stampflow roles`: operator login roles that can read only some namespaces."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from stampflow.cli.common import (
    UsageError,
    _check_namespaces,
    _text,
    endpoints_for,
    out,
    run,
    settings,
)

roles_app = typer.Typer(help="Operator database roles limited to namespaces.",
                        no_args_is_help=True)


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
    replay: Annotated[bool, typer.Option(
        "--replay", help="May also replay dead letters in the console (stampflow_replay).")]
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
    run(create_role(url, role, namespace, password, replay=replay))
    out.print(_text(f"role {role} may read namespace(s): {', '.join(namespace)}"
                    + ("; and replay dead letters" if replay else "")))
