"""Pure-function losses for image-text retrieval (the maths: ``docs/methods.md``, sections A-C).

Conventions shared by every function here:

* ``S`` is a (B, B) similarity matrix: **rows are images, columns are texts**, and ``S[i, i]`` is
  the annotated pair. Row i is the image-to-text (i2t) list of image i; column j (row j of
  ``S.T``) is the text-to-image (t2i) list of text j.
* ``R`` is a (B, B) graded relevance matrix with the same orientation (``R[i, j]`` = relevance of
  text j to image i). It is *not* symmetric in general (docs/methods.md §E); each loss says which index
  each direction reads.
* ``positives`` is an optional (B, B) bool mask, ``positives[i, j]`` True when text j is a
  ground-truth caption of image i (e.g. built from repeated image ids). ``None`` = diagonal.
* Every loss returns a 0-d tensor on the device / dtype of ``S``, differentiable in ``S``.
  The InfoNCE, Triplet-SN and soft-label-KL temperatures may be 0-d tensors that receive a
  gradient (learnable); the S-NDCG ``tau`` and Kendall ``temperature`` are plain floats.
  Relevance, masks and teacher scores are treated as constants. No device moves.

Each function checks its arguments (ValueError; the shared checks are :mod:`methods.checks`) and computes the
loss. The listwise (S-NDCG) and all-pairs Kendall losses are O(B^3) in compute; their per-direction work lives
in :mod:`methods.ndcg_direction` and :mod:`methods.kendall_direction` (blocked torch autograd Functions with
O(B^2 + block) extra memory, or the fused Triton kernels of :mod:`methods.kernels` on CUDA, chosen by
:mod:`methods.dispatch`, which also holds the one piece of state: the "Triton failed to build" fallback).
"""

from __future__ import annotations

import math

import torch

from methods.blocks import resolve_chunk
from methods.checks import (
    TensorOrFloat,
    check_kernel,
    check_same_shape,
    check_square,
    check_t2i,
    kendall_options,
    positive_float,
)
from methods.dispatch import KERNELS
from methods.kendall_direction import kendall_direction
from methods.ndcg_direction import SNDCG_EXPONENT_CLAMP, ideal_dcg, smooth_ndcg_direction
from methods.relevance import caption_relevance

#: Default epsilon of the SelHN rule: ``--epsilon`` default 0.01 of AAA-Zheng/RVSEPP ``train.py``.
SELHN_DEFAULT_EPS = 0.01


# ---------------------------------------------------------------------------------------------
# InfoNCE (docs/methods.md §C.2 (1))
# ---------------------------------------------------------------------------------------------


