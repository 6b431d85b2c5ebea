"""The ranking losses of :mod:`methods.functional` for a subset of query rows (``scaling.local_loss``).

With the batch of all W ranks gathered (N = W·B pairs), rank r computes only its own B query rows, in both
directions: its images against all N texts (``S_i2t`` (Q, N), rows of S) and its texts against all N images
(``S_t2i`` (Q, N), rows of S.T). Nothing of size (N, N), or (N, N, N) for Smooth-NDCG and all-pairs Kendall,
is built: the work is 1/W of the global loss.

Normalisation: each function returns a value whose **mean over the ranks of a partition of the N rows into
equal blocks** is the global loss of the square batch (``triplet_*``, ``smooth_ndcg_loss``,
``kendall_rank_loss``), so after DDP's gradient averaging every gradient is that of the global loss (scale 1;
see ``orchestrator.distributed``). The triplet and S-NDCG terms are means over query rows, so a rank takes the
mean over its own rows. Kendall's direction loss is ``sum_q num_q / sum_q count_q``, a ratio over *all* rows:
a rank returns ``W · sum_{own q} num_q / C`` with C the count summed over the ranks (``rank_sum``, an
all-reduce of two integers).

Conventions of the row form: query row q is the pair whose image is row q of ``S_i2t`` and whose text is row
q of ``S_t2i``; ``own[q]`` is that pair's column among the N candidates (the diagonal of the square form).
Relevance comes as rows too: ``R_i2t`` (Q, N) = R[own, :] (the query images' relevance to every text) and
``R_t2i`` (Q, N) the rows the t2i lists are scored with: R.T[own, :] for ``t2i_relevance="transpose"``,
R[own, :] (= ``R_i2t``) for ``"as_released"`` (see :func:`relevance_lists`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from methods.blocks import resolve_chunk
from methods.checks import TensorOrFloat, check_kernel, check_same_shape, check_t2i, kendall_options, positive_float
from methods.functional import SELHN_DEFAULT_EPS
from methods.kendall_direction import kendall_sums
from methods.ndcg_direction import ideal_dcg, smooth_ndcg_direction
from methods.relevance import caption_relevance_block

RankSum = Callable[[torch.Tensor], torch.Tensor]


def _check_rows(S_i2t: torch.Tensor, S_t2i: torch.Tensor, own: torch.Tensor) -> tuple[int, int]:
    if S_i2t.dim() != 2 or tuple(S_i2t.shape) != tuple(S_t2i.shape):
        raise ValueError(
            f"S_i2t and S_t2i must be (Q, N) of the same shape, got {tuple(S_i2t.shape)} and {tuple(S_t2i.shape)}"
        )
    Q, N = S_i2t.shape
    if own.dim() != 1 or own.shape[0] != Q:
        raise ValueError(f"own must be ({Q},) column indices, got shape {tuple(own.shape)}")
    return Q, N


def _own_mask(own: torch.Tensor, N: int) -> torch.Tensor:
    """(Q, N) bool, True at each query row's own column."""
    cols = torch.arange(N, device=own.device)
    return own.unsqueeze(1) == cols.unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# triplet (hardest, soft_negative, selhn)
# ---------------------------------------------------------------------------------------------


def _triplet_direction(
    Sq: torch.Tensor,
    own: torch.Tensor,
    excluded: torch.Tensor,
    margin: float,
    mining: str,
    tau: TensorOrFloat,
    eps: float,
) -> torch.Tensor:
    """(Q,) per-anchor loss of one direction: anchor q's list Sq[q] (Q, N), positive at column own[q]."""
    d = Sq.gather(1, own.unsqueeze(1))  # (Q, 1): S of each anchor's own pair
    h = (margin - d + Sq).clamp(min=0).masked_fill(excluded, 0.0)
    if mining == "hardest":
        return h.amax(dim=1)
    if mining == "soft_negative":
        # a finite fill (not -inf) keeps rows without any negative NaN-free: their hinges are 0
        w = torch.softmax((Sq / tau).masked_fill(excluded, torch.finfo(Sq.dtype).min), dim=1)
        return (w * h).sum(1)
    n_neg = (~excluded).sum(1).clamp(min=1).to(Sq.dtype)
    with torch.no_grad():
        gap = (d.detach().squeeze(1) - Sq.detach().masked_fill(excluded, -math.inf).amax(dim=1)).abs()
        soft = gap < eps  # inf gap (no negatives) -> hardest branch (= 0)
    return torch.where(soft, h.sum(1) / n_neg, h.amax(dim=1))


