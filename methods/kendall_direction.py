"""One direction of the Kendall ranking loss on query rows: the penalty sum and the pair count. Imports torch only.

Shared by the square loss :func:`methods.functional.kendall_rank_loss` (Q = N, each direction of S) and the row
form :func:`methods.row_losses.kendall_rows`. For query q, candidates j, k of a row pair (j, k) is valid when
``R_qj - R_qk > gap`` and is penalised by ``phi(S_qk - S_qj)`` (:func:`penalty`). :func:`kendall_sums` returns
``(sum of penalties, number of pairs counted)`` and hands the work to one function per pair-selection algorithm:

* :func:`all_pairs_sums`: every pair, O(Q N^2) work. The blocked torch autograd Function
  :class:`KendallAllPairs` (blocks of :mod:`methods.blocks`, gradient accumulated in the same pass, O(Q N) saved)
  or the fused Triton kernel (:class:`KendallAllPairsTriton`), as :data:`methods.dispatch.DISPATCH` decides.
* :func:`window_sums`: SW-HS's sliding window, pairs of positions p and p + 1 .. p + w of the relevance-sorted
  row, O(Q N w); plain autograd over unfolded windows, ``torch.utils.checkpoint`` per query chunk.
* :func:`hard_k_sums`: SW-HS's hard-sample mining, the ``hard_k`` valid pairs with the largest penalty per row
  (among all pairs or within the window), selected without grad, then differentiated alone: O(Q hard_k) graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from methods import dispatch, kernels
from methods.blocks import block_shape, blocks, resolve_chunk, views

Sums = tuple[torch.Tensor, torch.Tensor]


def penalty(x: torch.Tensor, surrogate: str, temperature: float) -> torch.Tensor:
    """Surrogate of the discordance indicator I(S_ik > S_ij) applied to x = S_ik - S_ij (any shape)."""
    if surrogate == "hinge":
        return torch.relu(x)
    if surrogate == "tanh":
        return (1.0 + torch.tanh(x / temperature)) / 2.0
    return torch.sigmoid(x / temperature)


class KendallAllPairs(torch.autograd.Function):
    """``sum_{q,j,k} M_qjk * phi(S_qk - S_qj)`` with ``M_qjk = I(R_qj - R_qk > gap)``, all pairs.

    Inputs S, R (Q, N), float gap, surrogate name, float temperature, queries per chunk. Outputs (numerator,
    count); count is not differentiable. Evaluated block by block (see :func:`methods.blocks.blocks`), the
    gradient of the numerator accumulated in the same pass:
    ``dnum/dS_qm = sum_j W_qjm - sum_k W_qmk`` with ``W = M * phi'(x)`` (relu' = 1[x > 0]).
    Only the (Q, N) gradient is kept for backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, S, R, gap, surrogate, temperature, chunk):
        Q, N = S.shape
        need_grad = bool(ctx.needs_input_grad[0])
        num = torch.zeros((), dtype=torch.float64, device=S.device)
        cnt = torch.zeros((), dtype=torch.float64, device=S.device)
        grad = torch.zeros_like(S) if need_grad else None
        c, jt = block_shape(Q, N, chunk, S.device)
        bufs = [S.new_empty(c * jt * N) for _ in range(3)]
        for q0, q1, j0, j1 in blocks(Q, N, c, jt):
            s, r = S[q0:q1], R[q0:q1]
            mf, x, w = views(bufs, (q1 - q0, j1 - j0, N))
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
            if grad is not None:
                grad[q0:q1] += w.sum(dim=1)
                grad[q0:q1, j0:j1] -= w.sum(dim=2)
        del bufs
        if grad is not None:
            ctx.save_for_backward(grad)
        cnt_i = cnt.round().to(torch.int64)
        ctx.mark_non_differentiable(cnt_i)
        return num.to(S.dtype), cnt_i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_num, g_cnt):
        (grad,) = ctx.saved_tensors
        return grad * g_num, None, None, None, None, None


