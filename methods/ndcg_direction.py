"""One direction of the Smooth-NDCG loss on query rows, ``mean_q (1 - DCG_q / IDCG_q)``, in O(N^2) memory.

Shared by the square loss :func:`methods.functional.smooth_ndcg_loss` (Q = N, each direction of S) and the row
form :func:`methods.row_losses.smooth_ndcg_rows`. Imports torch only.

The smooth ranks ``r_qj = 1 + sum_{k != j} sigmoid(clamp((S_qk - S_qj) / tau, -c, c))`` need the (Q, N, N) cube of
score differences. The released code materialises it (several times, plus autograd buffers); here it is never
kept whole:

* :class:`SmoothNDCGDirection` (``kernel="torch"``) walks the cube in blocks (:mod:`methods.blocks`) and
  accumulates the analytic gradient in the same pass; only a (Q, N) gradient is saved for backward.
* :class:`SmoothNDCGDirectionTriton` (``kernel="auto"`` on CUDA, ``"triton"``) runs the fused kernels of
  :mod:`methods.kernels`, which never write a block: O(N^2) memory traffic as well.

:func:`smooth_ndcg_direction` picks one through :data:`methods.dispatch.DISPATCH`. Same values and gradients as
the naive form (tests/test_functional.py, tests/test_kernels.py, in float64).
"""

from __future__ import annotations

import math

import torch

from methods import dispatch, kernels
from methods.blocks import block_shape, blocks, default_chunk, views

#: The released Listwise code clamps (S_ik - S_ij) / tau to this range before the sigmoid.
SNDCG_EXPONENT_CLAMP = 50.0


def _inverse_idcg(idcg: torch.Tensor) -> torch.Tensor:
    """(Q,) ``1 / idcg``, 0 where idcg is 0 (a row with nothing to rank)."""
    ok = idcg != 0
    return torch.where(ok, 1.0 / torch.where(ok, idcg, torch.ones_like(idcg)), torch.zeros_like(idcg))


