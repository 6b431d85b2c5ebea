"""Filling the decoded-image cache in parallel: worker processes locally, Ray tasks on a cluster.

The images to decode are cut into chunks of ``chunk_rows``. Each chunk is decoded and transformed by a worker
(:func:`decode_chunk`: PIL only, no model), and its uint8 rows come back to the builder, which commits them to the
store (:meth:`~orchestrator.data.pixel_store.PixelStore.append`) as they arrive, under a progress bar. A killed
build keeps every committed chunk; the next build decodes only the rest. A file that cannot be decoded stops the
build with a ``UserError`` naming it; its chunk is never committed.

Backends:

* in-process: generated images (a renderer, no file), one worker, or fewer than :data:`POOL_MIN_ROWS` rows (a
  pool's start-up costs more than it saves);
* ``local``: a pool of ``workers`` forked processes, as DataLoader workers are (they run PIL and numpy only, none
  of the parent's torch, CUDA or Ray state);
* ``ray``: one Ray task (1 CPU) per chunk on the connected cluster, at most twice its CPUs in flight; the
  image files must be on storage every node sees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from orchestrator.data.images import load_rgb
from orchestrator.data.index import DatasetIndex
from orchestrator.data.pixels import PixelTransform
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: Rows per commit (and per task): 256 rows of 224 px are 38 MB.
DEFAULT_CHUNK_ROWS = 256
#: Below this many rows a pool is not started.
POOL_MIN_ROWS = 512

#: A chunk's result: (first position in the job, uint8 (n, 3, H, W)) or (first position, (path, failure)).
ChunkResult = tuple[int, Any]


def decode_chunk(job: tuple[int, Sequence[str], PixelTransform]) -> ChunkResult:
    """Decode and transform the files of one chunk: ``(start, paths, transform)`` -> ``(start, uint8 (n, 3, H, W))``,
    or ``(start, (path, message))`` for the first file that fails (a ``UserError`` cannot cross processes intact)."""
    start, paths, transform = job
    out = np.empty((len(paths), *transform.shape), dtype=np.uint8)
    for k, path in enumerate(paths):
        try:
            out[k] = transform.pixels(load_rgb(path))
        except UserError as err:
            return start, (str(path), err.detail)
        except (OSError, ValueError) as err:  # the transform itself (a size the store cannot hold)
            return start, (str(path), f"cannot transform image ({err.__class__.__name__}: {err})")
    return start, out


def _chunks(
    index: DatasetIndex, positions: np.ndarray, transform: PixelTransform, chunk_rows: int
) -> list[tuple[int, list[str], PixelTransform]]:
    assert index.image_paths is not None
    return [
        (lo, [str(index.image_paths[int(p)]) for p in positions[lo : lo + chunk_rows]], transform)
        for lo in range(0, len(positions), chunk_rows)
    ]


def _in_process(
    index: DatasetIndex, positions: np.ndarray, transform: PixelTransform, chunk_rows: int
) -> Generator[ChunkResult, None, None]:
    """Chunks decoded here, in order (generated images, small builds); errors raise as they come."""
    for lo in range(0, len(positions), chunk_rows):
        part = positions[lo : lo + chunk_rows]
        out = np.empty((len(part), *transform.shape), dtype=np.uint8)
        for k, p in enumerate(part.tolist()):
            image = index.load_image(int(p))  # UserError naming the file
            try:
                out[k] = transform.pixels(image)
            except (OSError, ValueError) as err:
                where = str(index.image_paths[p]) if index.image_paths is not None else f"{index.name}[{p}]"
                raise UserError(f"cannot transform image ({err.__class__.__name__}: {err})", path=where) from None
        yield lo, out


def _pool(jobs: list, workers: int) -> Generator[ChunkResult, None, None]:
    """Chunks decoded by a pool of ``workers`` forked processes (as DataLoader workers are; spawn where there is no
    fork), in order; the pool is closed when the caller stops. The workers run PIL and numpy only."""
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(processes=workers)
    try:
        yield from pool.imap(decode_chunk, jobs)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _decode_task(start: int, paths: Sequence[str], transform: PixelTransform) -> ChunkResult:
    """:func:`decode_chunk` with top-level arguments (Ray resolves an object reference only there)."""
    return decode_chunk((start, paths, transform))


def _ray(jobs: list) -> Generator[ChunkResult, None, None]:
    """Chunks decoded as Ray tasks (1 CPU each), in completion order; pending tasks are cancelled on exit."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(_decode_task)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    if not jobs:
        return
    transform = ray.put(jobs[0][2])  # one copy in the object store, shared by every task
    todo = [(start, paths) for start, paths, _ in jobs]
    pending: list = []
    try:
        while todo or pending:
            while todo and len(pending) < window:
                start, paths = todo.pop(0)
                pending.append(task.remote(start, paths, transform))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def build_rows(
    store: Any,
    index: DatasetIndex,
    transform: PixelTransform,
    positions: np.ndarray,
    keys: Sequence[bytes],
    *,
    workers: int | None,
    backend: str,
    progress: bool,
    chunk_rows: int,
) -> None:
    """Decode the images at ``positions`` of ``index`` and commit their rows (keyed by ``keys[position]``) to
    ``store`` chunk by chunk. Call under the store's build lock."""
    from tqdm.auto import tqdm

    positions = np.asarray(positions, dtype=np.int64)
    workers = max(1, workers or 1)
    if index.image_paths is None or (backend == "local" and (workers == 1 or len(positions) < POOL_MIN_ROWS)):
        stream = _in_process(index, positions, transform, chunk_rows)
    elif backend == "ray":
        stream = _ray(_chunks(index, positions, transform, chunk_rows))
    elif backend == "local":
        jobs = _chunks(index, positions, transform, chunk_rows)
        stream = _pool(jobs, min(workers, len(jobs)))
    else:
        raise ValueError(f"unknown image cache backend {backend!r} (local or ray)")
    chunks = math.ceil(len(positions) / chunk_rows)
    with tqdm(
        total=len(positions), desc=f"decoding {index.name} images", unit="img", disable=None if progress else True
    ) as bar:  # None: only on a terminal
        try:
            for _ in range(chunks):
                start, result = next(stream)
                if isinstance(result, tuple):
                    path, message = result
                    raise UserError(message, path=path)
                part = positions[start : start + len(result)]
                store.append([keys[int(p)] for p in part], result)
                bar.update(len(part))
        finally:
            stream.close()


__all__ = ["DEFAULT_CHUNK_ROWS", "POOL_MIN_ROWS", "build_rows", "decode_chunk"]
