"""Image-text retrieval metrics: Recall@K, median and mean rank, RSUM, COCO 1K folds.

Similarity is the dot product of the embeddings (they are assumed L2-normalised, so this
is the cosine similarity). The full N x M similarity matrix is never materialised: it is
computed once, ``chunk_size`` image rows at a time, and the rank of a query's target is
obtained without sorting as ``1 + count(negatives scoring >= the target)``
(row counts give image->text ranks, column counts accumulated over chunks text->image ranks).

Tie convention (pessimistic): a *negative* candidate whose similarity equals the target's
counts against it, i.e. ``rank = 1 + #{negatives with similarity >= the target's}``. Why: with
ties in favour, a collapsed model (constant, all-zero embeddings) would rank every target
first and score RSUM 600; with ties against it scores 0. Real-valued embeddings of a trained
model practically never tie, so published numbers do not move. For image-to-text the target
is the image's best-scoring ground-truth caption; other ground-truth captions are not
negatives, so tied positives (e.g. duplicate captions of one image) cost nothing.

Embeddings must be finite (a NaN compares false with everything and would rank first):
``ValueError`` otherwise.

Ranks are 1-based. Recalls are percentages in [0, 100].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ranks", "recall_from_ranks", "retrieval_metrics", "fold_metrics", "non_finite_rows"]


def _as_index_tensor(text_image: torch.Tensor | np.ndarray | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(text_image, torch.Tensor):
        t = text_image
    else:
        t = torch.as_tensor(np.asarray(text_image))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"text_image must hold integer image indices, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _check_inputs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor | np.ndarray, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes/values; return (image_emb, text_emb, text_image) on one device and dtype."""
    if not isinstance(image_emb, torch.Tensor) or not isinstance(text_emb, torch.Tensor):
        raise TypeError("image_emb and text_emb must be torch.Tensor")
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(
            f"image_emb and text_emb must be 2-D, got shapes {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding dims differ: image D={image_emb.shape[1]}, text D={text_emb.shape[1]}")
    if not image_emb.dtype.is_floating_point or not text_emb.dtype.is_floating_point:
        raise ValueError(f"embeddings must be floating point, got {image_emb.dtype} and {text_emb.dtype}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"embeddings are on different devices: {image_emb.device} and {text_emb.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n < 1 or m < 1:
        raise ValueError(f"need at least one image and one caption, got N={n}, M={m}")
    dtype = torch.promote_types(image_emb.dtype, text_emb.dtype)
    image_emb = image_emb.detach().to(dtype)
    text_emb = text_emb.detach().to(dtype)
    ti = _as_index_tensor(text_image, image_emb.device)
    if ti.dim() != 1 or ti.shape[0] != m:
        raise ValueError(f"text_image must have shape ({m},), got {tuple(ti.shape)}")
    lo, hi = int(ti.min()), int(ti.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"text_image values must lie in [0, {n}), got range [{lo}, {hi}]")
    counts = torch.bincount(ti, minlength=n)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images without captions include {missing}")
    for name, emb in (("image", image_emb), ("caption", text_emb)):
        bad = non_finite_rows(emb)
        if bad:
            raise ValueError(f"{bad} of {emb.shape[0]} {name} embeddings are not finite")
    return image_emb, text_emb, ti


def non_finite_rows(emb: torch.Tensor) -> int:
    """How many rows of the (R, D) ``emb`` hold a NaN or an infinity."""
    return int((~torch.isfinite(emb)).any(dim=1).sum()) if emb.numel() else 0


def _chunk_sims(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Similarities of one query chunk against all keys: (c, D) x (K, D) -> (c, K)."""
    return queries @ keys.T


# Counting through a float32 0/1 buffer is several times faster on CPU than reducing a bool
# tensor, and exact as long as every partial sum is an integer below 2**24.
_FLOAT_COUNT_LIMIT = 2**24
# Image rows per block when pre-computing the text->image targets (see ``_t2i_targets``).
_TARGET_BLOCK = 256


def _count_at_least(sims: torch.Tensor, thresh: torch.Tensor, dim: int, buf: torch.Tensor | None) -> torch.Tensor:
    """Number of entries of ``sims`` greater than or equal to ``thresh`` (broadcast), reduced over ``dim``; int64."""
    if buf is None or sims.shape[dim] >= _FLOAT_COUNT_LIMIT:
        return (sims >= thresh).sum(dim=dim, dtype=torch.long)
    out = buf[: sims.shape[0]]
    torch.ge(sims, thresh, out=out)
    return out.sum(dim=dim).to(torch.long)


def _owner_slices(ti: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, list[int]]:
    """Captions sorted by image (``order``) and, per image block ``[b*block, (b+1)*block)``,
    the bounds of its captions in ``order``: captions of block b are ``order[bounds[b]:bounds[b+1]]``."""
    order = torch.argsort(ti, stable=True)
    starts = list(range(0, n, block)) + [n]
    bounds = torch.searchsorted(ti[order], torch.tensor(starts, dtype=torch.long, device=ti.device)).tolist()
    return order, bounds


def _t2i_targets(image_emb: torch.Tensor, text_emb: torch.Tensor, ti: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Predicted (M,) similarity of each caption with its own image, computed by the same kind of
    matrix product as the main pass but only on the diagonal blocks (blocks of at most
    ``min(chunk_size, _TARGET_BLOCK)`` images against their own captions: about block / N of the
    full product). Normally bitwise equal to the main pass's value; ``ranks`` verifies that."""
    n = image_emb.shape[0]
    size = min(chunk_size, _TARGET_BLOCK)
    order, bounds = _owner_slices(ti, n, size)
    text_sorted = text_emb[order]  # (M, D): the captions of each image block are a contiguous slice
    local = (ti[order] % size)[None, :]  # (1, M): row of each caption's image within its block
    diag = torch.empty(text_emb.shape[0], dtype=image_emb.dtype, device=image_emb.device)
    for b, start in enumerate(range(0, n, size)):
        lo, hi = bounds[b], bounds[b + 1]
        block = _chunk_sims(image_emb[start : start + size], text_sorted[lo:hi])  # (size, k)
        diag[lo:hi] = block.gather(0, local[:, lo:hi])[0]
    targets = torch.empty_like(diag)
    targets[order] = diag
    return targets


def _t2i_direct(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ti: torch.Tensor, idx: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Text->image ranks of the captions ``idx`` (K,) from their own (chunk, N) similarity rows; int64 (K,)."""
    n = image_emb.shape[0]
    out = torch.empty(idx.numel(), dtype=torch.long, device=image_emb.device)
    buf = torch.empty((min(chunk_size, idx.numel()), n), dtype=torch.float32, device=image_emb.device)
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start : start + chunk_size]
        sims = _chunk_sims(text_emb[sel], image_emb)  # (c, N)
        target = sims.gather(1, ti[sel, None])  # (c, 1)
        # the count includes the caption's own image (equal to itself): that is the "+ 1"
        out[start : start + sel.numel()] = _count_at_least(sims, target, 1, buf)
    return out


@torch.no_grad()
def ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor | np.ndarray,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based retrieval ranks in both directions, computed chunk by chunk.

    Args:
        image_emb: (N, D) float image embeddings (any float dtype, any device).
        text_emb: (M, D) float caption embeddings, same device as ``image_emb`` (both are cast
            to their promoted dtype).
        text_image: (M,) integer; ``text_image[j]`` is the index in ``[0, N)`` of caption j's
            image. Any number (>= 1) of captions per image, in any order.
        chunk_size: image rows whose similarities to all M captions are held at once; extra
            memory is about ``chunk_size * M`` similarities plus as many float32 counters.

    Returns:
        ``(i2t_ranks, t2i_ranks)``, np.int64 arrays of shapes (N,) and (M,).
        ``i2t_ranks[i]`` is the rank among all M captions of image i's best-scoring
        ground-truth caption; ``t2i_ranks[j]`` is the rank among all N images of caption
        j's image. Ties count against the model: rank = 1 + number of negatives scoring
        >= the target (tied ground-truth captions of the same image cost nothing).

    Raises:
        ValueError: bad shapes or indices, or non-finite embeddings.

    How: one pass over image chunks computes each (chunk, M) block of the similarity matrix
    once, in the embeddings' dtype on their device; counts are accumulated in int64. Image ->
    text: the target is the max over the image's captions (``scatter_reduce`` amax) and the
    rank is ``1 + count(row >= target) - #(own captions equal to the target)``. Text -> image:
    the column counts ``count(col >= t_j)`` (own image included, hence no ``+ 1``)
    are accumulated over chunks using targets ``t_j`` precomputed on the diagonal blocks; each
    ``t_j`` is then checked to be bitwise equal to the value the pass itself produced, and any
    caption where it is not (different BLAS kernels can round differently) is re-ranked from its
    own similarity row. Every comparison is thus made against the target value taken from the
    very similarities it is compared with. (Worst case, if every target mismatched, the cost is
    that of two passes.)
    """
    image_emb, text_emb, ti = _check_inputs(image_emb, text_emb, text_image, chunk_size)
    n, m = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    c_max = min(chunk_size, n)

    t2i_target = _t2i_targets(image_emb, text_emb, ti, chunk_size)  # (M,)
    t2i_seen = torch.empty_like(t2i_target)  # (M,) the value the main pass produced
    t2i_count = torch.zeros(m, dtype=torch.long, device=device)
    i2t = torch.empty(n, dtype=torch.long, device=device)
    order, bounds = _owner_slices(ti, n, chunk_size)
    buf = torch.empty((c_max, m), dtype=torch.float32, device=device)
    for c_idx, start in enumerate(range(0, n, chunk_size)):
        end = min(start + chunk_size, n)
        sims = _chunk_sims(image_emb[start:end], text_emb)  # (c, M)
        cols = order[bounds[c_idx] : bounds[c_idx + 1]]  # captions of images start..end-1
        rows = ti[cols] - start  # local row of each caption's image
        own = sims[rows, cols]
        t2i_seen[cols] = own
        best = torch.full((end - start,), float("-inf"), dtype=sims.dtype, device=device)
        best = best.scatter_reduce(0, rows, own, reduce="amax", include_self=True)  # (c,)
        tied_pos = torch.zeros(end - start, dtype=torch.long, device=device)
        tied_pos = tied_pos.scatter_add(0, rows, (own == best[rows]).to(torch.long))  # >= 1: the best itself
        i2t[start:end] = _count_at_least(sims, best[:, None], 1, buf) - tied_pos + 1
        t2i_count += _count_at_least(sims, t2i_target[None, :], 0, buf)
        del sims
    del buf
    t2i = t2i_count  # the own image is among those counted (its value equals the target)
    redo = torch.nonzero(t2i_seen != t2i_target).flatten()  # NaNs land here too
    if redo.numel():
        t2i[redo] = _t2i_direct(image_emb, text_emb, ti, redo, chunk_size)
    return i2t.cpu().numpy().astype(np.int64), t2i.cpu().numpy().astype(np.int64)


def recall_from_ranks(
    i2t_ranks: np.ndarray | Sequence[int],
    t2i_ranks: np.ndarray | Sequence[int],
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Metrics from 1-based ranks.

    Args:
        i2t_ranks: (N,) image-to-text ranks.
        t2i_ranks: (M,) text-to-image ranks.
        ks: the K of each Recall@K.

    Returns:
        Python floats, keys in this order: ``i2t_r{k}`` for k in ks, ``t2i_r{k}`` for k in ks
        (percentages), ``rsum`` (sum of all those recalls), ``i2t_medr``, ``t2i_medr``
        (``numpy.median`` of the ranks, so possibly x.5), ``i2t_meanr``, ``t2i_meanr``.
    """
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    r_i2t = np.asarray(i2t_ranks, dtype=np.int64).reshape(-1)
    r_t2i = np.asarray(t2i_ranks, dtype=np.int64).reshape(-1)
    if r_i2t.size == 0 or r_t2i.size == 0:
        raise ValueError("ranks must be non-empty")
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{int(k)}"] = float(100.0 * np.mean(r_i2t <= k))
    for k in ks:
        out[f"t2i_r{int(k)}"] = float(100.0 * np.mean(r_t2i <= k))
    out["rsum"] = float(sum(out.values()))
    out["i2t_medr"] = float(np.median(r_i2t))
    out["t2i_medr"] = float(np.median(r_t2i))
    out["i2t_meanr"] = float(np.mean(r_i2t))
    out["t2i_meanr"] = float(np.mean(r_t2i))
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor | np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K (both directions), RSUM, median and mean rank over the whole set.

    Args:
        image_emb: (N, D) float, L2-normalised image embeddings.
        text_emb: (M, D) float, L2-normalised caption embeddings (same device).
        text_image: (M,) int, image index of each caption (>= 1 caption per image).
        ks: the K of each Recall@K.
        chunk_size: query rows processed at once (see :func:`ranks`).

    Returns:
        See :func:`recall_from_ranks`. Ties count against the model (see :func:`ranks`).
    """
    i2t, t2i = ranks(image_emb, text_emb, text_image, chunk_size=chunk_size)
    return recall_from_ranks(i2t, t2i, ks)


def fold_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor | np.ndarray,
    num_folds: int = 5,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """COCO 1K protocol: metrics averaged over ``num_folds`` consecutive image folds.

    The N images are split into ``num_folds`` consecutive folds of ``N // num_folds``
    images; each fold is evaluated with its own images' captions only (retrieval within
    the fold), and every metric (RSUM, medr and meanr included) is averaged over folds.

    Args:
        image_emb: (N, D) float; N must be divisible by ``num_folds`` (else ValueError).
        text_emb: (M, D) float.
        text_image: (M,) int, image index of each caption in ``[0, N)``.
        num_folds: number of folds (5 for COCO 5K -> 1K).
        ks, chunk_size: as in :func:`retrieval_metrics`.

    Returns:
        Same keys as :func:`retrieval_metrics`, each the mean over folds.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 1:
        raise ValueError(f"num_folds must be a positive int, got {num_folds!r}")
    if not isinstance(image_emb, torch.Tensor) or not isinstance(text_emb, torch.Tensor):
        raise TypeError("image_emb and text_emb must be torch.Tensor")
    n = image_emb.shape[0]
    if n % num_folds != 0:
        raise ValueError(f"N={n} images cannot be split into {num_folds} folds of equal size")
    if text_emb.dim() != 2:
        raise ValueError(f"text_emb must be 2-D, got shape {tuple(text_emb.shape)}")
    ti = _as_index_tensor(text_image, text_emb.device)
    if ti.dim() != 1 or ti.shape[0] != text_emb.shape[0]:
        raise ValueError(f"text_image must have shape ({text_emb.shape[0]},), got {tuple(ti.shape)}")
    size = n // num_folds
    per_fold: list[dict[str, float]] = []
    for f in range(num_folds):
        lo, hi = f * size, (f + 1) * size
        sel = torch.nonzero((ti >= lo) & (ti < hi)).flatten()
        per_fold.append(retrieval_metrics(image_emb[lo:hi], text_emb[sel], ti[sel] - lo, ks=ks, chunk_size=chunk_size))
    return {key: float(np.mean([d[key] for d in per_fold])) for key in per_fold[0]}
