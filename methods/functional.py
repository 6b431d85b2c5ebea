"""Pure-function losses for image-text retrieval (methods spec ``shared/docs/methods-spec.md``, A-C).

Conventions shared by every function here:

* ``S`` is a (B, B) similarity matrix: **rows are images, columns are texts**, and ``S[i, i]`` is
  the annotated pair. Row i is the image-to-text (i2t) list of image i; column j (row j of
  ``S.T``) is the text-to-image (t2i) list of text j.
* ``R`` is a (B, B) graded relevance matrix with the same orientation (``R[i, j]`` = relevance of
  text j to image i). It is *not* symmetric in general (spec E); each loss says which index
  each direction reads.
* ``positives`` is an optional (B, B) bool mask, ``positives[i, j]`` True when text j is a
  ground-truth caption of image i (e.g. built from repeated image ids). ``None`` = diagonal.
* Every loss returns a 0-d tensor on the device / dtype of ``S``, differentiable in ``S``.
  The InfoNCE, Triplet-SN and soft-label-KL temperatures may be 0-d tensors that receive a
  gradient (learnable); the S-NDCG ``tau`` and Kendall ``temperature`` are plain floats.
  Relevance, masks and teacher scores are treated as constants. No state, no device moves.

The listwise (S-NDCG) and all-pairs Kendall losses are O(B^3) in compute. The released code
materialises several (B, B, B) tensors (plus autograd buffers); here they are evaluated in
blocks of queries (``chunk_size`` queries, at most 2**24 elements per buffer by default; on CPU
also cut to ``CPU_TILE_ELEMENTS``) by custom autograd functions that accumulate the analytic
gradient in the same pass and keep only a (B, B) gradient for backward. Extra memory is
O(B^2 + block) with the same values and gradients as the naive form (tested in float64). On CUDA
(``kernel="auto"``) both run as fused Triton kernels instead (:mod:`methods.kernels`): the same
maths without writing any block, so memory traffic is O(B^2) as well.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from methods import kernels as _kernels

log = logging.getLogger(__name__)

TensorOrFloat = Union[torch.Tensor, float]

#: Elements per chunk buffer for the chunked O(B^3) kernels (2**24 -> 64 MB in float32).
CHUNK_ELEMENTS = 2**24

#: On CPU the O(B^3) kernels work on blocks of about this many elements (cache-sized).
CPU_TILE_ELEMENTS = 2**22

#: Default epsilon of the SelHN rule: ``--epsilon`` default 0.01 of AAA-Zheng/RVSEPP ``train.py``.
SELHN_DEFAULT_EPS = 0.01

#: The released Listwise code clamps (S_ik - S_ij) / tau to this range before the sigmoid.
SNDCG_EXPONENT_CLAMP = 50.0

_SURROGATES = ("hinge", "tanh", "sigmoid")
_T2I_OPTIONS = ("transpose", "as_released")
#: Implementations of the O(B^3) losses: ``auto`` = the fused Triton kernels for float32/16 CUDA
#: tensors when triton imports (``methods.kernels``), else the blocked torch form.
KERNELS = ("auto", "torch", "triton")

_triton_failed = False  # set when a Triton kernel failed to build in "auto" mode: torch from then on


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _check_square(S: torch.Tensor, name: str = "S") -> int:
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square (B, B) matrix, got shape {tuple(S.shape)}")
    return int(S.shape[0])


def _check_same_shape(S: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if tuple(other.shape) != tuple(S.shape):
        raise ValueError(f"{name} must have the shape of S {tuple(S.shape)}, got {tuple(other.shape)}")


def _check_t2i(t2i_relevance: str) -> None:
    if t2i_relevance not in _T2I_OPTIONS:
        raise ValueError(f"t2i_relevance must be one of {_T2I_OPTIONS}, got {t2i_relevance!r}")


def _default_chunk(rows_elements: int) -> int:
    """Queries per chunk so that one (chunk, ...) buffer holds at most CHUNK_ELEMENTS elements."""
    return max(1, CHUNK_ELEMENTS // max(1, rows_elements))


def _resolve_chunk(chunk_size: Optional[int], per_query_elements: int, num_queries: int) -> int:
    if chunk_size is None:
        chunk = _default_chunk(per_query_elements)
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, min(chunk, max(1, num_queries)))


def check_kernel(kernel: str) -> None:
    """ValueError unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _use_triton(S: torch.Tensor, kernel: str) -> bool:
    """Whether the O(B^3) losses run the fused Triton kernels on S (see :data:`KERNELS`)."""
    if kernel == "torch":
        return False
    if kernel == "triton":
        if not _kernels.supported(S):
            raise ValueError(
                "kernel='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); "
                f"got a {S.device.type} tensor, triton {'available' if _kernels.AVAILABLE else 'not installed'}"
            )
        return True
    return S.is_cuda and S.dtype != torch.float64 and _kernels.AVAILABLE and not _triton_failed


