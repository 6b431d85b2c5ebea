"""methods/functional.py against independent naive references (explicit loops, float64).

Every loss is checked for value and gradient against a loop implementation written here from
docs/methods-spec.md, with torch.autograd.gradcheck, for permutation invariance, and for its
documented limits / released-code variants. R is deliberately asymmetric (spec E) so that a
direction reading the wrong index is caught.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.functional as fn
from methods import blocks, row_losses
from methods.functional import (
    caption_relevance,
    infonce,
    kendall_rank_loss,
    smooth_ndcg_loss,
    soft_label_kl,
    triplet_hardest,
    triplet_selhn,
    triplet_soft_negative,
)

REPO = Path(__file__).resolve().parent.parent
DT = torch.float64
VAL_TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def rand_S(B: int, seed: int, scale: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, B, generator=g, dtype=DT) * 2 - 1) * scale


def rand_R(B: int, seed: int) -> torch.Tensor:
    """Asymmetric relevance in [0, 1), diagonal 1 (RSC style)."""
    g = torch.Generator().manual_seed(seed + 1000)
    R = torch.rand(B, B, generator=g, dtype=DT)
    R.fill_diagonal_(1.0)
    assert not torch.allclose(R, R.T)
    return R


def positives_from_ids(ids: Sequence[int]) -> torch.Tensor:
    t = torch.tensor(list(ids))
    return t[:, None] == t[None, :]


def leaf(S: torch.Tensor) -> torch.Tensor:
    return S.detach().clone().requires_grad_(True)


def value_and_grad(f: Callable[[torch.Tensor], torch.Tensor], S: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = leaf(S)
    out = f(x)
    assert out.dim() == 0
    (g,) = torch.autograd.grad(out, x)
    return float(out.detach()), g


def assert_matches(f: Callable, naive: Callable, S: torch.Tensor) -> None:
    v1, g1 = value_and_grad(f, S)
    v2, g2 = value_and_grad(naive, S)
    assert v1 == pytest.approx(v2, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g1, g2, **GRAD_TOL)


def perm_all(P: torch.Tensor, *mats: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if m is None else m[P][:, P] for m in mats]


# ---------------------------------------------------------------------------------------------
# naive references (scalar torch ops, so autograd gives reference gradients)
# ---------------------------------------------------------------------------------------------


def naive_infonce(S, tau, positives=None, reduction="sum"):
    B = S.shape[0]
    P = torch.eye(B, dtype=torch.bool) if positives is None else positives
    total_i2t = 0.0
    for i in range(B):
        logz = torch.log(sum(torch.exp(S[i, k] / tau) for k in range(B)))
        n = sum(int(P[i, k]) for k in range(B))
        ce = 0.0
        for j in range(B):
            if P[i, j]:
                ce = ce - (1.0 / n) * (S[i, j] / tau - logz)
        total_i2t = total_i2t + ce
    total_t2i = 0.0
    for j in range(B):
        logz = torch.log(sum(torch.exp(S[k, j] / tau) for k in range(B)))
        n = sum(int(P[k, j]) for k in range(B))
        ce = 0.0
        for i in range(B):
            if P[i, j]:
                ce = ce - (1.0 / n) * (S[i, j] / tau - logz)
        total_t2i = total_t2i + ce
    loss = (total_i2t / B + total_t2i / B) / 2
    return loss / B if reduction == "class_mean" else loss


def _neg(B, positives, a, b):
    """Is (image a, text b) a negative?"""
    return a != b and (positives is None or not bool(positives[a, b]))


def naive_triplet_hardest(S, margin=0.2, positives=None):
    B = S.shape[0]
    zero = S.new_zeros(())
    li = 0.0
    for i in range(B):
        best = zero
        for j in range(B):
            if _neg(B, positives, i, j):
                best = torch.maximum(best, torch.relu(margin - S[i, i] + S[i, j]))
        li = li + best
    lt = 0.0
    for j in range(B):
        best = zero
        for i in range(B):
            if _neg(B, positives, i, j):
                best = torch.maximum(best, torch.relu(margin - S[j, j] + S[i, j]))
        lt = lt + best
    return (li / B + lt / B) / 2


def naive_triplet_sn(S, margin=0.2, tau=0.05, positives=None):
    B = S.shape[0]
    li = 0.0
    for i in range(B):
        negs = [j for j in range(B) if _neg(B, positives, i, j)]
        if negs:
            z = sum(torch.exp(S[i, j] / tau) for j in negs)
            li = li + sum(torch.exp(S[i, j] / tau) / z * torch.relu(margin - S[i, i] + S[i, j]) for j in negs)
    lt = 0.0
    for j in range(B):
        negs = [i for i in range(B) if _neg(B, positives, i, j)]
        if negs:
            z = sum(torch.exp(S[i, j] / tau) for i in negs)
            lt = lt + sum(torch.exp(S[i, j] / tau) / z * torch.relu(margin - S[j, j] + S[i, j]) for i in negs)
    return (li / B + lt / B) / 2


def naive_selhn(S, margin=0.2, eps=0.01, positives=None):
    B = S.shape[0]

    def anchor(pos, negs_scores):
        if not negs_scores:
            return S.new_zeros(())
        hinges = [torch.relu(margin - pos + s) for s in negs_scores]
        hardest = max(float(s.detach()) for s in negs_scores)
        if abs(float(pos.detach()) - hardest) < eps:
            return sum(hinges) / len(hinges)
        return max(hinges, key=lambda t: float(t.detach()))

    li = sum(anchor(S[i, i], [S[i, j] for j in range(B) if _neg(B, positives, i, j)]) for i in range(B))
    lt = sum(anchor(S[j, j], [S[i, j] for i in range(B) if _neg(B, positives, i, j)]) for j in range(B))
    return (li / B + lt / B) / 2


def released_selhn(scores, margin, epsilon):
    """AAA-Zheng/RVSEPP loss.py TripletSelHNLoss.forward, on a given score matrix (CPU)."""
    batch_size = scores.size(0)
    pos_mask = torch.eye(batch_size, dtype=scores.dtype)
    neg_mask = 1 - pos_mask
    pos_scores = scores.diag().view(batch_size, 1)
    loss_t = (scores - pos_scores.expand_as(scores) + margin).clamp(min=0) * neg_mask
    loss_v = (scores - pos_scores.t().expand_as(scores) + margin).clamp(min=0) * neg_mask
    avg_loss_t = loss_t.sum(1) / (batch_size - 1)
    avg_loss_v = loss_v.sum(0) / (batch_size - 1)
    max_loss_t = loss_t.max(1)[0]
    max_loss_v = loss_v.max(0)[0]
    sd = scores.detach()
    neg_scores = sd * neg_mask - pos_mask
    diff_t = torch.abs(sd.diag() - neg_scores.max(1)[0])
    diff_v = torch.abs(sd.diag() - neg_scores.max(0)[0])
    lt = torch.where(diff_t < epsilon, avg_loss_t, max_loss_t).mean()
    lv = torch.where(diff_v < epsilon, avg_loss_v, max_loss_v).mean()
    return (lt + lv) / 2


def naive_kl(student, teacher, s_tau, t_tau=1.0):
    Bq, N = student.shape
    total = 0.0
    for i in range(Bq):
        zt = sum(math.exp(float(teacher[i, k]) / t_tau) for k in range(N))
        zs = torch.log(sum(torch.exp(student[i, k] / s_tau) for k in range(N)))
        for j in range(N):
            q = math.exp(float(teacher[i, j]) / t_tau) / zt
            log_p = student[i, j] / s_tau - zs
            total = total + q * (math.log(q) - log_p)
    return total / Bq


def naive_relevance(caps: np.ndarray, texts: np.ndarray, mask: np.ndarray | None, rescale: bool) -> np.ndarray:
    B, K, _ = caps.shape
    R = np.zeros((B, B))
    for i in range(B):
        for j in range(B):
            best = -np.inf
            for c in range(K):
                if mask is not None and not mask[i, c]:
                    continue
                a, b = caps[i, c], texts[j]
                best = max(best, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            R[i, j] = (1 + best) / 2 if rescale else best
            if i == j:
                R[i, j] = 1.0
    return R


def _sig_clamped(z):
    return torch.sigmoid(torch.clamp(z, -50.0, 50.0))


def _ndcg_query(scores: list, rel: list[float], idcg_rel: list[float], tau: float):
    """1 - DCG/IDCG for one query: scores[c] = S of candidate c, rel = gains' relevance."""
    n = len(scores)
    dcg = 0.0
    for j in range(n):
        rank = 1.0
        for k in range(n):
            if k != j:
                rank = rank + _sig_clamped((scores[k] - scores[j]) / tau)
        dcg = dcg + (2.0 ** rel[j] - 1.0) / torch.log2(1.0 + rank)
    idcg = 0.0
    for j in range(n):
        ideal = 1 + sum(1 for k in range(n) if idcg_rel[k] > idcg_rel[j])
        idcg += (2.0 ** idcg_rel[j] - 1.0) / math.log2(1 + ideal)
    return 1.0 - dcg / idcg


