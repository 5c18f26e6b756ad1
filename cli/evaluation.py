"""`medrega score`: score any answers file offline, ours or the authors' released format."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.app import app, fail
from medrega.errors import BadInput


@app.command()
def score(
    answers: List[Path] = typer.Argument(..., help="Answers files: JSON lines or one JSON array (the authors' format). "
                                                   "Several files are scored together (release: as their script does)."),
    task: Optional[str] = typer.Option(None, help="t2r|r2t|grounded|vqa|report|caption|cls; "
                                                  "required when lines carry no task."),
    format: str = typer.Option("native", "--format", help="native, or medrega: the authors' records "
                                                          '({"answer", "gt", "hw": [H, W]}; {"pred_answer", "gt_answer"}).'),
    protocol: str = typer.Option("medrega", help="medrega (ours, SPEC §6) or release: the authors' released "
                                                 "evaluator reproduced, defects included (docs/evaluation-protocols.md)."),
    setting: Optional[str] = typer.Option(None, help="SS|SM|MS|MM (ours: SM = single object, multi region). "
                                                     "release t2r: picks their script; medrega: the setting of "
                                                     "records that carry none."),
    lang: Optional[str] = typer.Option(None, help="release report/vqa: en|zh (default: their rule, 'zh' in the "
                                                  "file's dataset name)."),
    dataset: Optional[str] = typer.Option(None, help="release cls: their dataset name, e.g. isic2016_test "
                                                     "(default: from the file name, as theirs)."),
    out: Path = typer.Option(Path("metrics.json"), help="Where to write the metrics (JSON)."),
    threshold: float = typer.Option(0.5, help="IoU at which a region counts as detected (inclusive)."),
    name_match: str = typer.Option("strict", help="strict, or lenient: substring either way after normalisation "
                                                  "(not the authors' rule: that is --protocol release)."),
    wordnet: Optional[Path] = typer.Option(None, help="Local WordNet directory for METEOR "
                                                      "(default: $MEDREGA_WORDNET, then nltk_data on disk)."),
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="NAME=LOCAL_MODEL_DIR: compute a metric "
                                               "that needs model weights (bertscore, chexbert, radgraph: see "
                                               "the README). Repeatable. Local files only; a plug-in that cannot "
                                               "load exits 3."),
):
    """Score answers files (no model, no network) and write metrics.json."""
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
        if protocol not in ("medrega", "release"):
            raise ValueError(f"--protocol must be medrega or release, not {protocol!r}")
        if setting is not None and setting not in ("SS", "SM", "MS", "MM"):
            raise ValueError(f"--setting must be SS, SM, MS or MM (ours: SM = single object, multi region), not {setting!r}")
        if lang is not None and lang not in ("en", "zh"):
            raise ValueError(f"--lang must be en or zh, not {lang!r}")
        if name_match not in ("strict", "lenient"):
            raise ValueError(f"--name-match must be strict or lenient, not {name_match!r}")
        loaded = load_plugins({}, parse_plugin_args(plugin or []))  # before scoring: fail fast
        if protocol == "release":
            from medrega.metrics.release import score_files

            if task is None:
                raise ValueError("--protocol release needs --task (one of their scripts per task)")
            if task == "t2r" and setting is None:
                raise ValueError("--protocol release --task t2r needs --setting SS|SM|MS|MM (one script per setting)")
            result = score_files(answers, task, setting, lang, dataset, find_wordnet(wordnet), loaded.get("bertscore"))
            shown = {k: v for k, v in result.items() if k != "files"}
        else:
            items = [item for path in answers for item in read_answers(path, format)]
            if setting is not None:
                for item in items:
                    item.setdefault("setting", setting)
            match = names_match_lenient if name_match == "lenient" else names_match
            result = {"protocol": "medrega", "files": [str(p) for p in answers],
                      **score_answers(items, task, match, threshold, find_wordnet(wordnet), loaded)}
            shown = {t: {k: v for k, v in m.items() if k != "by"} if isinstance(m, dict) else m
                     for t, m in result.items() if t != "files"}
    except (ValueError, OSError, UnicodeDecodeError) as err:  # what the readers say of the files (BadInput included)
        fail(err if isinstance(err, BadInput) else BadInput(str(err)), "score")
    io.write_json(out, result)
    typer.echo(json.dumps(shown, indent=2, ensure_ascii=False))