def _auto_fallback(kernel: str, err: Exception) -> None:
    """In "auto" mode a Triton build failure falls back to torch (once, with a warning); else re-raise."""
    global _triton_failed
    if kernel != "auto" or isinstance(err, torch.cuda.OutOfMemoryError):
        raise err
    _triton_failed = True
    log.warning("Triton kernel failed (%s: %s); using the blocked torch form of the O(B^3) losses from now on",
                type(err).__name__, err)


def _float(x: TensorOrFloat, name: str) -> float:
    value = float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)
    if not value > 0.0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def _exclusion_mask(S: torch.Tensor, positives: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, B) bool: True where (i, j) is NOT a negative (the diagonal and any given positive)."""
    B = S.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=S.device)
    if positives is None:
        return eye
    _check_same_shape(S, positives, "positives")
    return positives.to(device=S.device, dtype=torch.bool) | eye


# ---------------------------------------------------------------------------------------------
# InfoNCE (spec C.2 (1))
# ---------------------------------------------------------------------------------------------


def infonce(
    S: torch.Tensor,
    tau: TensorOrFloat,
    positives: Optional[torch.Tensor] = None,
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
    B = _check_square(S)
    if reduction not in ("sum", "class_mean"):
        raise ValueError(f"reduction must be 'sum' or 'class_mean', got {reduction!r}")
    logits = S / tau
    log_p_i2t = torch.log_softmax(logits, dim=1)  # (B, B): over texts, per image
    log_p_t2i = torch.log_softmax(logits.t(), dim=1)  # (B, B): over images, per text
    if positives is None:
        ce_i2t = -log_p_i2t.diagonal()
        ce_t2i = -log_p_t2i.diagonal()
    else:
        _check_same_shape(S, positives, "positives")
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
        raise ValueError(f"S_i2t and S_t2i must be (Q, N) of the same shape, got {tuple(S_i2t.shape)} "
                         f"and {tuple(S_t2i.shape)}")
    _check_same_shape(S_i2t, positives, "positives")
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
# Triplet losses (spec B.3 pairwise part, A.2, A.8)
# ---------------------------------------------------------------------------------------------


def _hinges(S: torch.Tensor, margin: float, excluded: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hinge matrices for both directions, 0 at excluded (non-negative) entries.

    Returns (h_i2t, h_t2i), both (B, B): ``h_i2t[i, j] = [m - S_ii + S_ij]_+`` (anchor image i,
    row-wise) and ``h_t2i[i, j] = [m - S_jj + S_ij]_+`` (anchor text j, column-wise).
    """
    d = S.diagonal()
    h_i2t = (margin - d.unsqueeze(1) + S).clamp(min=0).masked_fill(excluded, 0.0)
    h_t2i = (margin - d.unsqueeze(0) + S).clamp(min=0).masked_fill(excluded, 0.0)
    return h_i2t, h_t2i


