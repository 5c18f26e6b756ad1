"""Scoring: region-aligned evaluation, text, report and answer metrics, and their breakdowns."""

from collections import defaultdict
from collections.abc import Callable


def breakdown(samples: list[dict], keys: tuple[str, ...], aggregate: Callable[[list[dict]], dict]) -> dict:
    """`{"by_<key>": {value: aggregate(samples with that value)}}` over each sample's `groups`."""
    out = {}
    for key in keys:
        groups: dict = defaultdict(list)
        for s in samples:
            if s["groups"].get(key) is not None:
                groups[s["groups"][key]].append(s)
        out[f"by_{key}"] = {v: aggregate(g) for v, g in sorted(groups.items())}
    return out