def infonce(
    S: torch.Tensor,
    tau: TensorOrFloat,
    positives: torch.Tensor | None = None,
    reduction: str = "sum",
    validate: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE with (multi-positive) soft targets.

    Args:
        S: (B, B) similarities, rows = images, columns = texts.
        tau: temperature, a float or a 0-d tensor (learnable; the gradient flows into it).
        positives: optional (B, B) bool, ``positives[i, j]`` True when text j belongs to image i
            (CUSA: ``idx_i == idx_j``). ``None`` = diagonal. Every row and column needs >= 1 True.
        reduction: ``"sum"`` = textbook cross-entropy (sum over classes, mean over queries);
            ``"class_mean"`` = the released CUSA ``contrastive_loss_mode: "mean"``, i.e. each
            query's cross-entropy divided by the number of classes (B): ``sum / B``.
        validate: check that ``positives`` has a True in every row and column (a host sync: the families,
            whose positives hold the diagonal by construction, pass False).

    Returns:
        0-d tensor ``(l_i2t + l_t2i) / 2`` where
        ``l_i2t = mean_i -sum_j Y_ij log softmax_j(S_ij / tau)`` with ``Y = P / P.sum(1)`` and
        ``l_t2i = mean_j -sum_i Yt_ji log softmax_i(S_ij / tau)`` with ``Yt = P.T / P.T.sum(1)``.
    """
    B = check_square(S)
    if reduction not in ("sum", "class_mean"):
        raise ValueError(f"reduction must be 'sum' or 'class_mean', got {reduction!r}")
    logits = S / tau
    log_p_i2t = torch.log_softmax(logits, dim=1)  # (B, B): over texts, per image
    log_p_t2i = torch.log_softmax(logits.t(), dim=1)  # (B, B): over images, per text
    if positives is None:
        ce_i2t = -log_p_i2t.diagonal()
        ce_t2i = -log_p_t2i.diagonal()
    else:
        check_same_shape(S, positives, "positives")
        P = positives.to(device=S.device, dtype=S.dtype)
        row_counts = P.sum(1, keepdim=True)
        col_counts = P.sum(0, keepdim=True)
        if validate and (bool((row_counts == 0).any()) or bool((col_counts == 0).any())):
            raise ValueError("positives must have at least one True entry in every row and column")
        Y = P / row_counts
        Yt = P.t() / col_counts.t()
        ce_i2t = -(Y * log_p_i2t).sum(1)
        ce_t2i = -(Yt * log_p_t2i).sum(1)
    loss = (ce_i2t.mean() + ce_t2i.mean()) / 2
    if reduction == "class_mean":
        loss = loss / B
    return loss


def infonce_rows(
    S_i2t: torch.Tensor,
    S_t2i: torch.Tensor,
    tau: TensorOrFloat,
    positives: torch.Tensor,
    reduction: str = "sum",
    validate: bool = True,
) -> torch.Tensor:
    """:func:`infonce` for a subset of query rows, both directions (``scaling.local_loss``).

    Args:
        S_i2t: (Q, N) similarities of Q query images with all N texts.
        S_t2i: (Q, N) similarities of the Q query texts (the same pairs) with all N images.
        tau: temperature, a float or a 0-d tensor.
        positives: (Q, N) bool, query row q's positives among the N columns (the same relation in both
            directions: image and text of one pair share a row). Every row needs >= 1 True.
        reduction: as in :func:`infonce`; ``"class_mean"`` divides by the N classes.
        validate: as in :func:`infonce` (rows only).

    Returns:
        0-d tensor ``(mean_q ce_i2t_q + mean_q ce_t2i_q) / 2``: the mean over a partition of the N rows into
        equal parts of this is :func:`infonce` of the whole (N, N) batch.
    """
    if S_i2t.dim() != 2 or tuple(S_i2t.shape) != tuple(S_t2i.shape):
        raise ValueError(
            f"S_i2t and S_t2i must be (Q, N) of the same shape, got {tuple(S_i2t.shape)} and {tuple(S_t2i.shape)}"
        )
    check_same_shape(S_i2t, positives, "positives")
    if reduction not in ("sum", "class_mean"):
        raise ValueError(f"reduction must be 'sum' or 'class_mean', got {reduction!r}")
    P = positives.to(device=S_i2t.device, dtype=S_i2t.dtype)
    counts = P.sum(1, keepdim=True)
    if validate and bool((counts == 0).any()):
        raise ValueError("positives must have at least one True entry in every row")
    Y = P / counts
    ce_i2t = -(Y * torch.log_softmax(S_i2t / tau, dim=1)).sum(1)
    ce_t2i = -(Y * torch.log_softmax(S_t2i / tau, dim=1)).sum(1)
    loss = (ce_i2t.mean() + ce_t2i.mean()) / 2
    if reduction == "class_mean":
        loss = loss / S_i2t.shape[1]
    return loss


# ---------------------------------------------------------------------------------------------
# Triplet losses (docs/methods.md §B.3 pairwise part, A.2, A.8)
# ---------------------------------------------------------------------------------------------


def _exclusion_mask(S: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    """(B, B) bool: True where (i, j) is NOT a negative (the diagonal and any given positive)."""
    B = S.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=S.device)
    if positives is None:
        return eye
    check_same_shape(S, positives, "positives")
    return positives.to(device=S.device, dtype=torch.bool) | eye


def _hinges(S: torch.Tensor, margin: float, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge matrices for both directions, 0 at excluded (non-negative) entries.

    Returns (h_i2t, h_t2i), both (B, B): ``h_i2t[i, j] = [m - S_ii + S_ij]_+`` (anchor image i,
    row-wise) and ``h_t2i[i, j] = [m - S_jj + S_ij]_+`` (anchor text j, column-wise).
    """
    d = S.diagonal()
    h_i2t = (margin - d.unsqueeze(1) + S).clamp(min=0).masked_fill(excluded, 0.0)
    h_t2i = (margin - d.unsqueeze(0) + S).clamp(min=0).masked_fill(excluded, 0.0)
    return h_i2t, h_t2i


