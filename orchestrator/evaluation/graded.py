"""Graded relevance: NDCG@K and Kendall's tau-b of a model's similarities against a relevance matrix.

The relevance ``R`` (N images x M captions, >= 0) replaces the binary match / no-match label:

* :class:`CaptionRelevance` (caption-caption similarity, the RSC idea of Listwise ITR): with a text teacher's
  L2-normalised caption features ``t``, ``R[i, c] = max(0, agg_{c' in captions(i)} cos(t_c', t_c))``, ``agg``
  = ``max`` or ``mean``. A ground-truth caption of ``i`` scores 1 under ``max`` (it is one of ``captions(i)``).
* :class:`ExactRelevance`: the dataset's own graded relevance where it is known (the synthetic data).

Image->text ranks the M captions for each image query against row ``R[i, :]``; text->image ranks the N images
for each caption query against column ``R[:, c]``. Per query, with the candidates ordered by model similarity
(descending) and ``g_r`` the relevance of the candidate at rank r (1-based)::

    DCG@K  = sum_{r <= K} g_r / log2(r + 1)          (linear gains, as sklearn.metrics.ndcg_score)
    NDCG@K = DCG@K / IDCG@K   (IDCG: the same sum over the relevances sorted descending; 0 when IDCG = 0)

``K`` is 10, 25 or the whole list. Kendall's tau-b between the query's similarities and relevances over all its
candidates (``scipy.stats.kendalltau``'s default variant: ties in either list handled by the tau-b
denominator), ``nan`` for a query whose relevances are all equal (skipped) and 0 for one whose similarities are
all equal; it is averaged over the queries where it is defined. Everything is averaged over queries; NDCG in
[0, 1], tau in [-1, 1].

Memory: query chunks of ``chunk_size`` rows; the similarity and relevance blocks are (chunk, candidates); no N x M
matrix. Kendall's tau is exact in O(L log^2 L) per query (a merge-sort inversion count vectorised over rows).
Ties count against the model, as in :mod:`.recall`: for NDCG, candidates with equal similarity are ranked lowest
relevance first; for Kendall's tau, a query whose similarities are all equal (no preference at all) scores 0
(chance) rather than being skipped. Continuous embeddings of a trained model have no ties, so neither moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = ["CaptionRelevance", "ExactRelevance", "RelevanceFn", "graded_metrics", "kendall_tau_b_rows", "ndcg_rows"]

#: ``(image indices (n,), caption indices (m,)) -> float (n, m)`` relevance >= 0, int64 index tensors.
RelevanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CaptionRelevance:
    """``R[i, c] = max(0, agg over captions c' of image i of cos(t_c', t_c))`` from caption features ``t``.

    Args:
        text_features: (M, Dt) teacher features of the split's captions (normalised here).
        text_image: (M,) int, image index of each caption.
        num_images: N (every image needs >= 1 caption).
        aggregation: ``"max"`` or ``"mean"`` over the image's captions.
        device: where blocks are computed (default: CPU).
    """

    def __init__(
        self,
        text_features: np.ndarray | torch.Tensor,
        text_image: np.ndarray | torch.Tensor,
        num_images: int,
        aggregation: Literal["max", "mean"] = "max",
        device: torch.device | None = None,
    ) -> None:
        if aggregation not in ("max", "mean"):
            raise ValueError(f"aggregation must be 'max' or 'mean', got {aggregation!r}")
        device = device or torch.device("cpu")
        feats = torch.from_numpy(np.array(text_features, dtype=np.float32)).to(device)  # a copy (memmaps are read-only)
        self.features = torch.nn.functional.normalize(feats, dim=1)  # (M, Dt)
        owner = torch.as_tensor(np.asarray(text_image), dtype=torch.long, device=device)
        if owner.shape[0] != feats.shape[0]:
            raise ValueError(f"{feats.shape[0]} caption features but {owner.shape[0]} caption owners")
        self.counts = torch.bincount(owner, minlength=num_images)  # (N,)
        if bool((self.counts == 0).any()):
            raise ValueError("every image needs at least one caption")
        # (N, K) caption indices of each image, padded with caption 0 and masked (K = most captions of an image)
        order = torch.argsort(owner, stable=True)
        starts = torch.cumsum(self.counts, 0) - self.counts
        width = int(self.counts.max())
        slot = torch.arange(width, device=device)
        self.mask = slot[None, :] < self.counts[:, None]  # (N, K)
        self.slots = torch.where(self.mask, order[(starts[:, None] + slot[None, :]).clamp_max(len(order) - 1)], 0)
        self.aggregation = aggregation

    def __call__(self, image_idx: torch.Tensor, caption_idx: torch.Tensor) -> torch.Tensor:
        """(n,) image and (m,) caption indices -> float32 (n, m) relevance, on the features' device."""
        dev = self.features.device
        image_idx, caption_idx = image_idx.to(dev), caption_idx.to(dev)
        slots, mask = self.slots[image_idx], self.mask[image_idx]  # (n, K)
        n, width = slots.shape
        sims = (self.features[slots.reshape(-1)] @ self.features[caption_idx].T).reshape(n, width, -1)  # (n, K, m)
        if self.aggregation == "max":
            out = sims.masked_fill_(~mask[:, :, None], float("-inf")).amax(dim=1)
        else:
            out = sims.masked_fill_(~mask[:, :, None], 0.0).sum(dim=1) / self.counts[image_idx][:, None].float()
        return out.clamp_min_(0.0)


