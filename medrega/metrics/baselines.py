"""Prior baselines that use no image: what a model scores by knowing only the training labels.

A tuned model has learned something from pixels only where it beats these:
- Region-to-Text: always answer the most common structure name (per language).
- Text-to-Region: for each name asked for, answer the mean training box of that name.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from medrega.grammar import format_region, parse_regions, ref_names
from medrega.vocab import canonical


class PriorBaseline:
    def __init__(self, train_records: Iterable[dict]):
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
        self.mean_box = {key: [round(sum(b[i] for b in bs) / len(bs)) for i in range(4)] for key, bs in boxes.items()}
        every = [b for bs in boxes.values() for b in bs]
        self.fallback_box = [round(sum(b[i] for b in every) / len(every)) for i in range(4)] if every else [0, 0, 999, 999]

    def answer(self, item: dict) -> str:
        if item["task"] == "r2t":
            return self.top_name.get(item.get("lang", "en"), next(iter(self.top_name.values()), ""))
        if item["task"] == "t2r":
            asked = ref_names(item["question"])
            return ", ".join(format_region(name, [self.mean_box.get(canonical(name) or name, self.fallback_box)])
                             for name in asked)
        raise ValueError(f"no prior baseline for task {item['task']!r}")
