"""`stampflow models`: diffusers models for the inference effect node."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from stampflow.cli.common import out
from stampflow.errors import StampflowError

models_app = typer.Typer(help="Diffusers models for the inference effect node.",
                         no_args_is_help=True)


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
    from stampflow.inference import make_tiny_flux

    try:
        path = make_tiny_flux(directory, seed=seed)
    except OSError as e:
        raise StampflowError(f"{directory}: cannot save the pipeline there: "
                             f"{e.strerror or e}") from None
    out.print(f"tiny FluxPipeline saved to {path}", markup=False, highlight=False)
    out.print(f'use it: STAMPFLOW_MODELS=\'{{"tiny": "{path}"}}\' and --model tiny', markup=False,
              highlight=False)
