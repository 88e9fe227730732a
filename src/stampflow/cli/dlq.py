"""`stampflow dlq`: list dead letters and replay them to a topic."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from stampflow.cli.common import UsageError, _text, endpoints_for, out, run, settings
from stampflow.errors import StampflowError
from stampflow.nodes.deadletter import dlq_topic
from stampflow.settings import Settings

dlq_app = typer.Typer(help="Dead-letter topics: inspect and re-drive poison messages.",
                      no_args_is_help=True)

TopicOpt = Annotated[str, typer.Option("--topic", "-t",
                                       help="requests or events (the logical topic).")]


@dlq_app.command("list")
def dlq_list(topic: TopicOpt = "requests",
             limit: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Show the records of <topic>.dlq: where each came from, why, and its first bytes."""
    from stampflow.dlq import read_dead_letters

    s = settings()
    endpoints = endpoints_for(s)
    letters = run(read_dead_letters(endpoints.bootstrap_servers, _topic(s, topic),
                                    limit=limit, kafka=endpoints.kafka))
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
    letters = run(read_dead_letters(endpoints.bootstrap_servers, source,
                                    kafka=endpoints.kafka))
    if offset:
        wanted = set(offset)
        letters = [d for d in letters if f"{d.dlq_partition}:{d.dlq_offset}" in wanted]
        found = {f"{d.dlq_partition}:{d.dlq_offset}" for d in letters}
        if wanted - found:
            raise StampflowError(f"{', '.join(sorted(wanted - found))}: no such dead letter in "
                                 f"{dlq_topic(source)}")
    done = run(replay(endpoints.bootstrap_servers, endpoints.database_url, dlq_topic(source),
                      letters, target, force=force, kafka=endpoints.kafka))
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