def naive_sndcg(S, R, tau=0.01, t2i="transpose"):
    B = S.shape[0]
    Rl = R.tolist()
    i2t = sum(_ndcg_query([S[i, j] for j in range(B)], Rl[i], Rl[i], tau) for i in range(B)) / B
    t2i_terms = []
    for j in range(B):  # query text j, candidate images k: scores S_kj
        scores = [S[k, j] for k in range(B)]
        if t2i == "transpose":
            rel = [Rl[k][j] for k in range(B)]  # R_kj
            t2i_terms.append(_ndcg_query(scores, rel, rel, tau))
        else:  # released: gains R_jk, IDCG_j of the i2t row
            t2i_terms.append(_ndcg_query(scores, Rl[j], Rl[j], tau))
    return (i2t + sum(t2i_terms) / B) / 2


def _phi(x, surrogate, temperature):
    if surrogate == "hinge":
        return torch.relu(x)
    if surrogate == "tanh":
        return (1 + torch.tanh(x / temperature)) / 2
    return torch.sigmoid(x / temperature)


def _kendall_query(scores, rel, gap, surrogate, temperature, window, hard_k):
    """Valid pair penalties of one query (list of 0-d tensors)."""
    n = len(scores)
    order = sorted(range(n), key=lambda c: -rel[c])  # stable: ties keep index order
    pos = {c: p for p, c in enumerate(order)}
    pens = []
    for j in range(n):
        for k in range(n):
            if not rel[j] - rel[k] > gap:
                continue
            if window is not None and not (0 < pos[k] - pos[j] <= window):
                continue
            pens.append(_phi(scores[k] - scores[j], surrogate, temperature))
    if hard_k is not None:
        pens = sorted(pens, key=lambda t: -float(t.detach()))[:hard_k]
    return pens


def naive_kendall(S, R, gap=0.3, surrogate="hinge", t2i="transpose", window=None, hard_k=None, temperature=0.1):
    B = S.shape[0]
    Rl = R.tolist()
    args = (gap, surrogate, temperature, window, hard_k)
    pens_i2t: list = []
    for i in range(B):
        pens_i2t += _kendall_query([S[i, j] for j in range(B)], Rl[i], *args)
    pens_t2i: list = []
    for j in range(B):  # query text j, candidate images k with scores S_kj
        rel = [Rl[k][j] for k in range(B)] if t2i == "transpose" else Rl[j]  # R_kj or released R_jk
        pens_t2i += _kendall_query([S[k, j] for k in range(B)], rel, *args)

    def mean(p):
        return sum(p) / len(p) if p else S.sum() * 0.0

    return (mean(pens_i2t) + mean(pens_t2i)) / 2


def released_rcloss_kendall(S, R, gap):
    """ITM_CLS RCLoss Kendall term as in spec A.3: (B, B, B) tensors, the same mask both ways."""
    M = ((R[:, :, None] - R[:, None, :]) > gap).to(S.dtype)  # [i, j, k]: R_ij - R_ik > gap
    li = (M * torch.relu(S[:, None, :] - S[:, :, None])).sum() / M.sum()
    St = S.t()
    lt = (M * torch.relu(St[:, None, :] - St[:, :, None])).sum() / M.sum()
    return (li + lt) / 2


def released_sndcg(S, R, tau):
    """Listwise_ITR TripletSNDCGLoss listwise part (spec B.3), (B, B, B) form, released t2i."""
    B = S.shape[0]
    not_self = 1.0 - torch.eye(B, dtype=S.dtype)

    def ranks(X):
        z = ((X[:, None, :] - X[:, :, None]) / tau).clamp(-50, 50)  # [q, j, k] = (X_qk - X_qj)/tau
        return 1 + (torch.sigmoid(z) * not_self[None]).sum(-1)

    gains = 2**R - 1
    ideal = 1 + (R[:, None, :] > R[:, :, None]).to(S.dtype).sum(-1)
    idcg = (gains / torch.log2(1 + ideal)).sum(1)
    l_i2t = (1 - (gains / torch.log2(1 + ranks(S))).sum(1) / idcg).mean()
    l_t2i = (1 - (gains / torch.log2(1 + ranks(S.t()))).sum(1) / idcg).mean()
    return (l_i2t + l_t2i) / 2


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "class_mean"])
@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 3, 1, 4]])
def test_infonce_matches_naive(reduction, ids):
    B = 7
    S = rand_S(B, 1)
    P = None if ids is None else positives_from_ids(ids)
    assert_matches(lambda x: infonce(x, 0.07, P, reduction), lambda x: naive_infonce(x, 0.07, P, reduction), S)


