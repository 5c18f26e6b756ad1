"""A resumable, order-preserving shard runner: a stream of items, cut into shards, each built by a
worker, each finished shard recorded, results handed back in shard order.

- Items are taken `shard_size` at a time from an iterator, and at most `window` shards are in
  flight, so memory holds shards, never the dataset.
- Shard k always holds items [k*size, (k+1)*size) of the stream and `build(k, chunk, *args)`
  must depend on nothing else: the output is then the same for any number of workers.
- A shard is finished when its manifest (`work/shards/<k>.json`, the dict `build` returned) is
  written, after `build` wrote its own files; a re-run reads finished manifests back instead of
  rebuilding, so a killed run resumes where it stopped.
- Workers: in-process (1), a local process pool (n), or a Dask cluster through Prefect's
  DaskTaskRunner (`dask_address`; medrega/shards_dask.py). `build` must be a module-level
  function (it is pickled by reference).
"""
from __future__ import annotations

import itertools
import json
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from medrega import io

SHARDS_DIR = "shards"


def manifest_path(work: Path, k: int) -> Path:
    return Path(work) / SHARDS_DIR / f"{k:05d}.json"


class _Ready:
    """A finished shard, shaped like a future so the ordered drain treats all alike."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def chunks(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """(k, list of `size` items) taken lazily: never more than one chunk held here."""
    it = iter(items)
    for k in itertools.count():
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield k, chunk


def _drive(items: Iterable, size: int, work: Path, build: Callable, args: tuple, submit, window: int,
           take: Callable[[dict], None], bar) -> None:
    pending: deque = deque()

    def drain_one() -> None:
        k, future, n, resumed = pending.popleft()
        manifest = future.result()
        if not resumed:
            io.write_json(manifest_path(work, k), manifest, indent=None)  # after the shard's own files
        take(manifest)
        bar.update(n)

    for k, chunk in chunks(items, size):
        done = manifest_path(work, k)
        if done.is_file():
            pending.append((k, _Ready(json.loads(done.read_text(encoding="utf-8"))), len(chunk), True))
        else:
            pending.append((k, submit(build, k, chunk, *args), len(chunk), False))
        while len(pending) > window:
            drain_one()
    while pending:
        drain_one()


def run(items: Iterable, *, size: int, work: Path, build: Callable[..., dict], args: tuple = (),
        take: Callable[[dict], None], workers: int = 1, dask_address: str | None = None,
        total: int | None = None, desc: str = "shards") -> None:
    """Build every shard of `items` (module docstring) and call `take(manifest)` in shard order."""
    (Path(work) / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, unit="item", desc=desc, mininterval=2.0)
    try:
        if dask_address:
            from medrega import shards_dask

            with shards_dask.submitter(dask_address) as submit:
                _drive(items, size, work, build, args, submit, 4 * max(workers, 1), take, bar)
        elif workers <= 1:
            _drive(items, size, work, build, args, lambda fn, *a: _Ready(fn(*a)), 0, take, bar)
        else:
            with ProcessPoolExecutor(workers) as pool:
                try:
                    _drive(items, size, work, build, args, pool.submit, 2 * workers, take, bar)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay for resume
                    raise
    finally:
        bar.close()


def finished(work: Path) -> bool:
    """Whether a work directory holds any finished shard (something a re-run can resume from)."""
    return any((Path(work) / SHARDS_DIR).glob("*.json"))


def discard_bookkeeping(work: Path) -> None:
    """Drop the manifests once the output is complete (they are not part of it)."""
    shutil.rmtree(Path(work) / SHARDS_DIR, ignore_errors=True)