def triplet_rows(
    S_i2t: torch.Tensor,
    S_t2i: torch.Tensor,
    own: torch.Tensor,
    margin: float = 0.2,
    mining: str = "hardest",
    positives: torch.Tensor | None = None,
    tau: TensorOrFloat = 0.05,
    eps: float = SELHN_DEFAULT_EPS,
) -> torch.Tensor:
    """:func:`~methods.functional.triplet_hardest` / ``triplet_soft_negative`` / ``triplet_selhn`` for Q query rows.

    Args:
        S_i2t: (Q, N) query images x all texts; S_t2i: (Q, N) query texts x all images.
        own: (Q,) int64, each query pair's column (its positive) among the N candidates.
        margin: m. mining: ``"hardest"``, ``"soft_negative"`` (softmax weights at ``tau``, not detached) or
            ``"selhn"`` (switch at ``eps``).
        positives: optional (Q, N) bool, candidates that are never negatives (other captions of the same image;
            the same relation in both directions, as from image ids). ``None`` = only ``own``.

    Returns:
        0-d tensor ``(mean_q l_i2t_q + mean_q l_t2i_q) / 2``; the mean over a partition of the N rows into equal
        blocks is the square function's value on the (N, N) batch.
    """
    Q, N = _check_rows(S_i2t, S_t2i, own)
    if mining not in {"hardest", "soft_negative", "selhn"}:
        raise ValueError(f"unknown triplet mining {mining!r}")
    excluded = _own_mask(own, N)
    if positives is not None:
        check_same_shape(S_i2t, positives, "positives")
        excluded = excluded | positives.to(device=S_i2t.device, dtype=torch.bool)
    l_i2t = _triplet_direction(S_i2t, own, excluded, margin, mining, tau, eps)
    l_t2i = _triplet_direction(S_t2i, own, excluded, margin, mining, tau, eps)
    return (l_i2t.mean() + l_t2i.mean()) / 2


# ---------------------------------------------------------------------------------------------
# relevance rows
# ---------------------------------------------------------------------------------------------


