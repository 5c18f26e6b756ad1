"""`medrega export-meta`: our instructions in a form another trainer reads unchanged."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import ConfigOpt, ParamsOpt, ProfileOpt, app, echo_json, fail, load
from medrega.errors import BadInput, MedregaError


@app.command("export-meta")
def export_meta(
    out: Path = typer.Argument(..., help="Folder to write (new, empty, or an earlier export: it is replaced whole)."),
    target: str = typer.Option(..., "--for", help="The trainer: internvl (upstream OpenGVLab/InternVL's "
                                                  "internvl_chat_finetune.py, and the authors' copy)."),
    instructions: Optional[Path] = typer.Option(None, help="A materialize output (default: materialize.out)."),
    tiling: str = typer.Option("internvl-chat-v1-2", help="How the trainer tiles images: internvl-chat-v1-2 (one "
                                                          "448 px tile, 256 tokens; MedRegA's base), internvl2.5 or "
                                                          "internvl3 (up to 6 tiles + a thumbnail)."),
    max_tiles: Optional[int] = typer.Option(None, help="Another tile limit (--max_dynamic_patch) for a dynamic tiling."),
    max_seq_length: int = typer.Option(2048, help="The trainer's --max_seq_length: a record that would exceed it "
                                                  "(text bytes + template + image tokens) is quarantined, never cut."),
    bake_base_prompt: bool = typer.Option(False, "--bake-base-prompt", help="Write each record's base prompt into "
                                          "its human turn (after <image>), for trainers that ignore base_prompt."),
    max_quarantine_share: Optional[float] = typer.Option(None, help="Refuse the export above this share of "
                                                         "quarantined records (default: materialize.max_quarantine_share)."),
    config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
):
    """Write a meta file (absolute paths) and annotation copies that upstream InternVL trains on as they are."""
    from medrega.export import export_internvl, tiling as pick

    cfg = load(config, params, profile)
    try:
        if target != "internvl":
            raise BadInput(f"--for {target!r}: the one export is 'internvl'")
        summary = export_internvl(instructions or cfg.materialize.out, out, pick(tiling, max_tiles), max_seq_length,
                                  bake_base_prompt, cfg.materialize.max_quarantine_share
                                  if max_quarantine_share is None else max_quarantine_share)
    except MedregaError as err:
        fail(err, "export-meta")
    echo_json(summary)