def test_infonce_learnable_tau_gradient():
    S = rand_S(6, 2)
    P = positives_from_ids([0, 0, 1, 2, 2, 3])
    tau1 = torch.tensor(0.05, dtype=DT, requires_grad=True)
    tau2 = torch.tensor(0.05, dtype=DT, requires_grad=True)
    (g1,) = torch.autograd.grad(infonce(S, tau1, P, "class_mean"), tau1)
    (g2,) = torch.autograd.grad(naive_infonce(S, tau2, P, "class_mean"), tau2)
    torch.testing.assert_close(g1, g2, **GRAD_TOL)
    assert torch.autograd.gradcheck(lambda s, t: infonce(s, t, P), (leaf(S), leaf(tau1)))


def test_infonce_diagonal_equals_cross_entropy():
    B = 6
    S = rand_S(B, 3)
    target = torch.arange(B)
    ref = (F.cross_entropy(S / 0.05, target) + F.cross_entropy(S.T / 0.05, target)) / 2
    torch.testing.assert_close(infonce(S, 0.05), ref, **VAL_TOL)
    # an explicit diagonal mask is the same as positives=None
    torch.testing.assert_close(infonce(S, 0.05, torch.eye(B, dtype=torch.bool)), ref, **VAL_TOL)


def test_infonce_class_mean_is_sum_over_B():
    B = 7
    S = rand_S(B, 4)
    P = positives_from_ids([3, 3, 1, 0, 1, 2, 3])
    torch.testing.assert_close(infonce(S, 0.1, P, "class_mean"), infonce(S, 0.1, P, "sum") / B, **VAL_TOL)


def test_infonce_multi_positive_soft_target_ce():
    """CUSA form: Y = P / P.sum(1); soft-target CE, written with torch's soft-label cross_entropy."""
    ids = [0, 1, 0, 2, 1, 0]
    P = positives_from_ids(ids).to(DT)
    S = rand_S(6, 5)
    Y = P / P.sum(1, keepdim=True)
    ref = (F.cross_entropy(S / 0.05, Y) + F.cross_entropy(S.T / 0.05, Y.T / Y.T.sum(1, keepdim=True))) / 2
    torch.testing.assert_close(infonce(S, 0.05, P.bool()), ref, **VAL_TOL)


# ---------------------------------------------------------------------------------------------
# triplets
# ---------------------------------------------------------------------------------------------

IDS7 = [0, 1, 0, 2, 3, 1, 4]


@pytest.mark.parametrize("ids", [None, IDS7])
def test_triplet_hardest_matches_naive(ids):
    S = rand_S(7, 6)
    P = None if ids is None else positives_from_ids(ids)
    assert_matches(lambda x: triplet_hardest(x, 0.2, P), lambda x: naive_triplet_hardest(x, 0.2, P), S)


def test_triplet_hardest_excludes_positives():
    """Another caption of the same image must not be a negative when a positives mask is given."""
    S = torch.tensor([[0.5, 0.0, 0.9], [0.0, 0.5, 0.0], [0.9, 0.0, 0.5]], dtype=DT)
    P = positives_from_ids([0, 1, 0])
    assert float(triplet_hardest(S, 0.2)) > 0.4  # the 0.9 entries act as negatives
    # with the mask, every remaining negative has hinge [0.2 - 0.5 + 0]_+ = 0
    assert float(triplet_hardest(S, 0.2, P)) == 0.0


@pytest.mark.parametrize("ids", [None, IDS7])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_triplet_soft_negative_matches_naive(ids, tau):
    S = rand_S(7, 7)
    P = None if ids is None else positives_from_ids(ids)
    assert_matches(lambda x: triplet_soft_negative(x, 0.2, tau, P), lambda x: naive_triplet_sn(x, 0.2, tau, P), S)


def test_triplet_soft_negative_limits():
    B = 7
    g = torch.Generator().manual_seed(8)
    # distinct similarities, >= 0.04 apart, so the hardest negative is unique with a clear gap
    S = (torch.randperm(B * B, generator=g).to(DT).reshape(B, B) / (B * B)) * 2 - 1
    for ids in (None, IDS7):
        P = None if ids is None else positives_from_ids(ids)
        v_sn, g_sn = value_and_grad(lambda x: triplet_soft_negative(x, 0.2, 1e-4, P), S)
        v_h, g_h = value_and_grad(lambda x: triplet_hardest(x, 0.2, P), S)
        assert v_sn == pytest.approx(v_h, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(g_sn, g_h, rtol=1e-9, atol=1e-9)
    # tau -> inf: average hinge over the B - 1 negatives
    d = S.diagonal()
    off = ~torch.eye(B, dtype=torch.bool)
    avg_i = ((0.2 - d[:, None] + S).clamp(min=0) * off).sum(1) / (B - 1)
    avg_t = ((0.2 - d[None, :] + S).clamp(min=0) * off).sum(0) / (B - 1)
    ref = (avg_i.mean() + avg_t.mean()) / 2
    torch.testing.assert_close(triplet_soft_negative(S, 0.2, 1e9), ref, rtol=1e-7, atol=1e-9)


def test_triplet_soft_negative_weights_not_detached_by_default():
    S = rand_S(6, 9)
    _, g_flow = value_and_grad(lambda x: triplet_soft_negative(x, 0.2, 0.1), S)
    _, g_det = value_and_grad(lambda x: triplet_soft_negative(x, 0.2, 0.1, detach_weights=True), S)
    assert not torch.allclose(g_flow, g_det)
    torch.testing.assert_close(
        triplet_soft_negative(S, 0.2, 0.1), triplet_soft_negative(S, 0.2, 0.1, detach_weights=True), **VAL_TOL
    )
    # a learnable tau receives a gradient
    tau = torch.tensor(0.1, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: triplet_soft_negative(s, 0.2, t), (leaf(S), tau))


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.15, 10.0])
@pytest.mark.parametrize("ids", [None, IDS7])
def test_triplet_selhn_matches_naive(eps, ids):
    S = rand_S(7, 10)
    P = None if ids is None else positives_from_ids(ids)
    assert_matches(lambda x: triplet_selhn(x, 0.2, eps, P), lambda x: naive_selhn(x, 0.2, eps, P), S)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3])
