"""Prior baselines that use no image: what a model scores by knowing only the training labels.

A tuned model has learned something from pixels only where it beats these:
- Region-to-Text: always answer the most common structure name (per language).
- Text-to-Region, mean box: for each name asked for, the mean training box of that name.
- Text-to-Region, digit mode: for each name, the box a blind language model decoding greedily
  would write: character by character, the most frequent next character among the training boxes
  of that name that share the prefix written so far (the hundreds digit first, then the tens...).
  It is what a model that ignores the image converges to, and it is not the mean box.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from medrega.grammar import format_region, parse_regions, ref_names
from medrega.vocab import canonical


def greedy_mode(texts: list[str]) -> str:
    """The string greedy decoding of the character distribution of `texts` writes: at each step
    the most frequent next character (or the end) among the texts that share the prefix so far;
    ties go to the smaller character, the end first."""
    prefix = ""
    while True:
        nxt = Counter(t[len(prefix)] if len(t) > len(prefix) else "" for t in texts if t.startswith(prefix))
        char = min(nxt, key=lambda c: (-nxt[c], c))
        if char == "":
            return prefix
        prefix += char


class PriorBaseline:
    """`kind`: "mean" (the mean box of a name) or "digit_mode" (greedy_mode over the box texts)."""

    def __init__(self, train_records: Iterable[dict], kind: str = "mean"):
        if kind not in ("mean", "digit_mode"):
            raise ValueError(f"unknown prior {kind!r}")
        names: dict[str, Counter] = defaultdict(Counter)
        boxes: dict[str, list[list[int]]] = defaultdict(list)
        for record in train_records:
            answer = record["conversations"][1]["value"]
            if record.get("task") == "r2t":
                names[record.get("lang", "en")][answer] += 1
            elif record.get("task") == "t2r":
                for name, box in parse_regions(answer).regions:
                    if name is not None:
                        boxes[canonical(name) or name].append(box)
        self.top_name = {lang: c.most_common(1)[0][0] for lang, c in names.items() if c}
        every = [b for bs in boxes.values() for b in bs]
        self.mean_box = {key: self._typical(bs, kind) for key, bs in boxes.items()}
        self.fallback_box = self._typical(every, kind) if every else [0, 0, 999, 999]

    @staticmethod
    def _typical(bs: list[list[int]], kind: str) -> list[int]:
        if kind == "mean":
            return [round(sum(b[i] for b in bs) / len(bs)) for i in range(4)]
        return [int(v) for v in greedy_mode([", ".join(map(str, b)) for b in bs]).split(", ")]

    def answer(self, item: dict) -> str:
        if item["task"] == "r2t":
            return self.top_name.get(item.get("lang", "en"), next(iter(self.top_name.values()), ""))
        if item["task"] == "t2r":
            asked = ref_names(item["question"])
            return ", ".join(format_region(name, [self.mean_box.get(canonical(name) or name, self.fallback_box)])
                             for name in asked)
        raise ValueError(f"no prior baseline for task {item['task']!r}")
