"""Fused Triton kernels for the O(B^3) losses (Smooth-NDCG ranks, all-pairs Kendall) on CUDA.

The torch forms (:mod:`methods.ndcg_direction`, :mod:`methods.kendall_direction`) evaluate the
(queries, candidates, candidates) cube block by block: about ten full passes over each block in
memory, so at B = 1024 they move tens of GB per call on a GPU. These kernels never write the
cube: each program holds one query row and ``BLOCK_J`` candidates, loops over the other
candidates ``BLOCK_K`` at a time in registers, and writes one (Q, N) result. Memory traffic is
O(B^2); the work stays O(B^3) elementwise.

Same maths as the torch forms (tested against them and against naive float64 loops with
``TRITON_INTERPRET=1`` on the CPU, ``tests/test_kernels.py``):

* Smooth-NDCG ranks: ``r1_qj = 2 + sum_{k != j} sigmoid(clamp((S_qk - S_qj) / tau, -c, c))``
  (1 + the smooth rank), and its gradient ``dL/dS_qm = (1/tau) sum_k s'_qmk (g_qk - g_qm)`` with
  ``g = dL/dr1`` and ``s' = s - s^2`` (the sigmoid derivative is even, so the two sums of the
  chain rule fold into one; the k = m term is 0).
* Kendall: per (q, m) ``num = sum_t M_qmt phi(S_qt - S_qm)``, ``cnt = sum_t M_qmt`` and
  ``grad = sum_t [M_qtm phi'(S_qm - S_qt) - M_qmt phi'(S_qt - S_qm)]``, ``M_qab = 1[R_qa - R_qb > gap]``.

Triton is optional (it ships with CUDA builds of torch); :data:`AVAILABLE` says whether it
imported. Kernels compute in the dtype of their (contiguous) inputs: float32 on the GPU, float64
in the CPU interpreter tests.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - exercised wherever triton is installed
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None
    AVAILABLE = False

#: Surrogate codes of the Kendall kernel (constexpr).
SURROGATE_CODES = {"hinge": 0, "tanh": 1, "sigmoid": 2}

#: Tile of one program: BLOCK_J candidates of one query against BLOCK_K candidates per step.
BLOCK_J = 32
BLOCK_K = 128
NUM_WARPS = 4


if AVAILABLE:

    @triton.jit
    def _clamped_sigmoid(x, clamp):
        """sigmoid(clamp(x, -clamp, clamp)): the released Listwise code's clamped exponent."""
        return tl.sigmoid(tl.minimum(tl.maximum(x, -clamp), clamp))

    @triton.jit
    def _sndcg_rank_kernel(S, R1, N, inv_tau, clamp, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
        q = tl.program_id(0)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        row = S + q * N
        s_j = tl.load(row + offs_j, mask=in_j, other=0.0)
        acc = tl.zeros((BLOCK_J,), dtype=s_j.dtype)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < N
            s_k = tl.load(row + offs_k, mask=in_k, other=0.0)
            sg = _clamped_sigmoid((s_k[None, :] - s_j[:, None]) * inv_tau, clamp)
            keep = in_k[None, :] & (offs_k[None, :] != offs_j[:, None])
            acc += tl.sum(tl.where(keep, sg, 0.0), axis=1)
        tl.store(R1 + q * N + offs_j, acc + 2.0, mask=in_j)

    @triton.jit
    def _sndcg_grad_kernel(S, G, OUT, N, inv_tau, clamp, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
        q = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        in_m = offs_m < N
        s_m = tl.load(S + q * N + offs_m, mask=in_m, other=0.0)
        g_m = tl.load(G + q * N + offs_m, mask=in_m, other=0.0)
        acc = tl.zeros((BLOCK_J,), dtype=s_m.dtype)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < N
            s_k = tl.load(S + q * N + offs_k, mask=in_k, other=0.0)
            g_k = tl.load(G + q * N + offs_k, mask=in_k, other=0.0)
            sg = _clamped_sigmoid((s_k[None, :] - s_m[:, None]) * inv_tau, clamp)
            term = (sg - sg * sg) * (g_k[None, :] - g_m[:, None])
            acc += tl.sum(tl.where(in_k[None, :], term, 0.0), axis=1)
        tl.store(OUT + q * N + offs_m, acc * inv_tau, mask=in_m)

    @triton.jit
    def _kendall_kernel(
        S,
        R,
        NUM,
        CNT,
        GRAD,
        N,
        gap,
        inv_temp,
        SURROGATE: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        q = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        in_m = offs_m < N
        s_m = tl.load(S + q * N + offs_m, mask=in_m, other=0.0)
        r_m = tl.load(R + q * N + offs_m, mask=in_m, other=0.0)
        num = tl.zeros((BLOCK_J,), dtype=s_m.dtype)
        cnt = tl.zeros((BLOCK_J,), dtype=s_m.dtype)
        grad = tl.zeros((BLOCK_J,), dtype=s_m.dtype)
        for t0 in range(0, N, BLOCK_K):
            offs_t = t0 + tl.arange(0, BLOCK_K)
            in_t = offs_t < N
            s_t = tl.load(S + q * N + offs_t, mask=in_t, other=0.0)
            r_t = tl.load(R + q * N + offs_t, mask=in_t, other=0.0)
            both = in_m[:, None] & in_t[None, :]
            # m more relevant than t (pair (m, t), penalised when S_t > S_m), and the reverse.
            m_over_t = both & ((r_m[:, None] - r_t[None, :]) > gap)
            t_over_m = both & ((r_t[None, :] - r_m[:, None]) > gap)
            x = s_t[None, :] - s_m[:, None]  # S_qt - S_qm; the reverse pair sees -x
            if SURROGATE == 0:
                pen = tl.maximum(x, 0.0)
                d_fwd = tl.where(x > 0.0, 1.0, 0.0)
                d_rev = tl.where(x < 0.0, 1.0, 0.0)
            else:
                # tanh: (1 + tanh(x / T)) / 2 = sigmoid(2x / T); sigmoid: sigmoid(x / T).
                if SURROGATE == 1:
                    scale = inv_temp * 2.0
                else:
                    scale = inv_temp
                sg = tl.sigmoid(x * scale)
                pen = sg
                d_fwd = (sg - sg * sg) * scale  # phi'(x); phi' is even, so phi'(-x) is the same
                d_rev = d_fwd
            num += tl.sum(tl.where(m_over_t, pen, 0.0), axis=1)
            cnt += tl.sum(tl.where(m_over_t, 1.0, 0.0), axis=1)
            if NEED_GRAD:
                grad += tl.sum(tl.where(t_over_m, d_rev, 0.0) - tl.where(m_over_t, d_fwd, 0.0), axis=1)
        tl.store(NUM + q * N + offs_m, num, mask=in_m)
        tl.store(CNT + q * N + offs_m, cnt, mask=in_m)
        if NEED_GRAD:
            tl.store(GRAD + q * N + offs_m, grad, mask=in_m)


def supported(S: torch.Tensor) -> bool:
    """True if the Triton kernels can run on S (triton imported; CUDA, or the CPU interpreter)."""
    if not AVAILABLE:
        return False
    if S.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _grid(Q: int, N: int) -> tuple[int, int]:
    return (Q, triton.cdiv(N, BLOCK_J))


def _compute_dtype(S: torch.Tensor) -> torch.dtype:
    return torch.float64 if S.dtype == torch.float64 else torch.float32


def sndcg_ranks(S: torch.Tensor, tau: float, clamp: float) -> torch.Tensor:
    """(Q, N) ``1 + smooth rank`` (= 2 + the sigmoid sum) of every candidate; S: (Q, N) query rows. No autograd."""
    Sc = S.detach().to(_compute_dtype(S)).contiguous()
    Q, N = Sc.shape
    r1 = torch.empty_like(Sc)
    _sndcg_rank_kernel[_grid(Q, N)](Sc, r1, N, 1.0 / tau, clamp, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return r1


def sndcg_rank_grad(S: torch.Tensor, g: torch.Tensor, tau: float, clamp: float) -> torch.Tensor:
    """(Q, N) ``dL/dS`` given ``g = dL/dr1`` (Q, N) for the ranks of :func:`sndcg_ranks`."""
    dtype = _compute_dtype(S)
    Sc = S.detach().to(dtype).contiguous()
    gc = g.detach().to(dtype).contiguous()
    Q, N = Sc.shape
    out = torch.empty_like(Sc)
    _sndcg_grad_kernel[_grid(Q, N)](
        Sc, gc, out, N, 1.0 / tau, clamp, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS
    )
    return out


def kendall_all_pairs(
    S: torch.Tensor, R: torch.Tensor, gap: float, surrogate: str, temperature: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per (q, m) penalty sums, valid-pair counts and (optionally) ``dnum/dS``; all (Q, N). No autograd."""
    dtype = _compute_dtype(S)
    Sc = S.detach().to(dtype).contiguous()
    Rc = R.detach().to(dtype).contiguous()
    Q, N = Sc.shape
    num = torch.empty_like(Sc)
    cnt = torch.empty_like(Sc)
    grad = torch.empty_like(Sc) if need_grad else num  # placeholder pointer when unused
    _kendall_kernel[_grid(Q, N)](
        Sc,
        Rc,
        num,
        cnt,
        grad,
        N,
        gap,
        1.0 / temperature,
        SURROGATE=SURROGATE_CODES[surrogate],
        NEED_GRAD=need_grad,
        BLOCK_J=BLOCK_J,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return num, cnt, (grad if need_grad else None)
