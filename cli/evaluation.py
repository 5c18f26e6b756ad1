"""`medrega score`: score any answers file offline, ours or the authors' released format."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.app import app, fail
from medrega.errors import BadInput


@app.command()
def score(
    answers: Path = typer.Argument(..., help="Answers JSONL: one line per sample."),
    task: Optional[str] = typer.Option(None, help="t2r|r2t|grounded|vqa|report|caption|cls; "
                                                  "required when lines carry no task."),
    format: str = typer.Option("native", "--format", help="native, or medrega: the released "
                                                          'evaluator\'s {"answer", "gt", "hw": [H, W]} lines.'),
    out: Path = typer.Option(Path("metrics.json"), help="Where to write the metrics (JSON)."),
    threshold: float = typer.Option(0.5, help="IoU at which a region counts as detected (inclusive)."),
    name_match: str = typer.Option("strict", help="strict, or lenient: the released substring rule."),
    wordnet: Optional[Path] = typer.Option(None, help="Local WordNet directory for METEOR "
                                                      "(default: $MEDREGA_WORDNET, then nltk_data on disk)."),
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="NAME=LOCAL_MODEL_DIR: compute a metric "
                                               "that needs model weights (bertscore, chexbert, radgraph: see "
                                               "the README). Repeatable. Local files only; a plug-in that cannot "
                                               "load exits 3."),
):
    """Score an answers file (no model, no network) and write metrics.json."""
    import json

    from medrega import io
    from medrega.metrics.plugins import load_plugins, parse_plugin_args
    from medrega.metrics.region import read_answers
    from medrega.metrics.report import find_wordnet
    from medrega.metrics.scoring import TASKS, score_answers
    from medrega.vocab import names_match, names_match_lenient

    try:
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        if name_match not in ("strict", "lenient"):
            raise ValueError(f"--name-match must be strict or lenient, not {name_match!r}")
        loaded = load_plugins({}, parse_plugin_args(plugin or []))  # before scoring: fail fast
        items = read_answers(answers, format)
        match = names_match_lenient if name_match == "lenient" else names_match
        result = score_answers(items, task, match, threshold, find_wordnet(wordnet), loaded)
    except (BadInput, ValueError, FileNotFoundError) as err:  # what the reader says of the file
        fail(err if isinstance(err, BadInput) else BadInput(str(err)), "score")
    io.write_json(out, result)
    typer.echo(json.dumps({t: {k: v for k, v in m.items() if k != "by"} for t, m in result.items()},
                          indent=2, ensure_ascii=False))