def triplet_hardest(S: torch.Tensor, margin: float = 0.2, positives: torch.Tensor | None = None) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss (docs/methods.md §B.3 ``L_pair``).

    Args:
        S: (B, B) similarities, rows = images, columns = texts; ``S[i, i]`` is the positive.
        margin: m.
        positives: optional (B, B) bool. Entries marked True are never negatives (other captions
            of the same image); ``None`` = only the diagonal is excluded (released VSE++ code).

    Returns:
        0-d tensor ``(mean_i max_{j neg} [m - S_ii + S_ij]_+ + mean_j max_{i neg} [m - S_jj + S_ij]_+) / 2``.
        An anchor without any negative contributes 0.
    """
    check_square(S)
    h_i2t, h_t2i = _hinges(S, margin, _exclusion_mask(S, positives))
    return (h_i2t.amax(dim=1).mean() + h_t2i.amax(dim=0).mean()) / 2


def triplet_soft_negative(
    S: torch.Tensor,
    margin: float = 0.2,
    tau: TensorOrFloat = 0.05,
    positives: torch.Tensor | None = None,
    *,
    detach_weights: bool = False,
) -> torch.Tensor:
    """Triplet-SN: triplet loss with softmax-weighted (soft) negative mining (docs/methods.md §A.2 / A.8).

    **Reconstruction** (the BCLS paper body was not reachable): per anchor i (i2t),
    ``w_ij = softmax_{j neg}(S_ij / tau)`` and ``loss_i = sum_{j neg} w_ij [m - S_ii + S_ij]_+``;
    mean over anchors, same column-wise for t2i, directions averaged. tau -> 0 gives
    :func:`triplet_hardest`; tau -> inf gives the average hinge over the negatives.

    The weights are **not detached** by default: gradients flow through ``w`` as well as
    through the hinges (the loss is the smooth function written above). ``detach_weights=True``
    treats the weights as constants (mining-style), an option for ablations.

    Args:
        S: (B, B) similarities, rows = images, columns = texts.
        margin: m.
        tau: softmax temperature tau_sn (float or 0-d tensor; a tensor receives gradient unless
            ``detach_weights``).
        positives: optional (B, B) bool of entries that are not negatives (see triplet_hardest).
        detach_weights: stop the gradient through the softmax weights.

    Returns:
        0-d tensor. An anchor without negatives contributes 0.
    """
    check_square(S)
    excluded = _exclusion_mask(S, positives)
    h_i2t, h_t2i = _hinges(S, margin, excluded)
    # A finite fill (not -inf) keeps rows without any negative NaN-free: their hinges are 0.
    fill = torch.finfo(S.dtype).min
    logits = (S / tau).masked_fill(excluded, fill)
    w_i2t = torch.softmax(logits, dim=1)
    w_t2i = torch.softmax(logits, dim=0)
    if detach_weights:
        w_i2t, w_t2i = w_i2t.detach(), w_t2i.detach()
    return ((w_i2t * h_i2t).sum(1).mean() + (w_t2i * h_t2i).sum(0).mean()) / 2


def triplet_selhn(
    S: torch.Tensor,
    margin: float = 0.2,
    eps: float = SELHN_DEFAULT_EPS,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selectively-hard-negative triplet loss, SelHN (docs/methods.md §A.2; AAA-Zheng/RVSEPP ``loss.py``).

    Per anchor i (i2t): if ``|S_ii - max_{j neg} S_ij| < eps`` use the average hinge
    ``sum_{j neg} [m - S_ii + S_ij]_+ / n_neg``, otherwise the hardest hinge
    ``max_{j neg} [m - S_ii + S_ij]_+``. Same column-wise for t2i; mean over anchors, directions
    averaged. The switch is a non-differentiable selection.

    ``eps`` default 0.01 is the ``--epsilon`` default of RVSEPP ``train.py`` (the spec gives no
    value; it is a documented, configurable choice for BCLS). With ``positives=None``
    ``n_neg = B - 1`` as in the released code; with a mask, n_neg counts the actual negatives.

    Args:
        S: (B, B) similarities, rows = images, columns = texts.
        margin: m.
        eps: switching threshold on the positive-vs-hardest-negative gap.
        positives: optional (B, B) bool of entries that are not negatives.

    Returns:
        0-d tensor. An anchor without negatives contributes 0.
    """
    check_square(S)
    excluded = _exclusion_mask(S, positives)
    h_i2t, h_t2i = _hinges(S, margin, excluded)
    neg = ~excluded
    n_neg_i2t = neg.sum(1).clamp(min=1).to(S.dtype)
    n_neg_t2i = neg.sum(0).clamp(min=1).to(S.dtype)
    with torch.no_grad():
        Sd = S.detach()
        d = Sd.diagonal()
        Sneg = Sd.masked_fill(excluded, -math.inf)
        gap_i2t = (d - Sneg.amax(dim=1)).abs()
        gap_t2i = (d - Sneg.amax(dim=0)).abs()
        soft_i2t = gap_i2t < eps  # inf gap (no negatives) -> hardest branch (= 0)
        soft_t2i = gap_t2i < eps
    l_i2t = torch.where(soft_i2t, h_i2t.sum(1) / n_neg_i2t, h_i2t.amax(dim=1))
    l_t2i = torch.where(soft_t2i, h_t2i.sum(0) / n_neg_t2i, h_t2i.amax(dim=0))
    return (l_i2t.mean() + l_t2i.mean()) / 2


