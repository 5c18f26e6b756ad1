"""Shards on a Dask cluster, through Prefect's Dask task runner (medrega.shards, `dask_address`).

A module of its own so prefect_dask is imported only when a cluster is named, and so the Prefect
task is a module-level name: Dask pickles it by reference, and workers import it from here (every
worker needs this repository installed and the data and work directories at the same paths).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect_dask import DaskTaskRunner


@task(name="shard", retries=2)  # a retried shard rewrites its files atomically
def build_shard(build, k: int, chunk: list, args: tuple) -> dict:
    return build(k, chunk, *args)


@contextmanager
def submitter(address: str) -> Iterator:
    # The runner is used on its own, not under a @flow: Prefect ships the flow (and its closure,
    # which holds the item generator) to workers in the task context, and a generator cannot be
    # pickled. Each shard is still a Prefect task run with retries and state tracking.
    with DaskTaskRunner(address=address) as runner:
        yield lambda build, k, chunk, *args: runner.submit(build_shard, {"build": build, "k": k, "chunk": chunk,
                                                                         "args": args})