class KendallAllPairsTriton(torch.autograd.Function):
    """:class:`KendallAllPairs` with the fused kernel of :mod:`methods.kernels` (one pass, O(N^2) memory)."""

    @staticmethod
    def forward(ctx, S, R, gap, surrogate, temperature):
        need_grad = bool(ctx.needs_input_grad[0])
        num, cnt, grad = kernels.kendall_all_pairs(S, R, gap, surrogate, temperature, need_grad)
        if grad is not None:  # exactly when need_grad
            ctx.save_for_backward(grad.to(S.dtype))
        cnt_i = cnt.sum(dtype=torch.float64).round().to(torch.int64)  # per-(q, m) counts <= N are exact
        ctx.mark_non_differentiable(cnt_i)
        return num.sum(dtype=torch.float64).to(S.dtype), cnt_i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_num, g_cnt):
        (grad,) = ctx.saved_tensors
        return grad * g_num, None, None, None, None


def all_pairs_sums(
    Sq: torch.Tensor, Rq: torch.Tensor, gap: float, surrogate: str, temperature: float, chunk: int, kernel: str
) -> Sums:
    """(sum of penalties, number of valid pairs) over all pairs of every query row; Sq, Rq (Q, N)."""
    return dispatch.DISPATCH.run(
        Sq,
        kernel,
        triton=lambda: KendallAllPairsTriton.apply(Sq, Rq, gap, surrogate, temperature),
        blocked=lambda: KendallAllPairs.apply(Sq, Rq, gap, surrogate, temperature, chunk),
    )


def window_pairs(Ss: torch.Tensor, Rs: torch.Tensor, window: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
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
) -> Sums:
    """:func:`window_sums` of one chunk of sorted rows Ss, Rs (c, N)."""
    x, m = window_pairs(Ss, Rs, window, gap)
    pen = penalty(x, surrogate, temperature)
    return torch.where(m, pen, torch.zeros_like(pen)).sum(), m.sum()


def _sorted_by_relevance(Sq: torch.Tensor, Rq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, Ss, Rs): each row's candidates by descending relevance (stable sort), (Q, N) each."""
    order = torch.sort(Rq, dim=1, descending=True, stable=True).indices
    return order, Sq.gather(1, order), Rq.gather(1, order)


def window_sums(
    Sq: torch.Tensor, Rq: torch.Tensor, gap: float, surrogate: str, temperature: float, window: int, chunk: int
) -> Sums:
    """(sum of penalties, number of valid pairs) over the pairs (p, p + 1 .. p + window) of each row's
    relevance-sorted candidates; Sq, Rq (Q, N), ``1 <= window <= N - 1``. Checkpointed per chunk when there are
    several, so the autograd graph holds one (chunk, N, window) block at a time."""
    Q = Sq.shape[0]
    _, Ss, Rs = _sorted_by_relevance(Sq, Rq)
    nums, cnts = [], []
    n_chunks = (Q + chunk - 1) // chunk
    for q0 in range(0, Q, chunk):
        args = (Ss[q0 : q0 + chunk], Rs[q0 : q0 + chunk], window, gap, surrogate, temperature)
        if n_chunks > 1 and torch.is_grad_enabled() and Ss.requires_grad:
            n_, c_ = checkpoint(_window_chunk_sum, *args, use_reentrant=False)
        else:
            n_, c_ = _window_chunk_sum(*args)
        nums.append(n_)
        cnts.append(c_)
    return torch.stack(nums).sum(), torch.stack(cnts).sum()