class ExactRelevance:
    """A dataset's known relevance: ``fn(image indices (n,), caption indices (m,)) -> (n, m)`` numpy, in [0, 1]
    (``DatasetIndex.relevance``)."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.fn = fn

    def __call__(self, image_idx: torch.Tensor, caption_idx: torch.Tensor) -> torch.Tensor:
        block = self.fn(image_idx.cpu().numpy(), caption_idx.cpu().numpy())
        return torch.from_numpy(np.asarray(block, dtype=np.float32)).to(image_idx.device)


def _pessimistic_top(scores: torch.Tensor, gains: torch.Tensor, k: int) -> torch.Tensor:
    """(R, k) indices of the k best-scoring candidates, best first, equal scores ordered by *ascending* gain (ties
    count against the model). ``topk`` where a row has no tie in or at the edge of its top k; a sort otherwise."""
    top = scores.topk(k, dim=1)
    vals, idx = top.values, top.indices
    tied = (scores == vals[:, -1:]).sum(dim=1) > (vals == vals[:, -1:]).sum(dim=1)  # a tie across the cut
    if k > 1:
        tied |= (vals[:, 1:] == vals[:, :-1]).any(dim=1)  # a tie inside the top k
    rows = torch.nonzero(tied).flatten()
    if rows.numel():
        by_gain = torch.argsort(gains[rows], dim=1, stable=True)  # ascending gain ...
        by_score = torch.argsort(scores[rows].gather(1, by_gain), dim=1, descending=True, stable=True)
        idx[rows] = by_gain.gather(1, by_score)[:, :k]  # ... then descending score, stable: worst gain first
    return idx


def ndcg_rows(scores: torch.Tensor, gains: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """NDCG@k of each row: candidates ranked by ``scores`` (R, L), gains ``gains`` (R, L) >= 0; float64 (R,).

    ``k=None`` is the whole list. A row whose ideal DCG is 0 scores 0 (as sklearn). Candidates with equal scores are
    ranked lowest gain first (ties count against the model: constant scores get the worst ordering's NDCG)."""
    length = scores.shape[1]
    k = length if k is None else min(int(k), length)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=scores.device))  # (k,)
    top = _pessimistic_top(scores, gains, k)  # (R, k), best first
    dcg = (gains.gather(1, top).double() * discount).sum(1)
    idcg = (gains.topk(k, dim=1).values.double() * discount).sum(1)
    return torch.where(idcg > 0, dcg / torch.where(idcg > 0, idcg, 1.0), torch.zeros_like(dcg))


def _tied_pairs(*sorted_rows: torch.Tensor) -> torch.Tensor:
    """Pairs of equal entries per row, (R,) int64, for rows sorted so equal entries (equal in every given
    tensor) are adjacent: sum over runs of t (t - 1) / 2."""
    first = sorted_rows[0]
    r, length = first.shape
    new_run = torch.zeros((r, length), dtype=torch.bool, device=first.device)
    new_run[:, 0] = True
    for v in sorted_rows:
        new_run[:, 1:] |= v[:, 1:] != v[:, :-1]
    pos = torch.arange(length, device=first.device).expand(r, length)
    run_start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return (pos - run_start).sum(1)


