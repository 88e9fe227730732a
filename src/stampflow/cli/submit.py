"""`stampflow submit`: publish stamp and image-generation requests to Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stampflow.cli.common import NamespaceOpt, _expand, endpoints_for, err, out, run, settings
from stampflow.errors import StampflowError

submit_app = typer.Typer(help="Publish requests to Kafka.", no_args_is_help=True)


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

    from stampflow.client import Client
    from stampflow.contracts.events import GenerationRequested
    from stampflow.nodes.deadletter import one_line

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
