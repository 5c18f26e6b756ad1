"""`medrega import-checkpoint`: an InternVL remote-layout checkpoint into Hugging Face's format."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, echo_json, fail
from medrega.errors import MedregaError


@app.command("import-checkpoint")
def import_checkpoint(
    src: Path = typer.Argument(..., help="A local InternVL checkpoint in its own layout (InternVL-Chat-V1-2, "
                                         "MedRegA's released weights, InternVL 2.5 / 3): config.json, "
                                         "safetensors or .bin shards, tokenizer."),
    dst: Path = typer.Argument(..., help="The folder to write (appears whole or not at all)."),
    max_length: int = typer.Option(2048, help="Token limit recorded in the processor config."),
    system_message: Optional[str] = typer.Option(None, help="System message instead of the checkpoint's own."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
):
    """Convert SRC (no remote code is run) into DST, which `medrega evaluate --model DST`,
    `model.checkpoint` and plain from_pretrained load. Prints what was done (also in DST/medrega_import.json)."""
    from model.convert import import_checkpoint as convert

    try:
        summary = convert(src, dst, max_length=max_length, system_message=system_message, overwrite=overwrite)
    except MedregaError as err:  # CheckpointError: bad input, exit 3, the file and what was found named
        fail(err, "import-checkpoint")
    echo_json(summary)