def _inversions(values: torch.Tensor) -> torch.Tensor:
    """Pairs i < j with ``values[:, i] > values[:, j]`` per row, (R,) int64: a bottom-up merge sort, every row
    and every block of a level at once (counts from ``searchsorted``, merge by scatter)."""
    r, length = values.shape
    size = 1 << max(0, (length - 1).bit_length())
    v = values
    if size > length:  # +inf padding at the end adds no inversion
        v = torch.cat([v, torch.full((r, size - length), float("inf"), dtype=v.dtype, device=v.device)], 1)
    total = torch.zeros(r, dtype=torch.long, device=v.device)
    s = 1
    while s < size:
        blocks = v.reshape(r, size // (2 * s), 2, s)
        left, right = blocks[:, :, 0, :].contiguous(), blocks[:, :, 1, :].contiguous()  # each sorted
        left_le = torch.searchsorted(left, right, right=True)  # (r, b, s): left items <= each right item
        total += (s - left_le).sum(dim=(1, 2))
        right_lt = torch.searchsorted(right, left, right=False)  # right items < each left item
        slot = torch.arange(s, device=v.device)
        merged = torch.empty((r, size // (2 * s), 2 * s), dtype=v.dtype, device=v.device)
        merged.scatter_(2, slot + right_lt, left)
        merged.scatter_(2, slot + left_le, right)
        v = merged.reshape(r, size)
        s *= 2
    return total


def kendall_tau_b_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between ``x[r]`` and ``y[r]`` for every row, float64 (R,); ``nan`` where either row is
    constant. Exact: ``(n_c - n_d) / sqrt((n0 - n1)(n0 - n2))`` with pairs counted by sorting (O(L log^2 L))."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must be (R, L) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    length = x.shape[1]
    n0 = length * (length - 1) // 2
    o1 = torch.argsort(y, dim=1, stable=True)
    o2 = torch.argsort(x.gather(1, o1), dim=1, stable=True)
    perm = o1.gather(1, o2)  # lexicographic order by (x, y)
    xs, ys = x.gather(1, perm), y.gather(1, perm)
    n1 = _tied_pairs(xs)  # ties in x (xs sorted)
    n2 = _tied_pairs(torch.sort(y, dim=1).values)
    n3 = _tied_pairs(xs, ys)  # ties in both
    nd = _inversions(ys)  # strict inversions of y in (x, y) order = discordant pairs
    nc = n0 - n1 - n2 + n3 - nd
    denom = torch.sqrt((n0 - n1).double() * (n0 - n2).double())
    tau = (nc - nd).double() / torch.where(denom > 0, denom, 1.0)
    return torch.where(denom > 0, tau, torch.full_like(tau, float("nan")))


@torch.no_grad()
def graded_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    relevance: RelevanceFn,
    *,
    ks: Sequence[int] = (10, 25),
    kendall: bool = True,
    kendall_candidates: int | None = None,
    chunk_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """NDCG@K (each K in ``ks`` and the whole list) and Kendall's tau-b, both directions (module docstring).

    Args:
        image_emb: (N, D) and ``text_emb`` (M, D) embeddings (similarity = dot product), one device.
        relevance: :data:`RelevanceFn` over the same N images and M captions.
        ks: NDCG cut-offs besides the whole list.
        kendall: also compute Kendall's tau (the costlier part: about 20 ms per query of 25,000 candidates on
            a 2-core CPU).
        kendall_candidates: compute tau over this many candidates drawn at random (``seed``; the same draw for
            every query of a direction) instead of the whole list: an estimate for big galleries on a CPU.
        chunk_size: queries per block.
        seed: for ``kendall_candidates``.

    Returns:
        ``{i2t,t2i}_ndcg{K}`` for K in ks, ``{i2t,t2i}_ndcg_all`` (whole list), ``{i2t,t2i}_kendall_tau``.
    """
    device = image_emb.device
    out: dict[str, float] = {}
    for direction, queries, keys in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        all_keys = torch.arange(keys.shape[0], device=device)
        subset = None
        if kendall and kendall_candidates is not None and kendall_candidates < keys.shape[0]:
            gen = torch.Generator().manual_seed(seed)
            subset = torch.randperm(keys.shape[0], generator=gen)[:kendall_candidates].sort().values.to(device)
        sums = {k: 0.0 for k in (*ks, None)}
        tau_sum, tau_count = 0.0, 0
        for start in range(0, queries.shape[0], chunk_size):
            q = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=device)
            sims = queries[q] @ keys.T  # (c, L)
            rel = relevance(q, all_keys) if direction == "i2t" else relevance(all_keys, q).T  # (c, L)
            rel = rel.to(device)
            for k in sums:
                sums[k] += float(ndcg_rows(sims, rel, k).sum())
            if kendall:
                x, y = (sims, rel) if subset is None else (sims[:, subset], rel[:, subset])
                tau = kendall_tau_b_rows(x, y)
                no_preference = (x == x[:, :1]).all(dim=1) & ~(y == y[:, :1]).all(dim=1)
                tau = torch.where(no_preference, torch.zeros_like(tau), tau)  # constant similarities: chance
                ok = ~torch.isnan(tau)
                tau_sum += float(tau[ok].sum())
                tau_count += int(ok.sum())
        count = queries.shape[0]
        for k, total in sums.items():
            out[f"{direction}_ndcg{'_all' if k is None else k}"] = total / count
        if kendall:
            out[f"{direction}_kendall_tau"] = tau_sum / tau_count if tau_count else float("nan")
    return out
