"""Generation on many ranks: each rank answers a deterministic share of the held-out queries.

Runs on every rank under torchrun or Slurm (tasks/evaluate.py launches it with `evaluate.launcher`):
`python -m model.recipes.generate --config RESOLVED --model DIR --work DIR`. Every rank reads the
queries the stage wrote (`queries.jsonl`, in item order), computes the same batch plan from the
prompts alone (model.infer.batches), and generates the batches k, k + W, k + 2W, ... of it, so
each batch holds exactly the rows it holds in a one-process run and the answers are the same. A
rank writes `answers-<k>-of-<W>.jsonl` (`{"index", "answer"}` lines) whole or not at all; the
stage merges them in item order and refuses a merge that misses or repeats an item.

No collective runs between ranks: a rank needs nothing from another, and the launcher fails the
whole job when one rank fails.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from medrega import config as config_mod
from medrega import io
from medrega.config import Config
from medrega.errors import MedregaError
from model.infer import Generator, Query, batches
from model.training import world

QUERIES = "queries.jsonl"
_ANSWERS = re.compile(r"answers-(\d{5})-of-(\d{5})\.jsonl")


class MergeError(MedregaError):
    """The ranks' answers do not cover the queries exactly once (a bug, or files from another run)."""


def write_queries(work: Path, queries: list[Query]) -> Path:
    rows = [{"image": str(q.image), "question": q.question, "base_prompt": q.base_prompt} for q in queries]
    io.write_jsonl(Path(work) / QUERIES, rows)
    return Path(work) / QUERIES


def read_queries(work: Path) -> list[Query]:
    lines = (Path(work) / QUERIES).read_text(encoding="utf-8").splitlines()
    return [Query(Path(r["image"]), r["question"], r["base_prompt"]) for r in map(json.loads, lines)]


def answers_file(work: Path, rank: int, world_size: int) -> Path:
    return Path(work) / f"answers-{rank:05d}-of-{world_size:05d}.jsonl"


def run(cfg: Config, model_dir: Path, work: Path) -> Path:
    rank, world_size = world()
    queries = read_queries(work)
    generator = Generator.from_pretrained(model_dir, cfg.model.dtype, cfg.model.device_map)
    encoded = generator.encode(queries)
    plan = batches([len(e) for e in encoded], cfg.evaluate.batch_size)
    answers = generator.generate_batches(queries, plan[rank::world_size], cfg.evaluate.max_new_tokens,
                                         encoded=encoded)
    out = answers_file(work, rank, world_size)
    io.write_jsonl(out, [{"index": i, "answer": answers[i]} for i in sorted(answers)])
    return out


def merge(work: Path, count: int) -> list[str]:
    """The answers of every rank's file, in item order; refuses gaps, repeats and mixed runs."""
    files = sorted(p for p in Path(work).iterdir() if _ANSWERS.fullmatch(p.name))
    worlds = {int(_ANSWERS.fullmatch(p.name)[2]) for p in files}
    if len(worlds) != 1 or len(files) != next(iter(worlds)):
        raise MergeError(f"{work}: expected one answers file per rank of one run, found {[p.name for p in files]}")
    answers: dict[int, str] = {}
    for path in files:
        for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            if row["index"] in answers:
                raise MergeError(f"{path}: item {row['index']} was answered by two ranks")
            answers[row["index"]] = row["answer"]
    missing = sorted(set(range(count)) - set(answers))
    extra = sorted(set(answers) - set(range(count)))
    if missing or extra:
        raise MergeError(f"{work}: answers missing for items {missing[:10]}, unexpected items {extra[:10]}")
    return [answers[i] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate this rank's share of the held-out answers.")
    parser.add_argument("--config", type=Path, required=True, help="A resolved config (params.resolved.yaml).")
    parser.add_argument("--model", type=Path, required=True, help="A Hugging Face InternVL folder with its processor.")
    parser.add_argument("--work", type=Path, required=True, help="Holds queries.jsonl; the answers go beside it.")
    a = parser.parse_args(argv)
    run(config_mod.load_resolved(a.config), a.model, a.work)


if __name__ == "__main__":
    main()
