"""materialize's shards on a Dask cluster, through Prefect's Dask task runner (materialize.dask_address).

A module of its own so that prefect_dask is imported only when a cluster is named, and so the
Prefect task is a module-level name: Dask pickles it by reference, and workers import it from
here (every worker needs this repository installed and data_root / out's parent at the same paths).
"""
from __future__ import annotations

from prefect import task
from prefect_dask import DaskTaskRunner

from tasks import materialize as mat


@task(name="materialize-shard", retries=2)  # a retried shard rewrites its files atomically
def materialize_shard(k: int, samples: list, reports: dict, job: dict) -> dict:
    return mat._build_shard(k, samples, reports, job)


def run(address: str, samples, reports: dict, job: dict, window: int, take, bar) -> None:
    # The runner is used on its own, not under a @flow: Prefect ships the flow (and its closure,
    # which holds the sample generator) to workers in the task context, and a generator cannot
    # be pickled. Each shard is still a Prefect task run with retries and state tracking.
    with DaskTaskRunner(address=address) as runner:
        def submit(fn, k, chunk, mine, job_):
            return runner.submit(materialize_shard, {"k": k, "samples": chunk, "reports": mine, "job": job_})

        mat._drive(samples, reports, job, submit, window, take, bar)
