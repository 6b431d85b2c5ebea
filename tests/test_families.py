"""Loss families: composition of the functional terms, CUSA against a naive float64 reading of the paper."""

from __future__ import annotations

import math

import pytest
import torch

import methods
from methods import EmbeddingBatch
from methods import functional as F
from orchestrator.config import ExperimentConfig
from orchestrator.losses import build_loss


@pytest.fixture(autouse=True)
def float64_parameters():
    """Build the families' temperatures in float64 so the naive float64 references compare at 1e-9."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def make_batch(B: int = 6, D: int = 5, seed: int = 0, dtype=torch.float64) -> EmbeddingBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    K = 3
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 2] = mask[1, 1:] = False
    return EmbeddingBatch(
        image_emb=unit(r(B, D)),
        text_emb=unit(r(B, D)),
        image_ids=torch.tensor([0, 1, 2, 2, 3, 4][:B]),
        image_uni=unit(r(B, D)),
        text_uni=unit(r(B, D)),
        teacher_image=r(B, 7),
        teacher_text=r(B, 4),
        caption_group_emb=r(B, K, 4),
        caption_group_mask=mask,
        text_caption_emb=r(B, 4),
        relevance=torch.rand(B, B, generator=g, dtype=dtype),
    )


def naive_kl_rows(student: list[list[float]], teacher: list[list[float]], tau_s: float, tau_t: float) -> float:
    """batchmean KL(softmax(teacher/tau_t) || softmax(student/tau_s)) with explicit loops."""
    total = 0.0
    for srow, trow in zip(student, teacher):
        zs = sum(math.exp(v / tau_s) for v in srow)
        zt = sum(math.exp(v / tau_t) for v in trow)
        for sv, tv in zip(srow, trow):
            q = math.exp(tv / tau_t) / zt
            p = math.exp(sv / tau_s) / zs
            total += q * (math.log(q) - math.log(p))
    return total / len(student)


def cos_matrix(x: torch.Tensor) -> list[list[float]]:
    x = unit(x)
    return (x @ x.T).tolist()


def test_cusa_matches_naive_paper_formulas():
    b = make_batch()
    fam = methods.build("cusa", alpha=0.1, beta=0.5).double()
    out = fam(b)
    S = (b.image_emb @ b.text_emb.T).tolist()
    ST = [list(col) for col in zip(*S)]
    G_i, G_t = cos_matrix(b.teacher_image), cos_matrix(b.teacher_text)
    B = len(S)
    # released "class_mean" InfoNCE with multi-positive targets (two captions of image 2)
    ids = b.image_ids.tolist()
    tau = 0.05

    def ce(rows, pos):
        tot = 0.0
        for i, row in enumerate(rows):
            z = sum(math.exp(v / tau) for v in row)
            npos = sum(pos[i])
            tot += -sum((pos[i][j] / npos) * math.log(math.exp(row[j] / tau) / z) for j in range(B)) / B
        return tot / B

    pos = [[float(ids[i] == ids[j]) for j in range(B)] for i in range(B)]
    infonce = (ce(S, pos) + ce(ST, pos)) / 2
    csa = 0.1 * (naive_kl_rows(S, G_i, 0.45, 1.0) + naive_kl_rows(ST, G_t, 0.45, 1.0)) / 2
    usa = (
        0.5
        * (
            naive_kl_rows(cos_matrix(b.image_uni), G_i, 0.45, 1.0)
            + naive_kl_rows(cos_matrix(b.text_uni), G_t, 0.45, 1.0)
        )
        / 2
    )
    assert float(out.terms["infonce"]) == pytest.approx(infonce, rel=1e-9)
    assert float(out.terms["csa"]) == pytest.approx(csa, rel=1e-9)
    assert float(out.terms["usa"]) == pytest.approx(usa, rel=1e-9)
    assert float(out.total.detach()) == pytest.approx(infonce + csa + usa, rel=1e-9)


def test_cusa_temperatures_clamped_and_learned():
    fam = methods.build("cusa").double()
    assert fam.temperatures() == pytest.approx(
        {"tau": 0.05, "csa_tau": 0.45, "usa_image_tau": 0.45, "usa_text_tau": 0.45}
    )
    with torch.no_grad():
        fam.tau.value.fill_(5.0)
        fam.csa_tau.value.fill_(0.0)
    fam(make_batch())
    assert float(fam.tau.value.detach()) == 0.10 and float(fam.csa_tau.value.detach()) == 0.10
    b = make_batch()
    fam(b).total.backward()
    assert all(t.value.grad is not None for t in (fam.tau, fam.csa_tau, fam.usa_image_tau, fam.usa_text_tau))


def test_cusa_add_and_dot_modes():
    b = make_batch()
    G_i, G_t = torch.tensor(cos_matrix(b.teacher_image)), torch.tensor(cos_matrix(b.teacher_text))
    S = b.image_emb @ b.text_emb.T
    for mode, target in (("add", (G_i + G_t) / 2), ("dot", torch.sqrt(G_i.clamp_min(0) * G_t.clamp_min(0)))):
        out = methods.build("cusa", beta=0.0, csa_mode=mode).double()(b)
        expected = (
            0.1
            * (
                naive_kl_rows(S.tolist(), target.tolist(), 0.45, 1.0)
                + naive_kl_rows(S.T.tolist(), target.tolist(), 0.45, 1.0)
            )
            / 2
        )
        assert float(out.terms["csa"]) == pytest.approx(expected, rel=1e-9)


def test_listwise_is_convex_combination_of_its_terms():
    b = make_batch()
    fam = methods.build("listwise", weight=0.3, relevance="teacher")
    out = fam(b)
    S = b.similarity()
    R = F.caption_relevance(b.caption_group_emb, b.text_caption_emb, b.caption_group_mask, rescale=True)
    expected = 0.7 * F.triplet_hardest(S, 0.2, positives=b.positives()) + 0.3 * F.smooth_ndcg_loss(S, R, tau=0.01)
    assert float(out.total.detach()) == pytest.approx(float(expected), rel=1e-12)
    exact = methods.build("listwise", weight=0.3, relevance="exact")(b)
    R2 = b.relevance.clone()
    R2.fill_diagonal_(1.0)
    expected2 = 0.7 * F.triplet_hardest(S, 0.2, positives=b.positives()) + 0.3 * F.smooth_ndcg_loss(S, R2, tau=0.01)
    assert float(exact.total) == pytest.approx(float(expected2), rel=1e-12)


def test_bcls_is_triplet_sn_plus_weighted_kendall():
    b = make_batch()
    fam = methods.build("bcls", kendall_weight=0.7, window=2, hard_k=3, relevance="teacher")
    out = fam(b)
    S = b.similarity()
    R = F.caption_relevance(b.caption_group_emb, b.text_caption_emb, b.caption_group_mask, rescale=False)
    expected = F.triplet_soft_negative(S, 0.2, tau=0.05, positives=b.positives()) + 0.7 * F.kendall_rank_loss(
        S, R, gap=0.3, window=2, hard_k=3
    )
    assert float(out.total.detach()) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("family,missing", [("cusa", "teacher_image"), ("listwise", "caption_group_emb")])
def test_family_without_its_inputs_fails_at_construction(family, missing):
    fam = methods.build(family, **({"relevance": "teacher"} if family == "listwise" else {}))
    with pytest.raises(ValueError, match=missing):
        fam.check_inputs({"image_uni", "text_uni"})


@pytest.mark.parametrize("family", ["infonce", "triplet", "listwise", "bcls", "cusa"])
def test_every_family_builds_from_config_and_backpropagates(family):
    teachers = {"image": "synthetic:attributes", "text": "synthetic:attributes"} if family == "cusa" else {}
    cfg = ExperimentConfig.model_validate({"loss": {"family": family}, "teachers": teachers})
    fam = build_loss(cfg).double()
    b = make_batch()
    b.image_emb.requires_grad_(True)
    out = fam(b)
    out.total.backward()
    assert torch.isfinite(out.total) and b.image_emb.grad is not None and b.image_emb.grad.abs().sum() > 0
    assert set(out.terms) and all(torch.isfinite(v) for v in out.terms.values())
    # permuting the batch leaves the loss unchanged
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    pb = EmbeddingBatch(
        **{
            k: (v[perm][:, perm] if k == "relevance" else v[perm]) if torch.is_tensor(v) else v
            for k, v in vars(b).items()
        }
    )
    pb.image_emb = pb.image_emb.detach()
    assert float(fam(pb).total.detach()) == pytest.approx(float(out.total.detach()), rel=1e-9, abs=1e-12)
