"""Our instructions as upstream InternVL's trainer reads them, unchanged (`medrega export-meta --for
internvl DIR`).

Upstream's `build_datasets` (internvl_chat/internvl/train/internvl_chat_finetune.py) opens each
entry's `annotation` and joins `root` with each record's `image` as given, i.e. against its own
working directory, and the authors' copy calls `exit()` when a file is missing; it never reads
`base_prompt`; and its `preprocess` tokenizes with `truncation=True`, so a conversation longer than
`--max_seq_length` loses its end without a word. Our own meta files are relative to themselves
(medrega.metafile), which our loader resolves and theirs does not. So the export writes:

- `DIR/meta_file.json` (and `meta_test.json`): every `root` and `annotation` absolute, so the
  trainer finds them from any working directory; `length` the records kept; `max_dynamic_patch`
  the tile limit the length rule assumed (newer upstream code reads it per entry and it beats the
  command line; InternVL-Chat-V1-2's code ignores unknown keys);
- `DIR/annotations/<split>/<entry>.jsonl`: copies of the annotation files whose records change
  (a baked prompt, a quarantined record); unchanged files are referenced where they are;
- with `bake_base_prompt`, each record's base prompt written into its first human turn after
  `<image>\\n`, exactly once, as SPEC §1 composes it (`grammar.user_text`), and the entry's
  `base_prompt` emptied so that a trainer that does honour it cannot add it a second time;
- `DIR/quarantine.jsonl`: every record left out, with file, id, rule and detail; a record is never
  cut. `DIR/export.json`: counts, the tiling, and the trainer flags that tiling assumes.

The length rule counts what upstream will feed the model. No tokenizer of theirs is at hand, so
text is bounded by UTF-8 bytes, as our materialize rule is (a byte-level BPE never emits more
tokens than bytes; a SentencePiece model with byte fallback neither, but for one dummy-prefix piece
per span between special tokens, which the special tokens' own bytes, counted as text, more than
cover): the turns, the base prompt when it is not baked (a trainer that honours it prepends it),
and the chat template's framing (system message, role markers, separators) plus one BOS. Image
tokens follow upstream's `dynamic_preprocess`: the image is cut into a grid of `tile_size` tiles
whose aspect ratio is closest to the image's (ties go to the larger grid only when the image's area
exceeds half the grid's), plus a thumbnail when the grid has more than one tile; each tile is
`tokens_per_tile` `<IMG_CONTEXT>` tokens, and `<img>`/`</img>` add two.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from medrega import grammar, io, metafile
from medrega.errors import BadInput
from medrega.images import ImageRefused, header

META_FILES = (("meta_file.json", "train"), ("meta_test.json", "test"))
SUMMARY = "export.json"
QUARANTINE = "quarantine.jsonl"

R_FITS = "text and image tokens within max_seq_length"
R_IMAGE = "image file readable"
R_JSONL = "annotation is a .jsonl file"
R_REPEAT = "repeat_time is a whole number"
R_RECORD = "annotation line is a record"


@dataclass(frozen=True)
class Tiling:
    """How an upstream InternVL turns one image into tokens, and the chat template it frames text with."""

    name: str
    template: str            # upstream's --conv_style
    system_message: str      # that template's system message (part of every sequence)
    separator: str           # that template's turn separator
    dynamic: bool = False    # --dynamic_image_size
    min_tiles: int = 1       # --min_dynamic_patch
    max_tiles: int = 1       # --max_dynamic_patch (written per entry as max_dynamic_patch)
    thumbnail: bool = False  # --use_thumbnail
    tile_size: int = 448     # --force_image_size
    tokens_per_tile: int = 256  # (tile_size / patch 14)^2 x down_sample_ratio 0.5^2

    def trainer_flags(self, max_seq_length: int) -> str:
        flags = [f"--conv_style {self.template}", f"--force_image_size {self.tile_size}", "--down_sample_ratio 0.5",
                 f"--max_seq_length {max_seq_length}"]
        if self.dynamic:
            flags += ["--dynamic_image_size True", f"--use_thumbnail {self.thumbnail}",
                      f"--min_dynamic_patch {self.min_tiles}", f"--max_dynamic_patch {self.max_tiles}"]
        return " ".join(flags)


# System messages as upstream's conversation.py registers them (ChatML framing in both).
_HERMES_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_INTERNVL25_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
TILINGS = {
    # what MedRegA was tuned from (SPEC §5): one 448 px tile, 256 image tokens, Hermes-2 chat
    "internvl-chat-v1-2": Tiling("internvl-chat-v1-2", "Hermes-2", _HERMES_SYSTEM, "<|im_end|>"),
    # InternVL 2.5 and 3 fine-tuning scripts: up to 6 tiles plus a thumbnail
    "internvl2.5": Tiling("internvl2.5", "internvl2_5", _INTERNVL25_SYSTEM, "<|im_end|>\n",
                          dynamic=True, max_tiles=6, thumbnail=True),
}
TILINGS["internvl3"] = replace(TILINGS["internvl2.5"], name="internvl3")


def tiling(name: str, max_tiles: int | None = None) -> Tiling:
    """A named tiling, optionally with another tile limit."""
    if name not in TILINGS:
        raise BadInput(f"unknown tiling {name!r} (known: {', '.join(TILINGS)})")
    t = TILINGS[name]
    if max_tiles is None:
        return t
    if max_tiles < t.min_tiles or (not t.dynamic and max_tiles != 1):
        raise BadInput(f"--max-tiles {max_tiles}: {name} takes " + ("1 (one tile, no dynamic tiling)" if not t.dynamic
                                                                    else f"at least {t.min_tiles}"))
    return replace(t, max_tiles=max_tiles)


# -- what upstream feeds the model ----------------------------------------------------------------

def tile_grid(width: int, height: int, t: Tiling) -> tuple[int, int]:
    """(columns, rows) upstream's `dynamic_preprocess` cuts a width x height image into."""
    if not t.dynamic:
        return 1, 1
    aspect = width / height
    # the candidate grids in upstream's order: a set of (cols, rows), sorted (stably) by tile count
    grids = sorted({(c, r) for n in range(t.min_tiles, t.max_tiles + 1) for c in range(1, n + 1)
                    for r in range(1, n + 1) if t.min_tiles <= c * r <= t.max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * t.tile_size * t.tile_size * cols * rows:
            best = (cols, rows)  # an equally close, larger grid only when the image is big enough to fill it
    return best


def n_tiles(width: int, height: int, t: Tiling) -> int:
    cols, rows = tile_grid(width, height, t)
    return cols * rows + (1 if t.thumbnail and cols * rows != 1 else 0)


def image_tokens(width: int, height: int, t: Tiling) -> int:
    """`<img>` + tiles x tokens_per_tile `<IMG_CONTEXT>` + `</img>`."""
    return n_tiles(width, height, t) * t.tokens_per_tile + 2


def framing_bytes(t: Tiling) -> int:
    """UTF-8 bytes the chat template adds around one human/gpt exchange, plus one for a BOS."""
    framing = (f"<|im_start|>system\n{t.system_message}{t.separator}<|im_start|>user\n{t.separator}"
               f"<|im_start|>assistant\n{t.separator}")
    return len(framing.encode("utf-8")) + 1


def bake(question: str, base: str | None) -> str:
    """The first human turn with the base prompt after `<image>\\n` (SPEC §1), exactly once: a turn
    that already carries it (baked before, or a source that ships it there) is left as it is."""
    if not base or base in question:
        return question
    return grammar.user_text(question, base)


@lru_cache(maxsize=1 << 16)
def _image_size(path: str) -> tuple[int, int]:
    """Header size of the file upstream opens (`Image.open(os.path.join(root, image))`)."""
    _, width, height = header(Path(path))
    return width, height


def check_record(rec: dict, root: Path, base: str | None, baked: bool, t: Tiling, max_seq_length: int
                 ) -> tuple[str, str] | None:
    """(rule, detail) when upstream could not take the record whole, else None."""
    try:
        width, height = _image_size(str(Path(root) / rec["image"]))
    except ImageRefused as err:
        return R_IMAGE, f"{Path(root) / rec['image']}: {err.detail}"
    text = sum(len(turn["value"].encode("utf-8")) for turn in rec["conversations"])
    prompt = 0 if baked or not base else len(base.encode("utf-8")) + 1  # + the space user_text puts after it
    frame, image = framing_bytes(t), image_tokens(width, height, t)
    total = text + prompt + frame + image
    if total <= max_seq_length:
        return None
    return R_FITS, (f"{text + prompt} text bytes (bound on tokens; base prompt {'baked' if baked else 'included'}) + "
                    f"{frame} template framing + {image} image tokens ({n_tiles(width, height, t)} tiles of a "
                    f"{width}x{height} image, {t.name}) = {total} > max_seq_length {max_seq_length}")


def _records(path: Path):
    """(line, record) of an annotation file; a line that is not a record is an error (our own
    files, validated when written: a bad line means the file was damaged since)."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = io.loads_json(raw.decode("utf-8"), path, lineno)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BadInput(f"{path}:{lineno}: rule '{R_RECORD}' failed: {err}") from None
            conv = rec.get("conversations") if isinstance(rec, dict) else None
            if not (isinstance(rec.get("image"), str) and isinstance(conv, list) and conv
                    and all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in conv)):
                raise BadInput(f"{path}:{lineno}: rule '{R_RECORD}' failed: need an image and conversations")
            yield lineno, rec


def _check_entry(meta: Path, name: str, entry: dict, t: Tiling) -> None:
    """What upstream's build_datasets asserts or assumes of an entry, checked before anything is written."""
    if not str(entry["annotation"]).endswith("jsonl"):  # upstream: assert meta['annotation'].endswith('jsonl')
        raise BadInput(f"{meta} (entry {name}): rule '{R_JSONL}' failed: {entry['annotation']}")
    repeat = entry.get("repeat_time", 1)
    if not t.dynamic and (isinstance(repeat, bool) or not float(repeat).is_integer()):
        # InternVL-Chat-V1-2's build_datasets repeats with range(repeat_time): a fraction stops it
        raise BadInput(f"{meta} (entry {name}): rule '{R_REPEAT}' failed: repeat_time {repeat!r} "
                       f"({t.name}'s trainer takes whole repeats only)")


def _export_entry(name: str, entry: dict, split: str, final: Path, work: Path, opts: dict) -> tuple[dict, list]:
    """(the exported entry, its quarantine rows); the annotation is copied only when records change."""
    t, baked_any, base = opts["tiling"], False, entry.get("base_prompt")
    source = Path(entry["annotation"]).resolve()
    kept, quarantined = [], []
    for _, rec in _records(source):
        if opts["bake"] and base:
            question = rec["conversations"][0]["value"]
            baked = bake(question, base)
            if baked != question:
                rec = {**rec, "conversations": [{**rec["conversations"][0], "value": baked}, *rec["conversations"][1:]]}
                baked_any = True
        problem = check_record(rec, Path(entry["root"]), base, opts["bake"], t, opts["max_seq_length"])
        if problem:
            quarantined.append({"file": str(source), "id": rec.get("id"), "rule": problem[0], "detail": problem[1],
                                "entry": name})
        else:
            kept.append(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    annotation = source
    if baked_any or quarantined:
        rel = Path("annotations") / split / f"{name}.jsonl"
        io.write_text(work / rel, "".join(kept))
        annotation = final / rel  # where it will be once the export is renamed into place
    out = {**entry, "root": str(Path(entry["root"]).resolve()), "annotation": str(annotation), "length": len(kept),
           "max_dynamic_patch": t.max_tiles}
    if not t.dynamic:  # range(repeat_time) upstream: 1.0 would stop it as surely as 0.5
        out["repeat_time"] = int(entry.get("repeat_time", 1))
    if opts["bake"] and base:
        out["base_prompt"] = None  # it is in every human turn now: a trainer that honours it must not add it again
    return out, quarantined


def _export_meta(meta: Path, split: str, final: Path, work: Path, opts: dict) -> tuple[dict, list, dict]:
    """(exported entries, quarantine rows, counts) of one meta file."""
    entries = metafile.read(meta)
    for name, entry in entries:
        _check_entry(meta, name, entry, opts["tiling"])
    exported, quarantine, dropped = {}, [], []
    for name, entry in entries:
        out, rows = _export_entry(name, entry, split, final, work, opts)
        quarantine += rows
        if out["length"]:
            exported[name] = out
        else:  # upstream cannot index an empty dataset (i % len): left out, and said so
            dropped.append(name)
    counts = {"entries": len(exported), "records": sum(e["length"] for e in exported.values()),
              "quarantined": len(quarantine), "dropped_entries": dropped}
    return exported, quarantine, counts


def _guard(out_dir: Path, instructions: Path) -> None:
    """The export replaces `out_dir` whole: refuse a folder that is not an earlier export."""
    inside = {out_dir.resolve(), *out_dir.resolve().parents}
    if instructions.resolve() in inside or out_dir.resolve() in instructions.resolve().parents:
        raise BadInput(f"{out_dir}: the export would replace, or write into, the instructions it reads ({instructions})")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / SUMMARY).is_file())):
        raise BadInput(f"{out_dir}: exists and is not an earlier export (no {SUMMARY}); give an empty or new folder")