def triplet_hardest(
    S: torch.Tensor, margin: float = 0.2, positives: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss (spec B.3 ``L_pair``).

    Args:
        S: (B, B) similarities, rows = images, columns = texts; ``S[i, i]`` is the positive.
        margin: m.
        positives: optional (B, B) bool. Entries marked True are never negatives (other captions
            of the same image); ``None`` = only the diagonal is excluded (released VSE++ code).

    Returns:
        0-d tensor ``(mean_i max_{j neg} [m - S_ii + S_ij]_+ + mean_j max_{i neg} [m - S_jj + S_ij]_+) / 2``.
        An anchor without any negative contributes 0.
    """
    _check_square(S)
    h_i2t, h_t2i = _hinges(S, margin, _exclusion_mask(S, positives))
    return (h_i2t.amax(dim=1).mean() + h_t2i.amax(dim=0).mean()) / 2


def triplet_soft_negative(
    S: torch.Tensor,
    margin: float = 0.2,
    tau: TensorOrFloat = 0.05,
    positives: Optional[torch.Tensor] = None,
    *,
    detach_weights: bool = False,
) -> torch.Tensor:
    """Triplet-SN: triplet loss with softmax-weighted (soft) negative mining (spec A.2 / A.8).

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
    _check_square(S)
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
    positives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Selectively-hard-negative triplet loss, SelHN (spec A.2; AAA-Zheng/RVSEPP ``loss.py``).

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
    _check_square(S)
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
# CUSA soft-label KL (spec C.2 (2), (3))
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
# RSC relevance (spec B.2, A.1)
# ---------------------------------------------------------------------------------------------


def caption_relevance(
    caption_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_mask: Optional[torch.Tensor] = None,
    rescale: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Relevance Score Calculation: max cosine between an image's captions and each batch text.

    ``R_ij = max_{c in C(i)} cos(e_c, e_{t_j})``, then ``(1 + R) / 2`` if ``rescale``, then
    ``R_ii = 1``. Embeddings are L2-normalised inside. Computed under ``no_grad``: the result
    is a constant label matrix (no gradient flows into the embeddings).

    Args:
        caption_emb: (B, K, D) embeddings of the (up to K) captions of each batch image.
        text_emb: (B, D) embedding of each batch text (the sample's own caption).
        caption_mask: optional (B, K) bool, True = a real caption (for images with fewer than
            K captions). Every image needs at least one real caption.
        rescale: map [-1, 1] to [0, 1] (Listwise RSC); ITM_CLS / LG_ITM use ``rescale=False``.
        validate: check the mask (a host sync; the training loop's masks hold each pair's own caption).

    Returns:
        (B, B) tensor R (row = image i, column = text j), dtype of ``caption_emb``, no grad.
    """
    if caption_emb.dim() != 3 or text_emb.dim() != 2:
        raise ValueError(
            f"caption_emb must be (B, K, D) and text_emb (B, D), got {tuple(caption_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    B, K, D = caption_emb.shape
    if text_emb.shape[0] != B or text_emb.shape[1] != D:
        raise ValueError(f"text_emb must be ({B}, {D}), got {tuple(text_emb.shape)}")
    mask = None
    if caption_mask is not None:
        if tuple(caption_mask.shape) != (B, K):
            raise ValueError(f"caption_mask must be ({B}, {K}), got {tuple(caption_mask.shape)}")
        mask = caption_mask.to(device=caption_emb.device, dtype=torch.bool)
        if validate and not bool(mask.any(dim=1).all()):
            raise ValueError("caption_mask: every image needs at least one real caption")
    R = _caption_relevance_block(caption_emb, text_emb, mask, rescale)
    R.fill_diagonal_(1.0)
    return R


def _caption_relevance_block(caption_emb: torch.Tensor, text_emb: torch.Tensor, mask: Optional[torch.Tensor],
                             rescale: bool) -> torch.Tensor:
    """(I, J) ``max_k cos(caption_emb[i, k], text_emb[j])`` (then ``(1 + R) / 2`` if ``rescale``), no grad.

    caption_emb (I, K, D), text_emb (J, D), mask (I, K) bool or None (True = a real caption).
    """
    with torch.no_grad():
        c = F.normalize(caption_emb.detach(), dim=-1)
        t = F.normalize(text_emb.detach().to(c.dtype), dim=-1)
        sims = torch.einsum("bkd,jd->bkj", c, t)  # (I, K, J)
        if mask is not None:
            sims = sims.masked_fill(~mask.unsqueeze(2), -math.inf)
        R = sims.amax(dim=1)
        if rescale:
            R = (1.0 + R) / 2.0
    return R


# ---------------------------------------------------------------------------------------------
# Smooth-NDCG (spec B.3)
# ---------------------------------------------------------------------------------------------


def _block_shape(Q: int, N: int, chunk: int, device: torch.device) -> Tuple[int, int]:
    """(queries, candidates j) per block of the O(N^3) kernels; a block holds (c, jt, N) buffers.

    Queries go ``chunk`` at a time (the memory bound). On CPU blocks are cut further to about
    ``CPU_TILE_ELEMENTS`` elements (fewer queries, then row blocks of candidates j): fewer, larger
    passes would thrash the cache, and a single query's (N, N) slab can be large.
    """
    c, jt = max(1, min(chunk, Q)), N
    if device.type == "cpu":
        tile = max(1, int(CPU_TILE_ELEMENTS))
        c = max(1, min(c, tile // max(1, N * N)))
        if c * N * N > tile:
            jt = max(1, min(N, tile // max(1, N)))
    return c, jt


def _blocks(Q: int, N: int, c: int, jt: int) -> Iterator[Tuple[int, int, int, int]]:
    """Blocks (q0, q1, j0, j1) covering the (Q, N) query x candidate grid."""
    for q0 in range(0, Q, c):
        q1 = min(Q, q0 + c)
        for j0 in range(0, N, jt):
            yield q0, q1, j0, min(N, j0 + jt)


def _views(bufs: Sequence[torch.Tensor], shape: Tuple[int, int, int]) -> List[torch.Tensor]:
    """Views of the preallocated flat buffers with a block's shape (no allocation per block)."""
    n = shape[0] * shape[1] * shape[2]
    return [b[:n].view(shape) for b in bufs]


class _SmoothNDCGDirection(torch.autograd.Function):
    """One direction of the Smooth-NDCG loss, ``mean_q (1 - DCG_q / IDCG_q)``, O(N^2) memory.

    Inputs: score rows S (Q, N), constant gains (Q, N) and IDCG (Q,). Smooth ranks
    ``r_qj = 1 + sum_{k != j} sigmoid(clamp((S_qk - S_qj) / tau, -c, c))`` are evaluated block by
    block (see :func:`_blocks`); each block holds every k for its (q, j), so ``dL/dr_qj`` is
    known inside the block and the gradient is accumulated in the same pass:
    ``dL/dS_qm = (1/tau) [sum_j g_qj s'_qjm - g_qm sum_k s'_qmk]`` with ``s'`` the sigmoid
    derivative at the clamped argument (``s'_qjj = 0``). Autograd through the clamp would give
    exactly 0 outside [-c, c] instead of sigmoid'(+-c) <= 2e-22: a negligible difference.
    Only the (Q, N) gradient is kept for backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, S, gains, idcg, tau, chunk, clamp):  # type: ignore[override]
        Q, N = S.shape
        need_grad = bool(ctx.needs_input_grad[0])
        ok = idcg != 0
        inv_idcg = torch.where(ok, 1.0 / torch.where(ok, idcg, torch.ones_like(idcg)), torch.zeros_like(idcg))
        dcg = torch.zeros(Q, dtype=S.dtype, device=S.device)
        grad = torch.zeros_like(S) if need_grad else None
        scale = 1.0 / (Q * math.log(2.0))
        c, jt = _block_shape(Q, N, chunk, S.device)
        bufs = [S.new_empty(c * jt * N) for _ in range(2 if need_grad else 1)]
        for q0, q1, j0, j1 in _blocks(Q, N, c, jt):
            s = S[q0:q1]
            views = _views(bufs, (q1 - q0, j1 - j0, N))
            x = views[0]
            torch.sub(s.unsqueeze(1), s[:, j0:j1].unsqueeze(2), out=x)  # x[q, j, k] = S_qk - S_qj
            x.div_(tau).clamp_(-clamp, clamp).sigmoid_()
            x.diagonal(offset=j0, dim1=1, dim2=2).zero_()  # drop k == j
            r1 = x.sum(dim=2).add_(2.0)  # 1 + rank
            log_r1 = torch.log2(r1)
            G = gains[q0:q1, j0:j1]
            dcg[q0:q1] += (G / log_r1).sum(dim=1)
            if need_grad:
                g = G * inv_idcg[q0:q1].unsqueeze(1) * scale / (r1 * log_r1 * log_r1)  # dL/dr_qj
                # sigmoid' at the clamped argument: s - s^2. Autograd through clamp gives exactly 0
                # outside [-c, c]; here it is sigmoid'(+-c) <= 2e-22 (0 at +c), a negligible gap
                # that saves a mask pass over the block.
                x.sub_(torch.mul(x, x, out=views[1]))
                grad[q0:q1] += torch.bmm(g.unsqueeze(1), x).squeeze(1)
                grad[q0:q1, j0:j1] -= g * x.sum(dim=2)
        del bufs
        # A row whose IDCG is 0 (all gains 0) has nothing to rank: NDCG := 1, i.e. loss 0.
        ndcg = torch.where(ok, dcg * inv_idcg, torch.ones_like(dcg))
        loss = (1.0 - ndcg).mean()
        if need_grad:
            ctx.save_for_backward(grad.div_(tau))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g_loss, None, None, None, None, None


class _SmoothNDCGDirectionTriton(torch.autograd.Function):
    """:class:`_SmoothNDCGDirection` with the fused kernels of :mod:`methods.kernels`.

    Forward: one kernel for the (Q, N) smooth ranks, then O(N^2) torch for DCG and ``g = dL/dr``;
    backward: one kernel for ``dL/dS`` from S and g (saved, both (Q, N)). Ranks, DCG and g are kept
    in float32 for float16 / bfloat16 S (a bfloat16 rank of 4096 would be off by 16).
    """

    @staticmethod
    def forward(ctx, S, gains, idcg, tau, clamp, kernel):  # type: ignore[override]
        Q = S.shape[0]
        r1 = _kernels.sndcg_ranks(S, tau, clamp)  # 1 + rank, float32 (float64 for float64 S)
        gains, idcg = gains.to(r1.dtype), idcg.to(r1.dtype)
        ok = idcg != 0
        inv_idcg = torch.where(ok, 1.0 / torch.where(ok, idcg, torch.ones_like(idcg)), torch.zeros_like(idcg))
        log_r1 = torch.log2(r1)
        dcg = (gains / log_r1).sum(dim=1)
        ndcg = torch.where(ok, dcg * inv_idcg, torch.ones_like(dcg))
        if ctx.needs_input_grad[0]:
            g = gains * inv_idcg.unsqueeze(1) / (Q * math.log(2.0)) / (r1 * log_r1 * log_r1)  # dL/dr_qj
            ctx.save_for_backward(S, g)
            ctx.tau, ctx.clamp, ctx.kernel = tau, clamp, kernel
        return (1.0 - ndcg).mean().to(S.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss):  # type: ignore[override]
        S, g = ctx.saved_tensors
        try:
            grad = _kernels.sndcg_rank_grad(S, g, ctx.tau, ctx.clamp)
        except Exception as err:  # the gradient kernel failed to build: see _auto_fallback
            _auto_fallback(ctx.kernel, err)
            grad = _sndcg_rank_grad_blocked(S.to(g.dtype), g, ctx.tau, ctx.clamp)
        return grad.to(S.dtype) * g_loss, None, None, None, None, None


def _sndcg_rank_grad_blocked(S: torch.Tensor, g: torch.Tensor, tau: float, clamp: float) -> torch.Tensor:
    """Torch form of the Triton gradient kernel: ``(1/tau) sum_k s'_qmk (g_qk - g_qm)``, S, g: (Q, N).

    ``s'`` = sigmoid' at ``clamp((S_qk - S_qm) / tau)``; queries in blocks of at most 2**24 elements.
    """
    Q, N = S.shape
    out = torch.empty_like(S)
    chunk = _default_chunk(N * N)
    for q0 in range(0, Q, chunk):
        s, gq = S[q0 : q0 + chunk], g[q0 : q0 + chunk]
        x = ((s.unsqueeze(1) - s.unsqueeze(2)) / tau).clamp_(-clamp, clamp).sigmoid_()  # [q, m, k]
        out[q0 : q0 + chunk] = ((x - x * x) * (gq.unsqueeze(1) - gq.unsqueeze(2))).sum(dim=2) / tau
    return out


def _ideal_dcg(R: torch.Tensor) -> torch.Tensor:
    """(Q,) IDCG per row of R with rank*_qj = 1 + #{k : R_qk > R_qj} (ties share a rank). No grad."""
    with torch.no_grad():
        N = R.shape[1]
        sorted_asc = torch.sort(R, dim=1).values.contiguous()
        n_leq = torch.searchsorted(sorted_asc, R.contiguous(), right=True)  # #{k : R_qk <= R_qj}
        ideal_rank = (N - n_leq + 1).to(R.dtype)
        gains = torch.pow(2.0, R) - 1.0
        return (gains / torch.log2(1.0 + ideal_rank)).sum(dim=1)


def _ndcg_direction(
    Sq: torch.Tensor, gains: torch.Tensor, idcg: torch.Tensor, tau: float, chunk: int, kernel: str = "torch"
) -> torch.Tensor:
    """mean_q (1 - DCG_q / IDCG_q) for query rows Sq (Q, N), gains (Q, N), idcg (Q,)."""
    if _use_triton(Sq, kernel):
        try:
            return _SmoothNDCGDirectionTriton.apply(Sq, gains, idcg, tau, SNDCG_EXPONENT_CLAMP, kernel)
        except Exception as err:  # a kernel that fails to build: see _auto_fallback
            _auto_fallback(kernel, err)
    return _SmoothNDCGDirection.apply(Sq, gains.to(Sq.dtype), idcg.to(Sq.dtype), tau, chunk, SNDCG_EXPONENT_CLAMP)


def smooth_ndcg_loss(
    S: torch.Tensor,
    R: torch.Tensor,
    tau: float = 0.01,
    t2i_relevance: str = "transpose",
    chunk_size: Optional[int] = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Listwise Smooth-NDCG loss over the whole in-batch list (spec B.3).

    i2t, query image i, candidate text j: smooth rank
    ``r_ij = 1 + sum_{k != j} sigmoid(clamp((S_ik - S_ij) / tau, -50, 50))``,
    ``DCG_i = sum_j (2^R_ij - 1) / log2(1 + r_ij)``, IDCG_i from the ideal ranks
    ``1 + #{k : R_ik > R_ij}``, loss ``mean_i (1 - DCG_i / IDCG_i)``.

    t2i, query text j (row j of S.T), candidate image k:

    * ``"transpose"`` (correct): relevance ``R_kj``, i.e. the same computation on ``S.T`` and
      ``R.T`` including R.T's own IDCG.
    * ``"as_released"`` (AAA-Zheng/Listwise_ITR, spec B.8-1): smooth ranks from rows of ``S.T``
      but gains from the untransposed ``R_jk`` and the i2t ``IDCG_j``.

    Returns ``(L_i2t + L_t2i) / 2``. R carries no gradient; rows with zero IDCG contribute 0.

    Memory: the smooth ranks are computed ``chunk_size`` queries at a time by a custom
    autograd function that accumulates the analytic gradient in the same pass (no recompute,
    nothing of size B^3 kept), so extra memory is O(B^2 + chunk_size * B^2) instead of the
    released code's several (B, B, B) tensors. Not twice differentiable.

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
    B = _check_square(S)
    _check_same_shape(S, R, "R")
    _check_t2i(t2i_relevance)
    check_kernel(kernel)
    tau_f = _float(tau, "tau")
    chunk = _resolve_chunk(chunk_size, B * B, B)
    # relevance, gains and IDCG in at least float32 (the Triton path keeps half-precision S's ranks in float32)
    rel_dtype = S.dtype if S.dtype in (torch.float32, torch.float64) else torch.float32
    Rc = R.detach().to(device=S.device, dtype=rel_dtype)
    gains = torch.pow(2.0, Rc) - 1.0
    idcg = _ideal_dcg(Rc)
    l_i2t = _ndcg_direction(S, gains, idcg, tau_f, chunk, kernel)
    St = S.t().contiguous()
    if t2i_relevance == "transpose":
        Rt = Rc.t().contiguous()
        l_t2i = _ndcg_direction(St, gains.t().contiguous(), _ideal_dcg(Rt), tau_f, chunk, kernel)
    else:
        l_t2i = _ndcg_direction(St, gains, idcg, tau_f, chunk, kernel)
    return (l_i2t + l_t2i) / 2


# ---------------------------------------------------------------------------------------------
# Kendall ranking loss with SW-HS (spec A.3, A.4, A.8)
# ---------------------------------------------------------------------------------------------


def _penalty(x: torch.Tensor, surrogate: str, temperature: float) -> torch.Tensor:
    """Surrogate of the discordance indicator I(S_ik > S_ij) applied to x = S_ik - S_ij."""
    if surrogate == "hinge":
        return torch.relu(x)
    if surrogate == "tanh":
        return (1.0 + torch.tanh(x / temperature)) / 2.0
    return torch.sigmoid(x / temperature)


class _KendallAllPairs(torch.autograd.Function):
    """``sum_{q,j,k} M_qjk * phi(S_qk - S_qj)`` with ``M_qjk = I(R_qj - R_qk > gap)``, all pairs.

    Inputs S, R (Q, N). Outputs (numerator, count); count is not differentiable. Evaluated block
    by block (see :func:`_blocks`), the gradient of the numerator accumulated in the same pass:
    ``dnum/dS_qm = sum_j W_qjm - sum_k W_qmk`` with ``W = M * phi'(x)`` (relu' = 1[x > 0]).
    Only the (Q, N) gradient is kept for backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, S, R, gap, surrogate, temperature, chunk):  # type: ignore[override]
        Q, N = S.shape
        need_grad = bool(ctx.needs_input_grad[0])
        num = torch.zeros((), dtype=torch.float64, device=S.device)
        cnt = torch.zeros((), dtype=torch.float64, device=S.device)
        grad = torch.zeros_like(S) if need_grad else None
        c, jt = _block_shape(Q, N, chunk, S.device)
        bufs = [S.new_empty(c * jt * N) for _ in range(3)]
        for q0, q1, j0, j1 in _blocks(Q, N, c, jt):
            s, r = S[q0:q1], R[q0:q1]
            mf, x, w = _views(bufs, (q1 - q0, j1 - j0, N))
            # Valid-pair mask as a float {0, 1}: fl(R_qj - R_qk) - gap > 0 <=> fl(R_qj - R_qk) > gap
            # (IEEE subtraction is exact in sign), so it equals the bool mask of the spec; float
            # masks avoid bool masked_fill / where, which are much slower on CPU.
            torch.sub(r[:, j0:j1].unsqueeze(2), r.unsqueeze(1), out=mf)  # R_qj - R_qk
            mf.sub_(gap).sign_().clamp_(min=0.0)
            cnt += mf.sum(dim=2).sum(dtype=torch.float64)  # row sums <= N are exact
            torch.sub(s.unsqueeze(1), s[:, j0:j1].unsqueeze(2), out=x)  # x[q, j, k] = S_qk - S_qj
            if surrogate == "hinge":
                pen = x.relu_().mul_(mf)
                if need_grad:
                    torch.sign(pen, out=w)  # relu' = 1[x > 0], on valid pairs only
            elif surrogate == "tanh":
                t = x.div_(temperature).tanh_()
                if need_grad:
                    torch.mul(t, t, out=w).neg_().add_(1.0).mul_(mf).div_(2.0 * temperature)
                pen = t.add_(1.0).div_(2.0).mul_(mf)
            else:
                sg = x.div_(temperature).sigmoid_()
                if need_grad:
                    torch.mul(sg, sg, out=w).neg_().add_(sg).mul_(mf).div_(temperature)  # (s - s^2)
                pen = sg.mul_(mf)
            num += pen.sum()
            if need_grad:
                grad[q0:q1] += w.sum(dim=1)
                grad[q0:q1, j0:j1] -= w.sum(dim=2)
        del bufs
        if need_grad:
            ctx.save_for_backward(grad)
        cnt_i = cnt.round().to(torch.int64)
        ctx.mark_non_differentiable(cnt_i)
        return num.to(S.dtype), cnt_i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_num, g_cnt):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g_num, None, None, None, None, None


class _KendallAllPairsTriton(torch.autograd.Function):
    """:class:`_KendallAllPairs` with the fused kernel of :mod:`methods.kernels` (one pass, O(N^2) memory)."""

    @staticmethod
    def forward(ctx, S, R, gap, surrogate, temperature):  # type: ignore[override]
        need_grad = bool(ctx.needs_input_grad[0])
        num, cnt, grad = _kernels.kendall_all_pairs(S, R, gap, surrogate, temperature, need_grad)
        if need_grad:
            ctx.save_for_backward(grad.to(S.dtype))
        cnt_i = cnt.sum(dtype=torch.float64).round().to(torch.int64)  # per-(q, m) counts <= N are exact
        ctx.mark_non_differentiable(cnt_i)
        return num.sum(dtype=torch.float64).to(S.dtype), cnt_i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_num, g_cnt):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g_num, None, None, None, None


def _kendall_all_pairs(
    Sq: torch.Tensor, Rq: torch.Tensor, gap: float, surrogate: str, temperature: float, chunk: int, kernel: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of penalties, number of valid pairs) over all pairs of every query row."""
    if _use_triton(Sq, kernel):
        try:
            return _KendallAllPairsTriton.apply(Sq, Rq, gap, surrogate, temperature)
        except Exception as err:  # a kernel that fails to build: see _auto_fallback
            _auto_fallback(kernel, err)
    return _KendallAllPairs.apply(Sq, Rq, gap, surrogate, temperature, chunk)


def _window_pairs(
    Ss: torch.Tensor, Rs: torch.Tensor, window: int, gap: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window pairs on relevance-sorted rows.

    Ss, Rs: (c, N) scores / relevance with candidates sorted by relevance (descending).
    Returns x (c, N, w) with ``x[q, p, d-1] = Ss[q, p+d] - Ss[q, p]`` and the bool mask
    ``Rs[q, p] - Rs[q, p+d] > gap`` (False where p + d >= N).
    """
    c, N = Ss.shape
    S_pad = F.pad(Ss, (0, window))
    R_pad = torch.cat([Rs, Rs.new_full((c, window), math.inf)], dim=1)
    S_win = S_pad.unfold(1, window + 1, 1)  # (c, N, w + 1): positions p .. p + w
    R_win = R_pad.unfold(1, window + 1, 1)
    x = S_win[:, :, 1:] - S_win[:, :, :1]
    m = (R_win[:, :, :1] - R_win[:, :, 1:]) > gap
    return x, m


def _window_chunk_sum(
    Ss: torch.Tensor, Rs: torch.Tensor, window: int, gap: float, surrogate: str, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    x, m = _window_pairs(Ss, Rs, window, gap)
    pen = _penalty(x, surrogate, temperature)
    return torch.where(m, pen, torch.zeros_like(pen)).sum(), m.sum()


def _kendall_sums(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: Optional[int],
    hard_k: Optional[int],
    chunk_size: Optional[int],
    kernel: str = "torch",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One direction's (sum of penalties, number of pairs counted), 0-d each, for query rows Sq (Q, N) with
    mask relevance rows Rq (Q, N). The count is an int64 tensor without gradient; it depends on Rq only
    (with ``hard_k``: ``min(hard_k, valid pairs)`` per row)."""
    Q, N = Sq.shape
    if window is not None:
        w = min(int(window), max(N - 1, 1))
        pairs_per_query = N * w
    else:
        w = None
        pairs_per_query = N * N
    chunk = _resolve_chunk(chunk_size, pairs_per_query, Q)
    use_hard = hard_k is not None and int(hard_k) < pairs_per_query

    order: Optional[torch.Tensor] = None
    if w is not None:
        order = torch.sort(Rq, dim=1, descending=True, stable=True).indices
        Ss = Sq.gather(1, order)
        Rs = Rq.gather(1, order)

    if not use_hard:
        if w is None:
            num, cnt = _kendall_all_pairs(Sq, Rq, gap, surrogate, temperature, chunk, kernel)
        else:
            nums, cnts = [], []
            n_chunks = (Q + chunk - 1) // chunk
            for q0 in range(0, Q, chunk):
                args = (Ss[q0 : q0 + chunk], Rs[q0 : q0 + chunk], w, gap, surrogate, temperature)
                if n_chunks > 1 and torch.is_grad_enabled() and Ss.requires_grad:
                    n_, c_ = checkpoint(_window_chunk_sum, *args, use_reentrant=False)
                else:
                    n_, c_ = _window_chunk_sum(*args)
                nums.append(n_)
                cnts.append(c_)
            num, cnt = torch.stack(nums).sum(), torch.stack(cnts).sum()
    else:
        # Hard-sample mining: select per query the hard_k valid pairs with the largest penalty
        # (no grad, chunked), then evaluate only the selected pairs with autograd: O(Q * hard_k).
        k = int(hard_k)  # type: ignore[arg-type]
        j_idx = torch.empty((Q, k), dtype=torch.long, device=Sq.device)
        k_idx = torch.empty((Q, k), dtype=torch.long, device=Sq.device)
        valid = torch.empty((Q, k), dtype=torch.bool, device=Sq.device)
        with torch.no_grad():
            Sd = Sq.detach()
            for q0 in range(0, Q, chunk):
                q1 = min(Q, q0 + chunk)
                if w is None:
                    s, r = Sd[q0:q1], Rq[q0:q1]
                    x = s.unsqueeze(1) - s.unsqueeze(2)
                    m = (r.unsqueeze(2) - r.unsqueeze(1)) > gap
                else:
                    x, m = _window_pairs(Ss.detach()[q0:q1], Rs[q0:q1], w, gap)
                pen = _penalty(x, surrogate, temperature).masked_fill(~m, -math.inf).flatten(1)
                vals, idx = torch.topk(pen, k, dim=1)
                valid[q0:q1] = vals > -math.inf
                if w is None:
                    j_idx[q0:q1] = idx // N
                    k_idx[q0:q1] = idx % N
                else:
                    p = idx // w
                    d = idx % w + 1
                    j_idx[q0:q1] = p
                    k_idx[q0:q1] = (p + d).clamp(max=N - 1)
            if w is not None:
                assert order is not None
                j_idx = order.gather(1, j_idx)
                k_idx = order.gather(1, k_idx)
        x_sel = Sq.gather(1, k_idx) - Sq.gather(1, j_idx)
        pen_sel = _penalty(x_sel, surrogate, temperature)
        num = torch.where(valid, pen_sel, torch.zeros_like(pen_sel)).sum()
        cnt = valid.sum()
    return num, cnt


def _kendall_direction(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: Optional[int],
    hard_k: Optional[int],
    chunk_size: Optional[int],
    kernel: str = "torch",
) -> torch.Tensor:
    """Kendall loss for one direction: query rows Sq (Q, N) with mask relevance rows Rq (Q, N)."""
    num, cnt = _kendall_sums(Sq, Rq, gap, surrogate, temperature, window, hard_k, chunk_size, kernel)
    # Guarded mean over valid pairs: no valid pair -> 0 (num is then 0 and keeps its graph).
    return num / cnt.clamp(min=1).to(num.dtype)


def _kendall_arguments(gap: float, surrogate: str, window: Optional[int], hard_k: Optional[int],
                       temperature: float, kernel: str) -> Tuple[float, float]:
    """Check the Kendall options (ValueError); returns ``(gap, temperature)`` as floats."""
    check_kernel(kernel)
    if surrogate not in _SURROGATES:
        raise ValueError(f"surrogate must be one of {_SURROGATES}, got {surrogate!r}")
    gap_f = float(gap)
    if not gap_f >= 0.0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    temp_f = _float(temperature, "temperature")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if hard_k is not None and int(hard_k) < 1:
        raise ValueError(f"hard_k must be >= 1 or None, got {hard_k}")
    return gap_f, temp_f


def kendall_rank_loss(
    S: torch.Tensor,
    R: torch.Tensor,
    gap: float = 0.3,
    surrogate: str = "hinge",
    t2i_relevance: str = "transpose",
    window: Optional[int] = None,
    hard_k: Optional[int] = None,
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Kendall-style pairwise ranking loss with label gap, optional SW-HS (spec A.3, A.4, A.8).

    i2t, query image i: every pair of candidate texts (j, k) with ``R_ij - R_ik > gap`` is
    penalised by ``phi(S_ik - S_ij)``; the direction's loss is ``sum M * phi / sum M`` (0 if
    there is no valid pair). Surrogates: ``hinge`` = ``relu(x)`` (released ITM_CLS, no margin),
    ``tanh`` = ``(1 + tanh(x / temperature)) / 2``, ``sigmoid`` = ``sigmoid(x / temperature)``.

    t2i, query text j (row j of S.T): ``"transpose"`` builds the mask from ``R.T`` (relevance
    ``R_kj`` of candidate image k); ``"as_released"`` reuses the mask built from R (spec A.3;
    with hinge and no window this is the released ITM_CLS ``RCLoss`` Kendall term).

    SW-HS (**reconstruction**, spec A.8): for each query, candidates are ordered by relevance
    (descending, stable sort) and the candidate at sorted position p is paired only with
    positions p+1 .. p+window (pairs must still pass the gap). If ``hard_k`` is set, only the
    ``hard_k`` valid pairs with the largest penalty are kept per query (and direction); the
    denominator counts the kept pairs. ``window=None`` = all pairs; ``window >= B - 1`` with
    ``hard_k=None`` equals the full loss.

    Returns ``(L_i2t + L_t2i) / 2``; R carries no gradient.

    Memory: all-pairs is evaluated in query chunks by a custom autograd function that
    accumulates the analytic gradient in the same pass: O(B^2 + chunk_size * B^2) extra memory.
    With a window, the (chunk, B, w) pair tensors are built by unfolding the relevance-sorted
    rows, in query chunks (``torch.utils.checkpoint`` per chunk when there is more than one), so
    compute and memory are O(B^2 w). Hard mining selects pairs without grad (chunked) and then
    differentiates only the kept O(B * hard_k) pairs.

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
    _check_square(S)
    _check_same_shape(S, R, "R")
    _check_t2i(t2i_relevance)
    gap_f, temp_f = _kendall_arguments(gap, surrogate, window, hard_k, temperature, kernel)
    Rc = R.detach().to(device=S.device, dtype=S.dtype)
    l_i2t = _kendall_direction(S, Rc, gap_f, surrogate, temp_f, window, hard_k, chunk_size, kernel)
    St = S.t().contiguous()
    Rt = Rc.t().contiguous() if t2i_relevance == "transpose" else Rc
    l_t2i = _kendall_direction(St, Rt, gap_f, surrogate, temp_f, window, hard_k, chunk_size, kernel)
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
    "SELHN_DEFAULT_EPS",
    "KERNELS",
]
