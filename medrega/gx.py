"""Great Expectations 1.x, run one way for every suite of the pipeline.

A suite is a list of `Rule`s over one pandas frame: the rule's name (what a failure reports),
the GX expectation, and how to describe an offending row. `run` validates every frame in one
ephemeral context through checkpoints, optionally building GX data docs, and returns each
expectation's result and one `Failure` per offending row, naming the frame's `file` column.
Every frame needs a `row` column (its position) and a `file` column.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Rule:
    name: str
    expectation: Any
    detail: Callable[[dict[str, Any]], str] = lambda row: ""


@dataclass(frozen=True)
class Failure:
    suite: str
    rule: str
    row: dict[str, Any] | None  # None: the expectation could not run over the frame at all
    detail: str


def run(suites: dict[str, tuple[pd.DataFrame, list[Rule]]], prefix: str, docs_dir: Path | None = None,
        max_rows_per_rule: int | None = None) -> tuple[list[dict[str, Any]], list[Failure], str | None]:
    """(expectation results, failures, data docs index or None). `suites`: name -> (frame, rules)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(f"{prefix}_docs", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = context.data_sources.add_pandas(prefix)
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}
    results: list[dict[str, Any]] = []
    failures: list[Failure] = []
    for name, (frame, rules) in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = gx.ExpectationSuite(name=f"{prefix}_{name}")
        for i, rule in enumerate(rules):
            rule.expectation.meta = {"rule": rule.name, "entry": i}
            suite.add_expectation(rule.expectation)
        suite = context.suites.add(suite)
        vdef = context.validation_definitions.add(gx.ValidationDefinition(name=f"{prefix}_{name}", data=batch,
                                                                          suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(name=f"{prefix}_{name}", validation_definitions=[vdef],
                                                           result_format=result_format))
        (outcome,) = checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()
        for er in outcome.results:
            rule = rules[int(er.expectation_config.meta["entry"])]
            res = er.result or {}
            exc = er.exception_info or {}
            raised = exc.get("exception_message") if isinstance(exc, dict) else None
            results.append({"suite": f"{prefix}_{name}", "rule": rule.name, "expectation": er.expectation_config.type,
                            "kwargs": {k: v for k, v in dict(er.expectation_config.kwargs).items() if k != "batch_id"},
                            "success": bool(er.success), "element_count": res.get("element_count"),
                            "unexpected_count": res.get("unexpected_count"), "exception": raised})
            if raised:  # an expectation that could not run fails the whole frame
                failures.append(Failure(name, rule.name, None, f"expectation {er.expectation_config.type} "
                                                               f"raised: {raised}"))
                continue
            for hit in (res.get("unexpected_index_list") or [])[:max_rows_per_rule]:
                row = frame.iloc[int(hit["row"])].to_dict()
                failures.append(Failure(name, rule.name, row, str(rule.detail(row))))
    docs_index = None
    if docs_dir is not None:
        try:
            context.build_data_docs(site_names=[f"{prefix}_docs"])
        except Exception:  # noqa: BLE001 - the docs are a view of results we already have
            pass
        index = Path(docs_dir) / "index.html"
        docs_index = str(index) if index.is_file() else None
    return results, failures, docs_index


def numbered(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a fresh `row` column (GX reports offending rows by it)."""
    frame = frame.reset_index(drop=True)
    frame["row"] = range(len(frame))
    return frame
