"""Chunked top-k retrieval: the best ``k`` keys of every query without the full similarity matrix."""

from __future__ import annotations

import torch

__all__ = ["chunked_topk"]


@torch.no_grad()
def chunked_topk(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 1024, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and similarities of the ``k`` most similar keys of each query, best first.

    Args:
        queries: (Q, D) float embeddings (similarity = dot product; L2-normalise for cosine).
        keys: (K, D) float, same device.
        k: how many keys per query (capped at K, or K - 1 with ``exclude_self``).
        chunk_size: query rows scored at once (extra memory about ``chunk_size * K`` similarities).
        exclude_self: ``queries`` and ``keys`` are the same set: query i never retrieves key i.

    Returns:
        ``(indices, scores)``: int64 (Q, k') and (Q, k') in the embeddings' dtype, on their device, with
        k' = min(k, available keys). Ties are broken by ``torch.topk`` (arbitrary but deterministic).
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"need (Q, D) and (K, D) embeddings, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be positive, got k={k}, chunk_size={chunk_size}")
    if exclude_self and queries.shape[0] != keys.shape[0]:
        raise ValueError("exclude_self needs queries and keys of the same set")
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    queries, keys = queries.to(dtype), keys.to(dtype)
    k = min(k, keys.shape[0] - (1 if exclude_self else 0))
    if k < 1:
        raise ValueError("not enough keys to retrieve from")
    idx = torch.empty((queries.shape[0], k), dtype=torch.long, device=queries.device)
    val = torch.empty((queries.shape[0], k), dtype=dtype, device=queries.device)
    for start in range(0, queries.shape[0], chunk_size):
        stop = min(start + chunk_size, queries.shape[0])
        sims = queries[start:stop] @ keys.T  # (c, K)
        if exclude_self:
            rows = torch.arange(stop - start, device=sims.device)
            sims[rows, rows + start] = float("-inf")
        top = sims.topk(k, dim=1)
        idx[start:stop], val[start:stop] = top.indices, top.values
    return idx, val