def _fill_own(R: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """R (Q, N) with R[q, own[q]] = 1 (the pair's own caption), in place."""
    R[torch.arange(R.shape[0], device=R.device), own] = 1.0
    return R


def relevance_lists(
    R: torch.Tensor, own: torch.Tensor, t2i_relevance: str = "transpose"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_i2t, R_t2i)``, both (Q, N), from an exact (N, N) relevance (rows = images, columns = texts).

    R_i2t = R[own, :], R_t2i = R[:, own].T (``"transpose"``) or R_i2t (``"as_released"``); own entries set to 1
    as the square families do (``R_ii = 1``). New tensors (Q, N); R is not modified.
    """
    check_t2i(t2i_relevance)
    R_i2t = _fill_own(R.detach()[own], own)  # indexing with a tensor copies: R is left alone
    if t2i_relevance == "as_released":
        return R_i2t, R_i2t
    return R_i2t, _fill_own(R.detach()[:, own].t().contiguous(), own)


def caption_relevance_rows(
    caption_emb: torch.Tensor,
    text_emb: torch.Tensor,
    own: torch.Tensor,
    caption_mask: torch.Tensor | None = None,
    rescale: bool = True,
    t2i_relevance: str = "transpose",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~methods.functional.caption_relevance` (RSC) for Q query rows: ``(R_i2t, R_t2i)``, both (Q, N).

    R_i2t[q, j] = max cosine of the captions of query image own[q] with text j: (Q, K, N) work.
    R_t2i (``"transpose"``)[q, i] = max cosine of image i's captions with query text own[q]: (N, K, Q) work;
    ``"as_released"`` reuses R_i2t. Own entries are 1; no gradient.

    Args:
        caption_emb: (N, K, D) embeddings of the captions of every image of the (gathered) batch.
        text_emb: (N, D) each pair's own caption in that space. own: (Q,) int64 query columns.
        caption_mask: optional (N, K) bool (True = a real caption); not validated (no host sync).
    """
    check_t2i(t2i_relevance)
    if caption_emb.dim() != 3 or text_emb.dim() != 2 or text_emb.shape[0] != caption_emb.shape[0]:
        raise ValueError(
            f"caption_emb must be (N, K, D) and text_emb (N, D), got {tuple(caption_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    mask = None if caption_mask is None else caption_mask.to(device=caption_emb.device, dtype=torch.bool)
    R_i2t = _fill_own(
        caption_relevance_block(caption_emb[own], text_emb, None if mask is None else mask[own], rescale), own
    )
    if t2i_relevance == "as_released":
        return R_i2t, R_i2t
    R_t2i = caption_relevance_block(caption_emb, text_emb[own], mask, rescale).t().contiguous()
    return R_i2t, _fill_own(R_t2i, own)


# ---------------------------------------------------------------------------------------------
# Smooth-NDCG and Kendall
# ---------------------------------------------------------------------------------------------


def _lists(S_i2t: torch.Tensor, S_t2i: torch.Tensor, R_i2t: torch.Tensor, R_t2i: torch.Tensor) -> tuple[int, int]:
    if S_i2t.dim() != 2 or tuple(S_i2t.shape) != tuple(S_t2i.shape):
        raise ValueError(
            f"S_i2t and S_t2i must be (Q, N) of the same shape, got {tuple(S_i2t.shape)} and {tuple(S_t2i.shape)}"
        )
    check_same_shape(S_i2t, R_i2t, "R_i2t")
    check_same_shape(S_i2t, R_t2i, "R_t2i")
    Q, N = S_i2t.shape
    return Q, N


def smooth_ndcg_rows(
    S_i2t: torch.Tensor,
    S_t2i: torch.Tensor,
    R_i2t: torch.Tensor,
    R_t2i: torch.Tensor,
    tau: float = 0.01,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """:func:`~methods.functional.smooth_ndcg_loss` for Q query rows (the same blocked / Triton kernels).

    Each query's list is its row: gains and IDCG from ``R_i2t`` (i2t) and ``R_t2i`` (t2i; see the module
    docstring for the two t2i options). Work O(Q N^2), memory O(Q N + block), where the square form is O(N^3).

    Returns:
        0-d tensor ``(mean_q (1 - NDCG_i2t_q) + mean_q (1 - NDCG_t2i_q)) / 2``.
    """
    Q, N = _lists(S_i2t, S_t2i, R_i2t, R_t2i)
    check_kernel(kernel)
    tau_f = positive_float(tau, "tau")
    chunk = resolve_chunk(chunk_size, N * N, Q)
    rel_dtype = S_i2t.dtype if S_i2t.dtype in (torch.float32, torch.float64) else torch.float32

    def direction(Sq: torch.Tensor, Rq: torch.Tensor) -> torch.Tensor:
        Rc = Rq.detach().to(device=Sq.device, dtype=rel_dtype).contiguous()
        return smooth_ndcg_direction(Sq.contiguous(), torch.pow(2.0, Rc) - 1.0, ideal_dcg(Rc), tau_f, chunk, kernel)

    return (direction(S_i2t, R_i2t) + direction(S_t2i, R_t2i)) / 2


def kendall_rows(
    S_i2t: torch.Tensor,
    S_t2i: torch.Tensor,
    R_i2t: torch.Tensor,
    R_t2i: torch.Tensor,
    rank_sum: RankSum,
    gap: float = 0.3,
    surrogate: str = "hinge",
    window: int | None = None,
    hard_k: int | None = None,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """:func:`~methods.functional.kendall_rank_loss` for Q query rows of N candidates (SW-HS included).

    Per direction the global loss is ``sum_q num_q / sum_q count_q`` over all N query rows; this returns
    ``(N / Q) · sum_{own q} num_q / rank_sum(count)``, whose mean over the W = N / Q ranks of an equal partition
    is the global loss (0 where no rank has a valid pair).

    Args:
        rank_sum: sums a tensor over the ranks that share the gathered batch (an all-reduce; see
            ``methods.EmbeddingBatch.sum_over_ranks``); called once, on the (2,) int64 counts of both directions.
        the rest: as in :func:`~methods.functional.kendall_rank_loss` (``R_t2i``: see the module docstring).

    Returns:
        0-d tensor ``(L_i2t + L_t2i) / 2``.
    """
    Q, N = _lists(S_i2t, S_t2i, R_i2t, R_t2i)
    gap_f, temp_f = kendall_options(gap, surrogate, window, hard_k, temperature, kernel)

    def sums(Sq: torch.Tensor, Rq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Rc = Rq.detach().to(device=Sq.device, dtype=Sq.dtype).contiguous()
        return kendall_sums(Sq.contiguous(), Rc, gap_f, surrogate, temp_f, window, hard_k, chunk_size, kernel)

    (num_i2t, cnt_i2t), (num_t2i, cnt_t2i) = sums(S_i2t, R_i2t), sums(S_t2i, R_t2i)
    counts = rank_sum(torch.stack([cnt_i2t.to(torch.int64), cnt_t2i.to(torch.int64)]))
    nums = torch.stack([num_i2t, num_t2i]) * (N / Q)
    # guarded mean over valid pairs: no valid pair on any rank -> 0 (nums are then 0 and keep their graph)
    return (nums / counts.clamp(min=1).to(nums.dtype)).sum() / 2


__all__ = ["triplet_rows", "relevance_lists", "caption_relevance_rows", "smooth_ndcg_rows", "kendall_rows"]
