"""`stampflow stamp`: stamp files locally with BLAKE3, no services needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stampflow.cli.common import NamespaceOpt, _expand, err, out, settings


def stamp_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories.")],
    namespace: NamespaceOpt = "default",
) -> None:
    """Stamp files locally with BLAKE3 and print one stamp line per file."""
    from stampflow.nodes.stamping import StampError, StampingNode

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