def _hardest_pairs(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: int | None,
    k: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(j, k, valid), each (Q, k): per row the k valid pairs (j, k) with the largest penalty, as column indices
    of Sq; ``valid`` is False for padding where a row has fewer than k valid pairs. No grad; chunked."""
    Q, N = Sq.shape
    j_idx = torch.empty((Q, k), dtype=torch.long, device=Sq.device)
    k_idx = torch.empty((Q, k), dtype=torch.long, device=Sq.device)
    valid = torch.empty((Q, k), dtype=torch.bool, device=Sq.device)
    with torch.no_grad():
        Sd, Rd = Sq.detach(), Rq  # with a window: both sorted by relevance, positions instead of columns
        if window is not None:
            order, Sd, Rd = _sorted_by_relevance(Sd, Rd)
        for q0 in range(0, Q, chunk):
            q1 = min(Q, q0 + chunk)
            if window is None:
                s, r = Sd[q0:q1], Rd[q0:q1]
                x = s.unsqueeze(1) - s.unsqueeze(2)
                m = (r.unsqueeze(2) - r.unsqueeze(1)) > gap
            else:
                x, m = window_pairs(Sd[q0:q1], Rd[q0:q1], window, gap)
            pen = penalty(x, surrogate, temperature).masked_fill(~m, -math.inf).flatten(1)
            vals, idx = torch.topk(pen, k, dim=1)
            valid[q0:q1] = vals > -math.inf
            if window is None:
                j_idx[q0:q1] = idx // N
                k_idx[q0:q1] = idx % N
            else:
                p = idx // window
                j_idx[q0:q1] = p
                k_idx[q0:q1] = (p + idx % window + 1).clamp(max=N - 1)
        if window is not None:  # sorted positions -> columns of Sq
            j_idx, k_idx = order.gather(1, j_idx), order.gather(1, k_idx)
    return j_idx, k_idx, valid


def hard_k_sums(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: int | None,
    hard_k: int,
    chunk: int,
) -> Sums:
    """(sum of penalties, number of kept pairs) over the ``hard_k`` valid pairs with the largest penalty per row,
    among all pairs (``window=None``) or the window's; Sq, Rq (Q, N). The count is ``min(hard_k, valid pairs)``
    per row; only the kept pairs are differentiated."""
    j_idx, k_idx, valid = _hardest_pairs(Sq, Rq, gap, surrogate, temperature, window, hard_k, chunk)
    x_sel = Sq.gather(1, k_idx) - Sq.gather(1, j_idx)
    pen_sel = penalty(x_sel, surrogate, temperature)
    return torch.where(valid, pen_sel, torch.zeros_like(pen_sel)).sum(), valid.sum()


def kendall_sums(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: int | None,
    hard_k: int | None,
    chunk_size: int | None,
    kernel: str = "torch",
) -> Sums:
    """One direction's (sum of penalties, number of pairs counted), 0-d each, for query rows Sq (Q, N) with
    mask relevance rows Rq (Q, N). The count is an int64 tensor without gradient; it depends on Rq only
    (with ``hard_k``: ``min(hard_k, valid pairs)`` per row). Options as checked by
    :func:`methods.functional.kendall_rank_loss`; ``kernel`` applies to the all-pairs form only."""
    Q, N = Sq.shape
    w = None if window is None else min(int(window), max(N - 1, 1))
    pairs_per_query = N * N if w is None else N * w
    chunk = resolve_chunk(chunk_size, pairs_per_query, Q)
    if hard_k is not None and int(hard_k) < pairs_per_query:
        return hard_k_sums(Sq, Rq, gap, surrogate, temperature, w, int(hard_k), chunk)
    if w is None:
        return all_pairs_sums(Sq, Rq, gap, surrogate, temperature, chunk, kernel)
    return window_sums(Sq, Rq, gap, surrogate, temperature, w, chunk)


def kendall_direction(
    Sq: torch.Tensor,
    Rq: torch.Tensor,
    gap: float,
    surrogate: str,
    temperature: float,
    window: int | None,
    hard_k: int | None,
    chunk_size: int | None,
    kernel: str = "torch",
) -> torch.Tensor:
    """0-d Kendall loss of one direction, ``sum of penalties / pairs counted`` (0 without a valid pair, keeping
    the graph), for query rows Sq (Q, N) with mask relevance rows Rq (Q, N); see :func:`kendall_sums`."""
    num, cnt = kendall_sums(Sq, Rq, gap, surrogate, temperature, window, hard_k, chunk_size, kernel)
    return num / cnt.clamp(min=1).to(num.dtype)


__all__ = [
    "penalty",
    "KendallAllPairs",
    "KendallAllPairsTriton",
    "all_pairs_sums",
    "window_pairs",
    "window_sums",
    "hard_k_sums",
    "kendall_sums",
    "kendall_direction",
]