class SmoothNDCGDirection(torch.autograd.Function):
    """One direction of the Smooth-NDCG loss, ``mean_q (1 - DCG_q / IDCG_q)``, O(N^2) memory.

    Inputs: score rows S (Q, N), constant gains (Q, N) and IDCG (Q,), float tau, queries per chunk, clamp c.
    Smooth ranks ``r_qj = 1 + sum_{k != j} sigmoid(clamp((S_qk - S_qj) / tau, -c, c))`` are evaluated block by
    block (see :func:`methods.blocks.blocks`); each block holds every k for its (q, j), so ``dL/dr_qj`` is
    known inside the block and the gradient is accumulated in the same pass:
    ``dL/dS_qm = (1/tau) [sum_j g_qj s'_qjm - g_qm sum_k s'_qmk]`` with ``s'`` the sigmoid
    derivative at the clamped argument (``s'_qjj = 0``). Autograd through the clamp would give
    exactly 0 outside [-c, c] instead of sigmoid'(+-c) <= 2e-22: a negligible difference.
    Only the (Q, N) gradient is kept for backward. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, S, gains, idcg, tau, chunk, clamp):
        Q, N = S.shape
        need_grad = bool(ctx.needs_input_grad[0])
        ok = idcg != 0
        inv_idcg = _inverse_idcg(idcg)
        dcg = torch.zeros(Q, dtype=S.dtype, device=S.device)
        grad = torch.zeros_like(S) if need_grad else None
        scale = 1.0 / (Q * math.log(2.0))
        c, jt = block_shape(Q, N, chunk, S.device)
        bufs = [S.new_empty(c * jt * N) for _ in range(2 if need_grad else 1)]
        for q0, q1, j0, j1 in blocks(Q, N, c, jt):
            s = S[q0:q1]
            block = views(bufs, (q1 - q0, j1 - j0, N))
            x = block[0]
            torch.sub(s.unsqueeze(1), s[:, j0:j1].unsqueeze(2), out=x)  # x[q, j, k] = S_qk - S_qj
            x.div_(tau).clamp_(-clamp, clamp).sigmoid_()
            x.diagonal(offset=j0, dim1=1, dim2=2).zero_()  # drop k == j
            r1 = x.sum(dim=2).add_(2.0)  # 1 + rank
            log_r1 = torch.log2(r1)
            G = gains[q0:q1, j0:j1]
            dcg[q0:q1] += (G / log_r1).sum(dim=1)
            if grad is not None:
                g = G * inv_idcg[q0:q1].unsqueeze(1) * scale / (r1 * log_r1 * log_r1)  # dL/dr_qj
                # sigmoid' at the clamped argument: s - s^2. Autograd through clamp gives exactly 0
                # outside [-c, c]; here it is sigmoid'(+-c) <= 2e-22 (0 at +c), a negligible gap
                # that saves a mask pass over the block.
                x.sub_(torch.mul(x, x, out=block[1]))
                grad[q0:q1] += torch.bmm(g.unsqueeze(1), x).squeeze(1)
                grad[q0:q1, j0:j1] -= g * x.sum(dim=2)
        del bufs
        # A row whose IDCG is 0 (all gains 0) has nothing to rank: NDCG := 1, i.e. loss 0.
        ndcg = torch.where(ok, dcg * inv_idcg, torch.ones_like(dcg))
        loss = (1.0 - ndcg).mean()
        if grad is not None:
            ctx.save_for_backward(grad.div_(tau))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss):
        (grad,) = ctx.saved_tensors
        return grad * g_loss, None, None, None, None, None


class SmoothNDCGDirectionTriton(torch.autograd.Function):
    """:class:`SmoothNDCGDirection` with the fused kernels of :mod:`methods.kernels`.

    Inputs: S (Q, N), gains (Q, N), IDCG (Q,), float tau, clamp c, and the ``kernel`` choice (for the fallback of
    the gradient kernel). Forward: one kernel for the (Q, N) smooth ranks, then O(N^2) torch for DCG and
    ``g = dL/dr``; backward: one kernel for ``dL/dS`` from S and g (saved, both (Q, N)). Ranks, DCG and g are kept
    in float32 for float16 / bfloat16 S (a bfloat16 rank of 4096 would be off by 16).
    """

    @staticmethod
    def forward(ctx, S, gains, idcg, tau, clamp, kernel):
        Q = S.shape[0]
        r1 = kernels.sndcg_ranks(S, tau, clamp)  # 1 + rank, float32 (float64 for float64 S)
        gains, idcg = gains.to(r1.dtype), idcg.to(r1.dtype)
        ok = idcg != 0
        inv_idcg = _inverse_idcg(idcg)
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
    def backward(ctx, g_loss):
        S, g = ctx.saved_tensors
        try:
            grad = kernels.sndcg_rank_grad(S, g, ctx.tau, ctx.clamp)
        except Exception as err:  # the gradient kernel failed to build: see KernelDispatch.fall_back
            dispatch.DISPATCH.fall_back(ctx.kernel, err)
            grad = sndcg_rank_grad_blocked(S.to(g.dtype), g, ctx.tau, ctx.clamp)
        return grad.to(S.dtype) * g_loss, None, None, None, None, None


def sndcg_rank_grad_blocked(S: torch.Tensor, g: torch.Tensor, tau: float, clamp: float) -> torch.Tensor:
    """Torch form of the Triton gradient kernel: (Q, N) ``(1/tau) sum_k s'_qmk (g_qk - g_qm)``, S, g: (Q, N).

    ``s'`` = sigmoid' at ``clamp((S_qk - S_qm) / tau)``; queries in blocks of at most 2**24 elements.
    """
    Q, N = S.shape
    out = torch.empty_like(S)
    chunk = default_chunk(N * N)
    for q0 in range(0, Q, chunk):
        s, gq = S[q0 : q0 + chunk], g[q0 : q0 + chunk]
        x = ((s.unsqueeze(1) - s.unsqueeze(2)) / tau).clamp_(-clamp, clamp).sigmoid_()  # [q, m, k]
        out[q0 : q0 + chunk] = ((x - x * x) * (gq.unsqueeze(1) - gq.unsqueeze(2))).sum(dim=2) / tau
    return out


def ideal_dcg(R: torch.Tensor) -> torch.Tensor:
    """(Q,) IDCG per row of R (Q, N) with rank*_qj = 1 + #{k : R_qk > R_qj} (ties share a rank). No grad."""
    with torch.no_grad():
        N = R.shape[1]
        sorted_asc = torch.sort(R, dim=1).values.contiguous()
        n_leq = torch.searchsorted(sorted_asc, R.contiguous(), right=True)  # #{k : R_qk <= R_qj}
        ideal_rank = (N - n_leq + 1).to(R.dtype)
        gains = torch.pow(2.0, R) - 1.0
        return (gains / torch.log2(1.0 + ideal_rank)).sum(dim=1)


def smooth_ndcg_direction(
    Sq: torch.Tensor, gains: torch.Tensor, idcg: torch.Tensor, tau: float, chunk: int, kernel: str = "torch"
) -> torch.Tensor:
    """0-d ``mean_q (1 - DCG_q / IDCG_q)`` for query rows Sq (Q, N), gains (Q, N), idcg (Q,); Triton or blocked
    torch as :data:`methods.dispatch.DISPATCH` decides for ``kernel``."""
    return dispatch.DISPATCH.run(
        Sq,
        kernel,
        triton=lambda: SmoothNDCGDirectionTriton.apply(Sq, gains, idcg, tau, SNDCG_EXPONENT_CLAMP, kernel),
        blocked=lambda: SmoothNDCGDirection.apply(
            Sq, gains.to(Sq.dtype), idcg.to(Sq.dtype), tau, chunk, SNDCG_EXPONENT_CLAMP
        ),
    )


__all__ = [
    "SNDCG_EXPONENT_CLAMP",
    "SmoothNDCGDirection",
    "SmoothNDCGDirectionTriton",
    "sndcg_rank_grad_blocked",
    "ideal_dcg",
    "smooth_ndcg_direction",
]