def test_triplet_selhn_matches_released_rvsepp(eps):
    S = rand_S(7, 11)
    assert_matches(lambda x: triplet_selhn(x, 0.2, eps), lambda x: released_selhn(x, 0.2, eps), S)


def test_triplet_selhn_limits_and_default():
    S = rand_S(7, 12)
    assert fn.SELHN_DEFAULT_EPS == 0.01
    torch.testing.assert_close(triplet_selhn(S, 0.2, eps=0.0), triplet_hardest(S, 0.2), **VAL_TOL)
    torch.testing.assert_close(
        triplet_selhn(S, 0.2, eps=1e9), triplet_soft_negative(S, 0.2, 1e12), rtol=1e-7, atol=1e-9
    )


# ---------------------------------------------------------------------------------------------
# soft-label KL, RSC relevance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_tau,t_tau", [(0.45, 1.0), (0.1, 0.5)])
def test_soft_label_kl_matches_naive_and_kl_div(s_tau, t_tau):
    student = rand_S(6, 13, scale=1.0)
    teacher = rand_S(6, 14, scale=1.0)
    assert_matches(
        lambda x: soft_label_kl(x, teacher, s_tau, t_tau), lambda x: naive_kl(x, teacher, s_tau, t_tau), student
    )
    ref = F.kl_div(
        torch.log_softmax(student / s_tau, 1),
        torch.log_softmax(teacher / t_tau, 1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(soft_label_kl(student, teacher, s_tau, t_tau), ref, **VAL_TOL)


def test_soft_label_kl_teacher_has_no_gradient_student_tau_does():
    student, teacher = leaf(rand_S(5, 15)), leaf(rand_S(5, 16))
    tau = torch.tensor(0.45, dtype=DT, requires_grad=True)
    t_tau = torch.tensor(1.0, dtype=DT, requires_grad=True)
    loss = soft_label_kl(student, teacher, tau, t_tau)
    loss.backward()
    assert teacher.grad is None and t_tau.grad is None
    assert student.grad is not None and tau.grad is not None and float(tau.grad) != 0.0
    assert torch.autograd.gradcheck(lambda s, t: soft_label_kl(s, teacher.detach(), t), (leaf(student), leaf(tau)))
    # zero when the student reproduces the teacher distribution
    assert float(soft_label_kl(teacher.detach() * 0.45, teacher.detach(), 0.45)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rescale", [True, False])
def test_caption_relevance_irregular_mask(rescale):
    rng = np.random.default_rng(17)
    B, K, D = 6, 3, 5
    caps = rng.normal(size=(B, K, D)) * rng.uniform(0.5, 3.0, size=(B, K, 1))  # not unit norm
    texts = rng.normal(size=(B, D)) * 2.0
    counts = [1, 2, 3, 1, 3, 2]
    mask = np.array([[c < n for c in range(K)] for n in counts])
    caps[~mask] = 1e3 * rng.normal(size=(int((~mask).sum()), D))  # junk in padded slots
    R = caption_relevance(torch.tensor(caps), torch.tensor(texts), torch.tensor(mask), rescale=rescale)
    assert R.shape == (B, B) and R.dtype == DT and not R.requires_grad
    np.testing.assert_allclose(R.numpy(), naive_relevance(caps, texts, mask, rescale), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.diag(R.numpy()), 1.0)
    assert not np.allclose(R.numpy(), R.numpy().T)
    # no mask = all captions valid
    R_all = caption_relevance(torch.tensor(caps), torch.tensor(texts), rescale=rescale)
    np.testing.assert_allclose(R_all.numpy(), naive_relevance(caps, texts, None, rescale), rtol=1e-12, atol=1e-12)


def test_caption_relevance_no_grad_and_errors():
    caps = torch.randn(4, 2, 3, dtype=DT, requires_grad=True)
    texts = torch.randn(4, 3, dtype=DT, requires_grad=True)
    R = caption_relevance(caps, texts)
    assert R.grad_fn is None and not R.requires_grad
    with pytest.raises(ValueError):
        caption_relevance(caps, texts, torch.tensor([[True, False], [False, False], [True, True], [True, True]]))


# ---------------------------------------------------------------------------------------------
# Smooth-NDCG
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
@pytest.mark.parametrize("tau,scale", [(0.01, 0.4), (0.1, 0.8), (1.0, 1.0)])
def test_smooth_ndcg_matches_naive(t2i, tau, scale):
    B = 6
    S, R = rand_S(B, 20, scale), rand_R(B, 20)
    assert_matches(lambda x: smooth_ndcg_loss(x, R, tau, t2i), lambda x: naive_sndcg(x, R, tau, t2i), S)


def test_smooth_ndcg_clamp_engaged():
    """|S_ik - S_ij| / tau > 50 for many pairs: the released clamp is applied to the exponent."""
    B = 6
    S, R = rand_S(B, 21, 1.0), rand_R(B, 21)
    z = (S[:, None, :] - S[:, :, None]).abs() / 0.005
    assert bool((z > 50).any())
    assert_matches(lambda x: smooth_ndcg_loss(x, R, 0.005), lambda x: naive_sndcg(x, R, 0.005), S)


def test_smooth_ndcg_as_released_matches_released_formula():
    B = 7
    S, R = rand_S(B, 22), rand_R(B, 22)
    assert_matches(lambda x: smooth_ndcg_loss(x, R, 0.05, "as_released"), lambda x: released_sndcg(x, R, 0.05), S)
    # with asymmetric R the two t2i forms differ; with a symmetric R they coincide
    assert abs(float(smooth_ndcg_loss(S, R, 0.05)) - float(smooth_ndcg_loss(S, R, 0.05, "as_released"))) > 1e-4
    Rs = (R + R.T) / 2
    torch.testing.assert_close(smooth_ndcg_loss(S, Rs, 0.05), smooth_ndcg_loss(S, Rs, 0.05, "as_released"), **VAL_TOL)


def test_smooth_ndcg_ties_and_perfect_ranking():
    B = 5
    R = torch.tensor(
        [
            [1.0, 0.5, 0.5, 0.2, 0.5],
            [0.3, 1.0, 0.3, 0.3, 0.9],
            [0.2, 0.2, 1.0, 0.7, 0.7],
            [0.6, 0.1, 0.6, 1.0, 0.1],
            [0.4, 0.4, 0.4, 0.4, 1.0],
        ],
        dtype=DT,
    )
    S = rand_S(B, 23)
    assert_matches(lambda x: smooth_ndcg_loss(x, R, 0.05), lambda x: naive_sndcg(x, R, 0.05), S)
    # a ranking consistent with R and tau -> 0 gives NDCG -> 1 (i2t), ties excepted
    Rd = torch.tensor(
        [[1.0, 0.8, 0.6, 0.4], [0.8, 1.0, 0.4, 0.6], [0.6, 0.4, 1.0, 0.8], [0.4, 0.6, 0.8, 1.0]], dtype=DT
    )
    assert float(smooth_ndcg_loss(Rd, Rd, 1e-4)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
def test_smooth_ndcg_chunking_and_tiling(t2i, monkeypatch):
    B = 7
    S, R = rand_S(B, 24), rand_R(B, 24)
    v_ref, g_ref = value_and_grad(lambda x: smooth_ndcg_loss(x, R, 0.05, t2i, chunk_size=B), S)
    for chunk in (1, 2, 3, None):
        v, g = value_and_grad(lambda x: smooth_ndcg_loss(x, R, 0.05, t2i, chunk_size=chunk), S)
        assert v == pytest.approx(v_ref, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    for tile in (1, 10, 30):  # CPU blocks smaller than one query: row blocks of candidates j
        monkeypatch.setattr(blocks, "CPU_TILE_ELEMENTS", tile)
        v, g = value_and_grad(lambda x: smooth_ndcg_loss(x, R, 0.05, t2i, chunk_size=2), S)
        assert v == pytest.approx(v_ref, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Kendall ranking loss + SW-HS
# ---------------------------------------------------------------------------------------------

KENDALL_CASES = [
    # surrogate, t2i, window, hard_k, gap
    ("hinge", "transpose", None, None, 0.3),
    ("hinge", "as_released", None, None, 0.3),
    ("tanh", "transpose", None, None, 0.2),
    ("sigmoid", "as_released", None, None, 0.1),
    ("hinge", "transpose", 2, None, 0.1),
    ("sigmoid", "as_released", 3, None, 0.0),
    ("tanh", "transpose", 1, None, 0.0),
    ("hinge", "transpose", None, 4, 0.1),
    ("sigmoid", "transpose", None, 5, 0.2),
    ("tanh", "as_released", 2, 3, 0.0),
    ("sigmoid", "transpose", 4, 2, 0.1),
]


@pytest.mark.parametrize("surrogate,t2i,window,hard_k,gap", KENDALL_CASES)
def test_kendall_matches_naive(surrogate, t2i, window, hard_k, gap):
    B = 7
    S, R = rand_S(B, 30), rand_R(B, 30)
    kw = dict(gap=gap, surrogate=surrogate, t2i_relevance=t2i, window=window, hard_k=hard_k, temperature=0.15)
    naive_kw = dict(gap=gap, surrogate=surrogate, t2i=t2i, window=window, hard_k=hard_k, temperature=0.15)
    assert_matches(lambda x: kendall_rank_loss(x, R, **kw), lambda x: naive_kendall(x, R, **naive_kw), S)


def test_kendall_as_released_is_itm_cls_rcloss():
    B = 7
    S, R = rand_S(B, 31), rand_R(B, 31)
    assert_matches(
        lambda x: kendall_rank_loss(x, R, 0.3, "hinge", "as_released"), lambda x: released_rcloss_kendall(x, R, 0.3), S
    )
    assert (
        abs(float(kendall_rank_loss(S, R, 0.1)) - float(kendall_rank_loss(S, R, 0.1, t2i_relevance="as_released")))
        > 1e-6
    )


@pytest.mark.parametrize("surrogate", ["hinge", "tanh", "sigmoid"])
@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
def test_kendall_full_window_equals_full(surrogate, t2i):
    B = 7
    S, R = rand_S(B, 32), rand_R(B, 32)
    v_full, g_full = value_and_grad(lambda x: kendall_rank_loss(x, R, 0.1, surrogate, t2i), S)
    for window in (B - 1, B, 100):
        v, g = value_and_grad(lambda x: kendall_rank_loss(x, R, 0.1, surrogate, t2i, window=window), S)
        assert v == pytest.approx(v_full, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-13)
    # hard_k covering every pair is the full loss too
    v, g = value_and_grad(lambda x: kendall_rank_loss(x, R, 0.1, surrogate, t2i, hard_k=B * B), S)
    assert v == pytest.approx(v_full, rel=1e-12, abs=1e-14)
    # a window shorter than the list drops pairs: different loss
    v_w = float(kendall_rank_loss(S, R, 0.0, surrogate, t2i, window=1))
    assert v_w != pytest.approx(float(kendall_rank_loss(S, R, 0.0, surrogate, t2i)), rel=1e-6)


@pytest.mark.parametrize("window,hard_k", [(None, None), (2, None), (6, None), (None, 3), (3, 2)])
def test_kendall_chunking(window, hard_k, monkeypatch):
    B = 7
    S, R = rand_S(B, 33), rand_R(B, 33)
    kw = dict(gap=0.05, surrogate="sigmoid", window=window, hard_k=hard_k, temperature=0.2)
    v_ref, g_ref = value_and_grad(lambda x: kendall_rank_loss(x, R, chunk_size=B, **kw), S)
    for chunk in (1, 2, 3, None):
        v, g = value_and_grad(lambda x: kendall_rank_loss(x, R, chunk_size=chunk, **kw), S)
        assert v == pytest.approx(v_ref, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    monkeypatch.setattr(blocks, "CPU_TILE_ELEMENTS", 10)
    v, g = value_and_grad(lambda x: kendall_rank_loss(x, R, chunk_size=2, **kw), S)
    assert v == pytest.approx(v_ref, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


def test_kendall_no_valid_pair_is_zero_with_grad():
    S = leaf(rand_S(5, 34))
    loss = kendall_rank_loss(S, rand_R(5, 34), gap=2.0)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert S.grad is not None and float(S.grad.abs().sum()) == 0.0


def test_kendall_hard_k_by_hand():
    """3x3 case worked by hand: hard_k keeps the most violated valid pairs per query."""
    S = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.0, 0.9], [0.4, 0.6, 0.1]], dtype=DT)
    R = torch.tensor([[1.0, 0.2, 0.6], [0.1, 1.0, 0.5], [0.3, 0.0, 1.0]], dtype=DT)
    # i2t, gap 0, pairs (j, k) with R_ij > R_ik, hinge relu(S_ik - S_ij):
    #   row 0: (0,1) 0.4, (0,2) 0.2, (2,1) 0.2;  row 1: (1,0) 0.2, (1,2) 0.9, (2,0) 0;
    #   row 2: (2,0) 0.3, (2,1) 0.5, (0,1) 0.2
    # t2i (transpose), column j, relevance R_kj, hinge relu(S_lj - S_kj):
    #   col 0: 0.1, 0.3, 0;  col 1: 0.5, 0.6, 0.1;  col 2: 0.2, 0.8, 0.6
    full = (
        (0.4 + 0.2 + 0.2 + 0.2 + 0.9 + 0.3 + 0.5 + 0.2) / 9 + (0.1 + 0.3 + 0.5 + 0.6 + 0.1 + 0.2 + 0.8 + 0.6) / 9
    ) / 2
    top1 = ((0.4 + 0.9 + 0.5) / 3 + (0.3 + 0.6 + 0.8) / 3) / 2
    top2 = ((0.6 + 1.1 + 0.8) / 6 + (0.4 + 1.1 + 1.4) / 6) / 2
    assert float(kendall_rank_loss(S, R, gap=0.0)) == pytest.approx(full, rel=1e-12)
    assert float(kendall_rank_loss(S, R, gap=0.0, hard_k=1)) == pytest.approx(top1, rel=1e-12)
    assert float(kendall_rank_loss(S, R, gap=0.0, hard_k=2)) == pytest.approx(top2, rel=1e-12)
    # window=1 on the relevance order: row 0 order (0, 2, 1) -> pairs (0,2), (2,1) only
    w1_i2t = (0.2 + 0.2) + (0.9 + 0.0) + (0.3 + 0.2)  # row 1 order (1, 2, 0); row 2 order (2, 0, 1)
    w1_t2i = (0.3 + 0.0) + (0.5 + 0.1) + (0.2 + 0.6)  # col 0 (0, 2, 1); col 1 (1, 0, 2); col 2 (2, 0, 1)
    assert float(kendall_rank_loss(S, R, gap=0.0, window=1)) == pytest.approx((w1_i2t / 6 + w1_t2i / 6) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# gradcheck, permutation invariance, dtype / errors
# ---------------------------------------------------------------------------------------------

_R5 = rand_R(5, 40)
_P5 = positives_from_ids([0, 1, 0, 2, 1])
GRADCHECK_FUNCS = {
    "infonce": lambda x: infonce(x, 0.1, _P5),
    "triplet_hardest": lambda x: triplet_hardest(x, 0.2, _P5),
    "triplet_soft_negative": lambda x: triplet_soft_negative(x, 0.2, 0.1),
    "triplet_selhn": lambda x: triplet_selhn(x, 0.2, 0.3),
    "soft_label_kl": lambda x: soft_label_kl(x, _R5, 0.45),
    "smooth_ndcg": lambda x: smooth_ndcg_loss(x, _R5, 0.1, chunk_size=2),
    "smooth_ndcg_released": lambda x: smooth_ndcg_loss(x, _R5, 0.1, "as_released"),
    "kendall_hinge": lambda x: kendall_rank_loss(x, _R5, 0.1, chunk_size=2),
    "kendall_tanh_window": lambda x: kendall_rank_loss(x, _R5, 0.1, "tanh", window=2, chunk_size=2),
    "kendall_sigmoid_hard": lambda x: kendall_rank_loss(x, _R5, 0.0, "sigmoid", window=3, hard_k=3),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_FUNCS))
def test_gradcheck(name):
    S = leaf(rand_S(5, 41))
    assert torch.autograd.gradcheck(GRADCHECK_FUNCS[name], (S,), eps=1e-6, atol=1e-6)


PERM_CASES = {
    "infonce": lambda S, R, P: infonce(S, 0.05, P),
    "infonce_class_mean": lambda S, R, P: infonce(S, 0.05, P, "class_mean"),
    "triplet_hardest": lambda S, R, P: triplet_hardest(S, 0.2, P),
    "triplet_soft_negative": lambda S, R, P: triplet_soft_negative(S, 0.2, 0.05, P),
    "triplet_selhn": lambda S, R, P: triplet_selhn(S, 0.2, 0.1, P),
    "soft_label_kl": lambda S, R, P: soft_label_kl(S, R, 0.45) + soft_label_kl(S.T, R.T, 0.3),
    "smooth_ndcg": lambda S, R, P: smooth_ndcg_loss(S, R, 0.02),
    "smooth_ndcg_released": lambda S, R, P: smooth_ndcg_loss(S, R, 0.02, "as_released"),
    "kendall": lambda S, R, P: kendall_rank_loss(S, R, 0.1),
    "kendall_released": lambda S, R, P: kendall_rank_loss(S, R, 0.1, "tanh", "as_released"),
    "kendall_sw_hs": lambda S, R, P: kendall_rank_loss(S, R, 0.05, "sigmoid", window=2, hard_k=4),
}


@pytest.mark.parametrize("name", sorted(PERM_CASES))
def test_permutation_invariance(name):
    B = 7
    S, R = rand_S(B, 42), rand_R(B, 42)
    P = positives_from_ids(IDS7)
    f = PERM_CASES[name]
    v, g = value_and_grad(lambda x: f(x, R, P), S)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(43))
    Sp, Rp, Pp = perm_all(perm, S, R, P)
    vp, gp = value_and_grad(lambda x: f(x, Rp, Pp), Sp)
    assert vp == pytest.approx(v, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(gp, g[perm][:, perm], rtol=1e-10, atol=1e-13)


def test_caption_relevance_permutation():
    rng = np.random.default_rng(44)
    caps, texts = torch.tensor(rng.normal(size=(6, 5, 4))), torch.tensor(rng.normal(size=(6, 4)))
    R = caption_relevance(caps, texts)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(caption_relevance(caps[perm], texts[perm]), R[perm][:, perm], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", sorted(PERM_CASES))
def test_float32_in_float32_out(name):
    S = rand_S(6, 45).float().requires_grad_(True)
    R = rand_R(6, 45).float()
    out = PERM_CASES[name](S, R, positives_from_ids([0, 1, 0, 2, 3, 1]))
    assert out.dtype == torch.float32 and out.dim() == 0 and math.isfinite(float(out.detach()))
    out.backward()
    assert S.grad is not None and S.grad.dtype == torch.float32


def test_argument_errors():
    S, R = rand_S(4, 46), rand_R(4, 46)
    with pytest.raises(ValueError):
        smooth_ndcg_loss(S, R, t2i_relevance="transposed")
    with pytest.raises(ValueError):
        kendall_rank_loss(S, R, surrogate="logistic")
    with pytest.raises(ValueError):
        kendall_rank_loss(S, R, window=0)
    with pytest.raises(ValueError):
        kendall_rank_loss(S, R, hard_k=0)
    with pytest.raises(ValueError):
        kendall_rank_loss(S, R, gap=-0.1)
    with pytest.raises(ValueError):
        smooth_ndcg_loss(S[:, :3], R[:, :3])
    with pytest.raises(ValueError):
        infonce(S, 0.1, reduction="mean")
    with pytest.raises(ValueError):
        infonce(S, 0.1, torch.zeros(4, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# memory: O(B^2) extra, not (B, B, B)
# ---------------------------------------------------------------------------------------------

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from methods.functional import kendall_rank_loss, smooth_ndcg_loss
    B = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    # warm-up at a tiny size: kernels, thread pools and autograd machinery are loaded
    for f in (smooth_ndcg_loss, kendall_rank_loss):
        x = torch.rand(8, 8, requires_grad=True); f(x, torch.rand(8, 8)).backward()
    S = (torch.rand(B, B, generator=g) * 2 - 1).mul_(0.3).requires_grad_(True)
    R = torch.rand(B, B, generator=g); R.fill_diagonal_(1.0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, f in (("sndcg", smooth_ndcg_loss), ("kendall", kendall_rank_loss)):
        loss = f(S, R)
        loss.backward()
        out[name] = float(loss)
        del loss
    assert S.grad is not None and torch.isfinite(S.grad).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (peak - base) / 1024.0, **out}))
    """
)


def _peak_extra_mb(B: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(B)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_is_quadratic_small():
    """B=384: one float32 (B, B, B) tensor alone is 226 MB; the chunked losses stay well below."""
    res = _peak_extra_mb(384)
    assert res["extra_mb"] < 150, res
    assert 0.0 < res["sndcg"] < 1.0 and res["kendall"] > 0.0


@pytest.mark.slow
def test_memory_b2048_within_2gb():
    """B=2048 forward + backward of S-NDCG and all-pairs Kendall on CPU: < 2 GB extra RSS.

    (The released form would hold several 34 GB (B, B, B) float32 tensors.)
    """
    res = _peak_extra_mb(2048)
    assert res["extra_mb"] < 2048, res


# ---------------------------------------------------------------------------------------------
# query rows (scaling.local_loss): methods/row_losses.py
# ---------------------------------------------------------------------------------------------

W3, IDS9 = 3, [0, 1, 0, 2, 3, 1, 4, 5, 2]  # 3 ranks of 3 rows; images 0, 1, 2 have captions on two ranks


def row_lists(S: torch.Tensor, R: torch.Tensor, rows: slice, t2i: str = "transpose"):
    """What a rank holding ``rows`` computes from: its (Q, N) lists of S and S.T, relevance rows, own columns."""
    own = torch.arange(S.shape[0])[rows]
    return (S[rows], S.t()[rows], *row_losses.relevance_lists(R, own, t2i), own)


def emulated_rank_sum(run: Callable[[int, Callable], Any], world: int) -> Callable[[int], Any]:
    """``world`` ranks in one process: a first pass of ``run(r, rank_sum)`` (no grad) records every rank's
    ``rank_sum`` argument (Kendall's pair counts); the returned ``r -> run(r, rank_sum)`` then gets their sum,
    as an all-reduce would give it."""
    counts: list = []
    with torch.no_grad():
        for r in range(world):
            run(r, lambda c: counts.append(c) or c)
    total = torch.stack(counts).sum(0) if counts else None
    return lambda r: run(r, lambda c: total)


# name: (square loss f(S, R, P), its row form g(S_i2t, S_t2i, R_i2t, R_t2i, own, P_rows, rank_sum), t2i)
ROW_CASES = {
    "triplet_hardest": (
        lambda S, R, P: triplet_hardest(S, 0.2, P),
        lambda a, b, ri, rt, own, P, rs: row_losses.triplet_rows(a, b, own, 0.2, "hardest", P),
        "transpose",
    ),
    "triplet_hardest_diagonal": (
        lambda S, R, P: triplet_hardest(S, 0.3),
        lambda a, b, ri, rt, own, P, rs: row_losses.triplet_rows(a, b, own, 0.3),
        "transpose",
    ),
    "triplet_soft_negative": (
        lambda S, R, P: triplet_soft_negative(S, 0.2, 0.1, P),
        lambda a, b, ri, rt, own, P, rs: row_losses.triplet_rows(a, b, own, 0.2, "soft_negative", P, tau=0.1),
        "transpose",
    ),
    "triplet_selhn": (
        lambda S, R, P: triplet_selhn(S, 0.2, 0.15, P),
        lambda a, b, ri, rt, own, P, rs: row_losses.triplet_rows(a, b, own, 0.2, "selhn", P, eps=0.15),
        "transpose",
    ),
    "smooth_ndcg": (
        lambda S, R, P: smooth_ndcg_loss(S, R, 0.05, chunk_size=2),
        lambda a, b, ri, rt, own, P, rs: row_losses.smooth_ndcg_rows(a, b, ri, rt, 0.05, chunk_size=2),
        "transpose",
    ),
    "smooth_ndcg_released": (
        lambda S, R, P: smooth_ndcg_loss(S, R, 0.05, "as_released"),
        lambda a, b, ri, rt, own, P, rs: row_losses.smooth_ndcg_rows(a, b, ri, rt, 0.05),
        "as_released",
    ),
    "kendall": (
        lambda S, R, P: kendall_rank_loss(S, R, 0.2, chunk_size=2),
        lambda a, b, ri, rt, own, P, rs: row_losses.kendall_rows(a, b, ri, rt, rs, 0.2, chunk_size=2),
        "transpose",
    ),
    "kendall_released_tanh": (
        lambda S, R, P: kendall_rank_loss(S, R, 0.1, "tanh", "as_released"),
        lambda a, b, ri, rt, own, P, rs: row_losses.kendall_rows(a, b, ri, rt, rs, 0.1, "tanh"),
        "as_released",
    ),
    "kendall_sw_hs": (
        lambda S, R, P: kendall_rank_loss(S, R, 0.05, "sigmoid", window=2, hard_k=4),
        lambda a, b, ri, rt, own, P, rs: row_losses.kendall_rows(a, b, ri, rt, rs, 0.05, "sigmoid", window=2, hard_k=4),
        "transpose",
    ),
    "kendall_window_hinge": (
        lambda S, R, P: kendall_rank_loss(S, R, 0.1, window=3),
        lambda a, b, ri, rt, own, P, rs: row_losses.kendall_rows(a, b, ri, rt, rs, 0.1, window=3),
        "transpose",
    ),
    "kendall_hard_k": (
        lambda S, R, P: kendall_rank_loss(S, R, 0.1, "sigmoid", hard_k=5),
        lambda a, b, ri, rt, own, P, rs: row_losses.kendall_rows(a, b, ri, rt, rs, 0.1, "sigmoid", hard_k=5),
        "transpose",
    ),
}


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_row_forms_average_to_the_square_loss(name):
    """The mean over 3 ranks (a partition of the 9 rows) of the row form is the square loss on the whole (9, 9)
    batch, value and gradient; each rank's value differs (it really computed only its rows). R is asymmetric,
    so a direction reading the wrong relevance is caught."""
    square, row_form, t2i = ROW_CASES[name]
    N = len(IDS9)
    S, R, P = rand_S(N, 47, 0.6), rand_R(N, 47), positives_from_ids(IDS9)
    Q = N // W3
    v, g = value_and_grad(lambda x: square(x, R, P), S)
    x = leaf(S)

    def rank(r: int, rank_sum: Callable) -> torch.Tensor:
        rows = slice(r * Q, (r + 1) * Q)
        a, b, ri, rt, own = row_lists(x, R, rows, t2i)
        return row_form(a, b, ri, rt, own, P[rows], rank_sum)

    per_rank = emulated_rank_sum(rank, W3)
    parts = [per_rank(r) for r in range(W3)]
    total = torch.stack(parts).mean()
    (g_rows,) = torch.autograd.grad(total, x)
    assert float(total.detach()) == pytest.approx(v, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(g_rows, g, rtol=1e-10, atol=1e-14)
    assert g.abs().max() > 1e-3
    values = [float(p.detach()) for p in parts]
    assert max(values) - min(values) > 1e-6, values


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_row_form_of_every_row_is_the_square_loss(name):
    """One rank with every row (Q = N, rank_sum the identity) computes the square loss itself."""
    square, row_form, t2i = ROW_CASES[name]
    N = len(IDS9)
    S, R, P = rand_S(N, 48), rand_R(N, 48), positives_from_ids(IDS9)
    v, g = value_and_grad(lambda x: square(x, R, P), S)
    v_rows, g_rows = value_and_grad(lambda x: row_form(*row_lists(x, R, slice(None), t2i), P, lambda c: c), S)
    assert v_rows == pytest.approx(v, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(g_rows, g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("t2i", ["transpose", "as_released"])
def test_caption_relevance_rows_are_the_rows_of_the_square_relevance(rescale, t2i):
    """R_i2t = R[own], R_t2i = R[:, own].T (or R[own] as released), R from the naive loop; own entries 1."""
    rng = np.random.default_rng(49)
    N, K, D = 7, 3, 4
    caps, texts = rng.normal(size=(N, K, D)) * 2.0, rng.normal(size=(N, D))
    mask = np.array([[c < n for c in range(K)] for n in [1, 3, 2, 3, 1, 2, 3]])
    caps[~mask] = 1e3
    R = naive_relevance(caps, texts, mask, rescale)
    np.fill_diagonal(R, 1.0)
    own = torch.tensor([4, 5, 6])
    R_i2t, R_t2i = row_losses.caption_relevance_rows(
        torch.tensor(caps), torch.tensor(texts), own, torch.tensor(mask), rescale, t2i
    )
    assert R_i2t.shape == R_t2i.shape == (3, N) and not R_i2t.requires_grad
    np.testing.assert_allclose(R_i2t.numpy(), R[4:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R_t2i.numpy(), (R[4:] if t2i == "as_released" else R[:, 4:].T), rtol=1e-12, atol=1e-12)


def test_relevance_lists_set_the_own_pair_and_leave_R_alone():
    R = torch.rand(5, 5, generator=torch.Generator().manual_seed(50), dtype=DT)
    before = R.clone()
    R_i2t, R_t2i = row_losses.relevance_lists(R, torch.tensor([1, 3]))
    torch.testing.assert_close(R, before, rtol=0, atol=0)
    expected = before.clone()
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(R_i2t, expected[[1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(R_t2i, expected.T[[1, 3]], rtol=0, atol=0)


def test_kendall_rows_without_valid_pairs_is_zero_with_grad():
    S = leaf(rand_S(4, 51))
    flat = torch.full((2, 4), 0.5, dtype=DT)  # no two candidates 0.3 apart
    out = row_losses.kendall_rows(S[:2], S.t()[:2], flat, flat, lambda c: c * 2, 0.3)
    assert float(out.detach()) == 0.0
    out.backward()
    assert S.grad is not None and float(S.grad.abs().max()) == 0.0


def test_row_form_argument_errors():
    S, R = rand_S(4, 52), rand_R(4, 52)
    a, b, ri, rt, own = row_lists(S, R, slice(0, 2))
    with pytest.raises(ValueError, match="same shape"):
        row_losses.triplet_rows(a, b[:1], own)
    with pytest.raises(ValueError, match="own must be"):
        row_losses.triplet_rows(a, b, own[:1])
    with pytest.raises(ValueError, match="unknown triplet mining"):
        row_losses.triplet_rows(a, b, own, mining="semi_hard")
    with pytest.raises(ValueError, match="R_t2i"):
        row_losses.smooth_ndcg_rows(a, b, ri, rt[:, :3])
    with pytest.raises(ValueError, match="surrogate"):
        row_losses.kendall_rows(a, b, ri, rt, lambda c: c, surrogate="relu")
    with pytest.raises(ValueError, match="t2i_relevance"):
        row_losses.relevance_lists(R, own, "transposed")


@pytest.mark.parametrize("name", ["smooth_ndcg", "kendall"])
def test_row_forms_with_the_triton_kernels_match_the_torch_form(name, monkeypatch):
    """(Q, N) lists with Q < N through the fused kernels (Triton's interpreter on the CPU) = the torch form."""
    from methods import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernels.supported(torch.zeros(1, device=device)):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(kernels, "BLOCK_J", 8)
    monkeypatch.setattr(kernels, "BLOCK_K", 16)
    N = 19  # 3 j-tiles and 2 k-tiles, the last ones partial
    S, R = rand_S(N, 53, 0.8), rand_R(N, 53)

    def run(x: torch.Tensor, kernel: str) -> torch.Tensor:
        a, b, ri, rt, own = row_lists(x.to(device), R.to(device), slice(5, 12))
        if name == "smooth_ndcg":
            return row_losses.smooth_ndcg_rows(a, b, ri, rt, 0.05, kernel=kernel)
        return row_losses.kendall_rows(a, b, ri, rt, lambda c: c, 0.1, "sigmoid", kernel=kernel)

    v, g = value_and_grad(lambda x: run(x, "triton"), S)
    v_t, g_t = value_and_grad(lambda x: run(x, "torch"), S)
    assert v == pytest.approx(v_t, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g, g_t, rtol=1e-9, atol=1e-12)
