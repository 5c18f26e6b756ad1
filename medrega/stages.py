"""The pipeline's stages in one table, and what each leaves behind.

Every stage command writes `<stage out>/result.json` (a `StageResult`: the stage, its headline
figures, its outputs) when it succeeds, and `.medrega/failures/<stage>.json` (medrega.errors)
when it stops on bad input or an unavailable service. The flow, `medrega status`, the CLI and the
tests read these files; nobody parses logs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from medrega import io
from medrega.config import Config

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...]   # what it writes under its `out` directory (DVC tracks these)
    doc: str


STAGES: tuple[Stage, ...] = (
    Stage("validate", ("report.json", "data_docs/"), "Great Expectations suites over the raw data"),
    Stage("materialize", ("meta_file.json", "meta_test.json", "summary.json", "quarantine.jsonl"),
          "raw data -> MedRegInstruct records and meta files"),
    Stage("align", ("model/", "train_summary.json"), "stage 1: the projector on captions"),
    Stage("tune", ("model/", "adapter/", "train_summary.json"), "stage 2: LoRA under DeepSpeed ZeRO-3"),
    Stage("evaluate", ("metrics.json", "breakdown.json", "answers.jsonl", "report.html"),
          "held-out answers, region-aligned evaluation"),
    Stage("register", ("registered.json",), "the model in the MLflow registry as challenger"),
)
NAMES = tuple(s.name for s in STAGES)
# figures too long for a headline (the full files are beside result.json)
_BULKY = ("log_history", "expectations", "failures")


class StageResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    outputs: list[str]
    summary: dict[str, Any]


def out_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.section(stage).out)


def write_result(cfg: Config, stage: str, summary: dict[str, Any], out: Path | None = None) -> StageResult:
    spec = next(s for s in STAGES if s.name == stage)
    folder = Path(out or out_dir(cfg, stage))
    # no profile name or time here: a downstream stage depends on some of these folders, and an
    # unchanged output must stay byte-identical
    result = StageResult(stage=stage, outputs=[str(folder / o) for o in spec.outputs],
                         summary={k: v for k, v in summary.items() if k not in _BULKY})
    io.write_text(folder / RESULT_FILE, result.model_dump_json(indent=2) + "\n")
    return result


def read_result(cfg: Config, stage: str) -> StageResult | None:
    path = out_dir(cfg, stage) / RESULT_FILE
    try:
        return StageResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