# ---------------------------------------------------------------------------------------------
# CUSA soft-label KL (docs/methods.md §C.2 (2), (3))
# ---------------------------------------------------------------------------------------------


def soft_label_kl(
    student_sim: torch.Tensor,
    teacher_sim: torch.Tensor,
    student_tau: TensorOrFloat,
    teacher_tau: TensorOrFloat = 1.0,
) -> torch.Tensor:
    """Row-wise ``KL(softmax(teacher / teacher_tau) || softmax(student / student_tau))``, batchmean.

    Args:
        student_sim: (B, N) student similarities (e.g. S, S.T, S^II, S^TT); differentiable.
        teacher_sim: (B, N) teacher similarities (G^I, G^T). Detached: no gradient.
        student_tau: tau_c / tau_u, float or 0-d tensor (learnable; receives gradient).
        teacher_tau: tau_s (1.0 in CUSA), float or tensor; detached.

    Returns:
        0-d tensor ``(1/B) sum_rows sum_cols q (log q - log p)``, the same as
        ``F.kl_div(log p, q, reduction="batchmean")``.
    """
    if student_sim.dim() != 2 or tuple(student_sim.shape) != tuple(teacher_sim.shape):
        raise ValueError(
            f"student_sim and teacher_sim must be (B, N) of the same shape, got "
            f"{tuple(student_sim.shape)} and {tuple(teacher_sim.shape)}"
        )
    teacher_tau_c = teacher_tau.detach() if isinstance(teacher_tau, torch.Tensor) else teacher_tau
    log_q = torch.log_softmax(teacher_sim.detach().to(student_sim.dtype) / teacher_tau_c, dim=1)
    log_p = torch.log_softmax(student_sim / student_tau, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# Smooth-NDCG (docs/methods.md §B.3)
# ---------------------------------------------------------------------------------------------


def smooth_ndcg_loss(
    S: torch.Tensor,
    R: torch.Tensor,
    tau: float = 0.01,
    t2i_relevance: str = "transpose",
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Listwise Smooth-NDCG loss over the whole in-batch list (docs/methods.md §B.3).

    i2t, query image i, candidate text j: smooth rank
    ``r_ij = 1 + sum_{k != j} sigmoid(clamp((S_ik - S_ij) / tau, -50, 50))``,
    ``DCG_i = sum_j (2^R_ij - 1) / log2(1 + r_ij)``, IDCG_i from the ideal ranks
    ``1 + #{k : R_ik > R_ij}``, loss ``mean_i (1 - DCG_i / IDCG_i)``.

    t2i, query text j (row j of S.T), candidate image k:

    * ``"transpose"`` (correct): relevance ``R_kj``, i.e. the same computation on ``S.T`` and
      ``R.T`` including R.T's own IDCG.
    * ``"as_released"`` (AAA-Zheng/Listwise_ITR, docs/methods.md §B.8-1): smooth ranks from rows of ``S.T``
      but gains from the untransposed ``R_jk`` and the i2t ``IDCG_j``.

    Returns ``(L_i2t + L_t2i) / 2``. R carries no gradient; rows with zero IDCG contribute 0.

    Memory (:mod:`methods.ndcg_direction`): O(B^2 + chunk_size * B^2) extra, the analytic gradient accumulated
    in the same blocked pass, instead of the released code's several (B, B, B) tensors. Not twice differentiable.

    Args:
        S: (B, B) similarities, rows = images, columns = texts.
        R: (B, B) relevance (row = image, column = text), typically in [0, 1] with R_ii = 1.
        tau: sigmoid temperature (float; not learnable).
        t2i_relevance: ``"transpose"`` or ``"as_released"``.
        chunk_size: queries per chunk; default ``max(1, 2**24 // B**2)``.
        kernel: ``"auto"`` (fused Triton kernels on CUDA float32/16, :mod:`methods.kernels`; O(B^2)
            memory traffic), ``"torch"`` (the blocked form) or ``"triton"`` (force the kernels).

    Returns:
        0-d tensor.
    """
    B = check_square(S)
    check_same_shape(S, R, "R")
    check_t2i(t2i_relevance)
    check_kernel(kernel)
    tau_f = positive_float(tau, "tau")
    chunk = resolve_chunk(chunk_size, B * B, B)
    # relevance, gains and IDCG in at least float32 (the Triton path keeps half-precision S's ranks in float32)
    rel_dtype = S.dtype if S.dtype in (torch.float32, torch.float64) else torch.float32
    Rc = R.detach().to(device=S.device, dtype=rel_dtype)
    gains = torch.pow(2.0, Rc) - 1.0
    idcg = ideal_dcg(Rc)
    l_i2t = smooth_ndcg_direction(S, gains, idcg, tau_f, chunk, kernel)
    St = S.t().contiguous()
    if t2i_relevance == "transpose":
        Rt = Rc.t().contiguous()
        l_t2i = smooth_ndcg_direction(St, gains.t().contiguous(), ideal_dcg(Rt), tau_f, chunk, kernel)
    else:
        l_t2i = smooth_ndcg_direction(St, gains, idcg, tau_f, chunk, kernel)
    return (l_i2t + l_t2i) / 2


# ---------------------------------------------------------------------------------------------
# Kendall ranking loss with SW-HS (docs/methods.md §A.3, A.4, A.8)
# ---------------------------------------------------------------------------------------------


def kendall_rank_loss(
    S: torch.Tensor,
    R: torch.Tensor,
    gap: float = 0.3,
    surrogate: str = "hinge",
    t2i_relevance: str = "transpose",
    window: int | None = None,
    hard_k: int | None = None,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Kendall-style pairwise ranking loss with label gap, optional SW-HS (docs/methods.md §A.3, A.4, A.8).

    i2t, query image i: every pair of candidate texts (j, k) with ``R_ij - R_ik > gap`` is
    penalised by ``phi(S_ik - S_ij)``; the direction's loss is ``sum M * phi / sum M`` (0 if
    there is no valid pair). Surrogates: ``hinge`` = ``relu(x)`` (released ITM_CLS, no margin),
    ``tanh`` = ``(1 + tanh(x / temperature)) / 2``, ``sigmoid`` = ``sigmoid(x / temperature)``.

    t2i, query text j (row j of S.T): ``"transpose"`` builds the mask from ``R.T`` (relevance
    ``R_kj`` of candidate image k); ``"as_released"`` reuses the mask built from R (docs/methods.md §A.3;
    with hinge and no window this is the released ITM_CLS ``RCLoss`` Kendall term).

    SW-HS (**reconstruction**, docs/methods.md §A.8): for each query, candidates are ordered by relevance
    (descending, stable sort) and the candidate at sorted position p is paired only with
    positions p+1 .. p+window (pairs must still pass the gap). If ``hard_k`` is set, only the
    ``hard_k`` valid pairs with the largest penalty are kept per query (and direction); the
    denominator counts the kept pairs. ``window=None`` = all pairs; ``window >= B - 1`` with
    ``hard_k=None`` equals the full loss.

    Returns ``(L_i2t + L_t2i) / 2``; R carries no gradient.

    Memory (:mod:`methods.kendall_direction`): all pairs O(B^2 + chunk_size * B^2) extra (blocked, the analytic
    gradient in the same pass); with a window O(B^2 w) (unfolded relevance-sorted rows, checkpointed per query
    chunk); hard mining selects without grad (chunked) and differentiates only the kept O(B * hard_k) pairs.

    Args:
        S: (B, B) similarities, rows = images, columns = texts.
        R: (B, B) relevance (row = image, column = text).
        gap: label gap gamma (>= 0).
        surrogate: ``"hinge"``, ``"tanh"`` or ``"sigmoid"``.
        t2i_relevance: ``"transpose"`` or ``"as_released"``.
        window: SW-HS window size w >= 1, or None for all pairs.
        hard_k: pairs kept per query (>= 1), or None for all.
        temperature: temperature of the tanh / sigmoid surrogates (float).
        chunk_size: queries per chunk; default so one buffer holds <= 2**24 elements.
        kernel: all-pairs form only (no window, no hard_k): ``"auto"`` (fused Triton kernel on CUDA
            float32/16, :mod:`methods.kernels`), ``"torch"`` (blocked) or ``"triton"`` (force it).

    Returns:
        0-d tensor.
    """
    check_square(S)
    check_same_shape(S, R, "R")
    check_t2i(t2i_relevance)
    gap_f, temp_f = kendall_options(gap, surrogate, window, hard_k, temperature, kernel)
    Rc = R.detach().to(device=S.device, dtype=S.dtype)
    l_i2t = kendall_direction(S, Rc, gap_f, surrogate, temp_f, window, hard_k, chunk_size, kernel)
    St = S.t().contiguous()
    Rt = Rc.t().contiguous() if t2i_relevance == "transpose" else Rc
    l_t2i = kendall_direction(St, Rt, gap_f, surrogate, temp_f, window, hard_k, chunk_size, kernel)
    return (l_i2t + l_t2i) / 2


__all__ = [
    "infonce",
    "infonce_rows",
    "triplet_hardest",
    "triplet_soft_negative",
    "triplet_selhn",
    "soft_label_kl",
    "caption_relevance",
    "smooth_ndcg_loss",
    "kendall_rank_loss",
    "check_kernel",
    "SELHN_DEFAULT_EPS",
    "SNDCG_EXPONENT_CLAMP",
    "KERNELS",
]
