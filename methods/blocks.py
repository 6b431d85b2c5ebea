"""Chunk sizing and the block grid of the O(N^3) losses (Smooth-NDCG ranks, all-pairs Kendall). Imports torch only.

The torch forms of those losses never build the (Q, N, N) cube of (query, candidate j, candidate k) at once:
they walk it in blocks of ``c`` queries x ``jt`` candidates j, each a (c, jt, N) buffer. This module says how
large a block is and yields the blocks; :mod:`methods.ndcg_direction` and :mod:`methods.kendall_direction`
run them.

* Queries go ``chunk`` at a time: by default as many as keep one buffer at :data:`CHUNK_ELEMENTS` elements
  (:func:`resolve_chunk`; a loss's ``chunk_size`` argument overrides it).
* On the CPU blocks are cut further to about :data:`CPU_TILE_ELEMENTS` elements (:func:`block_shape`).

Both limits are read at call time, so a test may lower them with ``monkeypatch.setattr(blocks, ...)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

#: Elements per chunk buffer for the chunked O(B^3) kernels (2**24 -> 64 MB in float32).
CHUNK_ELEMENTS = 2**24

#: On CPU the O(B^3) kernels work on blocks of about this many elements (cache-sized).
CPU_TILE_ELEMENTS = 2**22


def default_chunk(rows_elements: int) -> int:
    """Queries per chunk so that one (chunk, ...) buffer of ``rows_elements`` per query holds at most
    :data:`CHUNK_ELEMENTS` elements (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(1, rows_elements))


def resolve_chunk(chunk_size: int | None, per_query_elements: int, num_queries: int) -> int:
    """Queries per chunk: ``chunk_size`` (ValueError if < 1) or :func:`default_chunk`, clipped to [1, num_queries]."""
    if chunk_size is None:
        chunk = default_chunk(per_query_elements)
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, min(chunk, max(1, num_queries)))


def block_shape(Q: int, N: int, chunk: int, device: torch.device) -> tuple[int, int]:
    """(queries c, candidates jt) per block of the O(N^3) kernels; a block holds (c, jt, N) buffers.

    Queries go ``chunk`` at a time (the memory bound). On CPU blocks are cut further to about
    :data:`CPU_TILE_ELEMENTS` elements (fewer queries, then row blocks of candidates j): fewer, larger
    passes would thrash the cache, and a single query's (N, N) slab can be large.
    """
    c, jt = max(1, min(chunk, Q)), N
    if device.type == "cpu":
        tile = max(1, int(CPU_TILE_ELEMENTS))
        c = max(1, min(c, tile // max(1, N * N)))
        if c * N * N > tile:
            jt = max(1, min(N, tile // max(1, N)))
    return c, jt


def blocks(Q: int, N: int, c: int, jt: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks (q0, q1, j0, j1) covering the (Q, N) query x candidate grid, ``c`` queries x ``jt`` candidates."""
    for q0 in range(0, Q, c):
        q1 = min(Q, q0 + c)
        for j0 in range(0, N, jt):
            yield q0, q1, j0, min(N, j0 + jt)


def views(bufs: Sequence[torch.Tensor], shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """Views of the preallocated flat buffers with a block's (c, jt, N) shape (no allocation per block)."""
    n = shape[0] * shape[1] * shape[2]
    return [b[:n].view(shape) for b in bufs]


__all__ = ["CHUNK_ELEMENTS", "CPU_TILE_ELEMENTS", "default_chunk", "resolve_chunk", "block_shape", "blocks", "views"]