def export_internvl(instructions: Path, out_dir: Path, t: Tiling, max_seq_length: int = 2048,
                    bake_base_prompt: bool = False, max_quarantine_share: float = 0.01) -> dict[str, Any]:
    """Write the export of `instructions` (a materialize output) into `out_dir`; return its summary.
    Built beside `out_dir` and renamed into place: a refused export leaves nothing behind."""
    instructions, out_dir = Path(instructions), Path(out_dir)
    metas = [(instructions / name, split) for name, split in META_FILES if (instructions / name).is_file()]
    if not metas:
        raise BadInput(f"{instructions}: no {' or '.join(n for n, _ in META_FILES)} (give a materialize output)")
    _guard(out_dir, instructions)
    _image_size.cache_clear()  # sizes are read afresh for every export
    final = out_dir.resolve()
    opts = {"tiling": t, "bake": bake_base_prompt, "max_seq_length": max_seq_length}
    summary: dict[str, Any] = {"for": "internvl", "instructions": str(instructions.resolve()), "tiling": asdict(t),
                               "max_seq_length": max_seq_length, "bake_base_prompt": bake_base_prompt,
                               "trainer_flags": t.trainer_flags(max_seq_length), "meta_files": {}}
    quarantine: list[dict] = []
    with io.atomic_dir(out_dir) as work:
        for meta, split in metas:
            exported, rows, counts = _export_meta(meta, split, final, work, opts)
            io.write_json(work / meta.name, exported)
            quarantine += rows
            summary["meta_files"][meta.name] = counts
        total = len(quarantine) + sum(c["records"] for c in summary["meta_files"].values())
        share = len(quarantine) / total if total else 0.0
        summary.update(quarantined=len(quarantine), quarantine_share=share,
                       by_rule={r: sum(q["rule"] == r for q in quarantine) for r in sorted({q["rule"] for q in quarantine})})
        if share > max_quarantine_share or not total:
            first = "; ".join(f"{q['file']} (record {q['id']}): rule '{q['rule']}' failed ({q['detail']})"
                              for q in quarantine[:3])
            raise BadInput(f"{instructions}: {len(quarantine)} of {total} records would not reach {t.name} whole "
                           f"(share {share:.4f} > allowed {max_quarantine_share}); nothing written. First: {first}")
        io.write_jsonl(work / QUARANTINE, quarantine)
        io.write_json(work / SUMMARY, summary)
    return summary
