"""Loss families: small modules that own their temperatures and turn an ``EmbeddingBatch`` into a ``LossOutput``.

A family's constructor arguments are named like the fields of its config section (``orchestrator.config``'s
``loss`` sections), so the orchestrator builds one by ``methods.build(family, **section_fields)``. A temperature is
given as a mapping ``{init, min, max, learnable}`` (:data:`TemperatureSpec`: the config's temperature fields).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, TypedDict

import torch
from torch import nn

from methods import functional as F
from methods import row_losses as rows
from methods.batch import EmbeddingBatch, LossOutput
from methods.registry import register
from methods.temperature import Temperature, TemperatureSpec, build_temperature, temperature_spec

#: InfoNCE's temperature (CUSA's released clamp)
ITR_TEMPERATURE = temperature_spec(0.05, 0.01, 0.10)
#: CUSA's soft-label temperatures (released code): cross-modal CSA, and uni-modal USA on each side
CSA_TEMPERATURE = temperature_spec(0.45, 0.10, 0.99)
USA_TEMPERATURE = temperature_spec(0.45, 0.10, 1.00)


class LossFamily(nn.Module):
    """Base: ``requires`` lists the optional ``EmbeddingBatch`` inputs the family needs; ``TERMS`` (or
    ``logged_terms`` where they depend on the parameters) the keys of ``LossOutput.terms`` that ``forward``
    returns, which the training loop logs as ``train/<term>`` -- the metric catalogue reads them from here.

    ``multi_positive`` (every family's flag): the other captions of a pair's image are positives too."""

    #: set by :func:`methods.registry.register`
    family_name: ClassVar[str]
    #: a class default that a family may replace per instance, where its parameters decide the inputs
    requires: frozenset[str] = frozenset()
    TERMS: ClassVar[tuple[str, ...]] = ()
    #: ``forward`` takes ``EmbeddingBatch.query_rows`` (``scaling.local_loss``): each rank computes the terms of
    #: its own query rows, normalised so that the mean over ranks is the global loss (``methods.row_losses``).
    supports_local_loss: ClassVar[bool] = False

    def __init__(self, multi_positive: bool = True) -> None:
        super().__init__()
        self.multi_positive = multi_positive

    @property
    def supports_multi_positive(self) -> bool:
        """Whether a batch may hold several captions of one image."""
        return self.multi_positive

    def logged_terms(self) -> tuple[str, ...]:
        """The names of the terms every ``forward`` of this module returns (``LossOutput.terms`` keys)."""
        return self.TERMS

    def check_inputs(self, available: set[str]) -> None:
        """Fail early (at construction time, before any epoch) when the batch will lack an input."""
        missing = sorted(self.requires - available)
        if missing:
            raise ValueError(f"loss family {self.family_name!r} needs batch inputs {missing}")

    def _given(self, value: torch.Tensor | None, name: str) -> torch.Tensor:
        """``value``, the batch input ``name`` that this family requires; ValueError where the batch lacks it
        (a batch built without :meth:`check_inputs`'s inputs)."""
        if value is None:
            raise ValueError(f"loss family {type(self).__name__} needs batch input {name!r}; this batch has none")
        return value

    def temperatures(self) -> dict[str, float]:
        """Current value of every temperature this family owns (for logging)."""
        return {name: float(mod.value.detach()) for name, mod in self.named_modules() if isinstance(mod, Temperature)}


@register("infonce")
class InfoNCE(LossFamily):
    """Multi-positive InfoNCE (CUSA's L_itr): targets = every caption of the same image, learnable clamped tau."""

    TERMS = ("infonce",)
    supports_local_loss = True

    def __init__(
        self, temperature: TemperatureSpec = ITR_TEMPERATURE, reduction: str = "sum", multi_positive: bool = True
    ) -> None:
        super().__init__(multi_positive)
        self.tau = build_temperature(temperature)
        self.reduction = reduction

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        if batch.query_rows is not None:
            S_i2t, S_t2i = batch.query_similarities()
            loss = F.infonce_rows(
                S_i2t,
                S_t2i,
                self.tau(),
                batch.query_positives(self.multi_positive),
                reduction=self.reduction,
                validate=False,
            )  # each row holds its own pair
            return LossOutput(total=loss, terms={"infonce": loss.detach()})
        positives = batch.positives() if self.multi_positive else None
        # positives from the ids hold the diagonal: no check (a host sync per step)
        loss = F.infonce(batch.similarity(), self.tau(), positives=positives, reduction=self.reduction, validate=False)
        return LossOutput(total=loss, terms={"infonce": loss.detach()})


@register("triplet")
class Triplet(LossFamily):
    """Bidirectional triplet ranking loss; ``mining``: hardest (VSE++), soft_negative (Triplet-SN) or selhn."""

    supports_local_loss = True

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "hardest",
        soft_negative_tau: float = 0.05,
        selhn_eps: float = F.SELHN_DEFAULT_EPS,
        multi_positive: bool = True,
    ) -> None:
        super().__init__(multi_positive)
        if mining not in {"hardest", "soft_negative", "selhn"}:
            raise ValueError(f"unknown triplet mining {mining!r}")
        self.margin = margin
        self.mining = mining
        self.soft_negative_tau = soft_negative_tau
        self.selhn_eps = selhn_eps

    def logged_terms(self) -> tuple[str, ...]:
        return (f"triplet_{self.mining}",)

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        loss = _pair_term(self, batch, *batch.query_similarities())
        return LossOutput(total=loss, terms={f"triplet_{self.mining}": loss.detach()})


class _PairTermSettings(Protocol):
    """What :func:`_pair_term` reads of a family (Triplet, Listwise, BCLS)."""

    multi_positive: bool
    margin: float
    mining: str
    soft_negative_tau: float
    selhn_eps: float


def _pair_term(fam: _PairTermSettings, batch: EmbeddingBatch, S_i2t: torch.Tensor, S_t2i: torch.Tensor) -> torch.Tensor:
    """The triplet term of ``fam`` (its margin, mining, multi_positive, soft_negative_tau, selhn_eps): on the
    square S = S_i2t (= S_t2i.T) without ``query_rows``, else on the query rows (``methods.row_losses``)."""
    if batch.query_rows is None:
        positives = batch.positives() if fam.multi_positive else None
        return _triplet(S_i2t, fam.margin, fam.mining, positives, fam.soft_negative_tau, fam.selhn_eps)
    positives = batch.query_positives() if fam.multi_positive else None
    return rows.triplet_rows(
        S_i2t,
        S_t2i,
        batch.query_columns(),
        fam.margin,
        fam.mining,
        positives,
        tau=fam.soft_negative_tau,
        eps=fam.selhn_eps,
    )


def _triplet(S: torch.Tensor, margin: float, mining: str, positives, sn_tau: float, eps: float) -> torch.Tensor:
    if mining == "hardest":
        return F.triplet_hardest(S, margin, positives=positives)
    if mining == "soft_negative":
        return F.triplet_soft_negative(S, margin, tau=sn_tau, positives=positives)
    if mining == "selhn":
        return F.triplet_selhn(S, margin, eps=eps, positives=positives)
    raise ValueError(f"unknown triplet mining {mining!r}")


_RELEVANCE_INPUTS = {
    "exact": frozenset({"relevance"}),
    "teacher": frozenset({"caption_group_emb", "caption_group_mask", "text_caption_emb"}),
}


class _RelevanceFamily(LossFamily):
    """Shared by the families that score graded relevance R (rows = images, columns = texts)."""

    relevance_source: str
    rescale: bool
    #: set by each subclass's constructor
    t2i_relevance: str

    def _setup_relevance(self, relevance: str, rescale: bool) -> None:
        if relevance not in _RELEVANCE_INPUTS:
            raise ValueError(f"relevance must be 'exact' or 'teacher', not {relevance!r}")
        self.relevance_source = relevance
        self.rescale = rescale
        self.requires = _RELEVANCE_INPUTS[relevance]

    def relevance(self, batch: EmbeddingBatch) -> torch.Tensor:
        """R: (B, B). Exact relevance from the data (diagonal forced to 1), or RSC from caption embeddings."""
        if self.relevance_source == "exact":
            R = self._given(batch.relevance, "relevance").to(batch.image_emb.dtype).clone()
            R.fill_diagonal_(1.0)
            return R
        # every group holds the pair's own caption (orchestrator.data.loader.caption_groups): no check, no sync
        return F.caption_relevance(
            self._given(batch.caption_group_emb, "caption_group_emb"),
            self._given(batch.text_caption_emb, "text_caption_emb"),
            batch.caption_group_mask,
            rescale=self.rescale,
            validate=False,
        ).to(batch.image_emb.dtype)

    def relevance_lists(self, batch: EmbeddingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_i2t, R_t2i)``, both (Q, N), the relevance rows of the query lists (``batch.query_rows``), as
        :mod:`methods.row_losses` takes them (``t2i_relevance`` decides R_t2i); nothing (N, N) is built."""
        own = batch.query_columns()
        if self.relevance_source == "exact":
            R_i2t, R_t2i = rows.relevance_lists(self._given(batch.relevance, "relevance"), own, self.t2i_relevance)
        else:
            R_i2t, R_t2i = rows.caption_relevance_rows(
                self._given(batch.caption_group_emb, "caption_group_emb"),
                self._given(batch.text_caption_emb, "text_caption_emb"),
                own,
                batch.caption_group_mask,
                self.rescale,
                self.t2i_relevance,
            )
        dtype = batch.image_emb.dtype
        return R_i2t.to(dtype), R_t2i.to(dtype)


@register("listwise")
class Listwise(_RelevanceFamily):
    """Listwise ITR: (1 − λ)·triplet + λ·S-NDCG with relevance from RSC (docs/methods.md §B.3)."""

    TERMS = ("triplet", "sndcg", "relevance_mean")
    supports_local_loss = True

    def __init__(
        self,
        weight: float = 0.5,
        tau: float = 0.01,
        margin: float = 0.2,
        mining: str = "hardest",
        t2i_relevance: str = "transpose",
        relevance: str = "teacher",
        rescale: bool = True,
        chunk_size: int | None = None,
        multi_positive: bool = True,
        soft_negative_tau: float = 0.05,
        selhn_eps: float = F.SELHN_DEFAULT_EPS,
        kernel: str = "auto",
    ) -> None:
        super().__init__(multi_positive)
        if not 0 < weight < 1:
            raise ValueError(f"listwise weight must be in (0, 1), got {weight}")
        self.weight, self.tau, self.margin, self.mining = weight, tau, margin, mining
        self.t2i_relevance, self.chunk_size = t2i_relevance, chunk_size
        F.check_kernel(kernel)  # at construction, not at the first step
        self.kernel = kernel
        self.soft_negative_tau, self.selhn_eps = soft_negative_tau, selhn_eps
        self._setup_relevance(relevance, rescale)

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        S_i2t, S_t2i = batch.query_similarities()
        pair = _pair_term(self, batch, S_i2t, S_t2i)
        if batch.query_rows is None:
            R = self.relevance(batch)
            ndcg = F.smooth_ndcg_loss(
                S_i2t, R, tau=self.tau, t2i_relevance=self.t2i_relevance, chunk_size=self.chunk_size, kernel=self.kernel
            )
        else:  # the query rows' lists only (a mean over rows: the ranks' mean is the global loss)
            R, R_t2i = self.relevance_lists(batch)
            ndcg = rows.smooth_ndcg_rows(
                S_i2t, S_t2i, R, R_t2i, tau=self.tau, chunk_size=self.chunk_size, kernel=self.kernel
            )
        pair_w, list_w = (1 - self.weight) * pair, self.weight * ndcg
        return LossOutput(
            total=pair_w + list_w,
            terms={"triplet": pair_w.detach(), "sndcg": list_w.detach(), "relevance_mean": R.detach().mean()},
        )  # local: this rank's rows


class _KendallOptions(TypedDict):
    """The Kendall term's keyword arguments shared by ``F.kendall_rank_loss`` and ``rows.kendall_rows``."""

    gap: float
    surrogate: str
    window: int | None
    hard_k: int | None
    temperature: float
    chunk_size: int | None
    kernel: str


@register("bcls")
class BCLS(_RelevanceFamily):
    """BCLS: Triplet-SN + λ·Kendall ranking loss with SW-HS (docs/methods.md §A; Triplet-SN/SW-HS are reconstructions).

    With ``query_rows`` the Kendall normaliser (valid pairs of every query) is summed over the ranks
    (``EmbeddingBatch.sum_over_ranks``: one all-reduce of two integers per step)."""

    supports_local_loss = True

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "soft_negative",
        soft_negative_tau: float = 0.05,
        kendall_weight: float = 1.0,
        gap: float = 0.3,
        surrogate: str = "hinge",
        surrogate_temperature: float = 0.1,
        window: int | None = 16,
        hard_k: int | None = None,
        t2i_relevance: str = "transpose",
        relevance: str = "teacher",
        rescale: bool = False,
        chunk_size: int | None = None,
        multi_positive: bool = True,
        selhn_eps: float = F.SELHN_DEFAULT_EPS,
        kernel: str = "auto",
    ) -> None:
        super().__init__(multi_positive)
        self.margin, self.mining, self.soft_negative_tau, self.selhn_eps = margin, mining, soft_negative_tau, selhn_eps
        self.kendall_weight, self.gap, self.surrogate = kendall_weight, gap, surrogate
        self.surrogate_temperature, self.window, self.hard_k = surrogate_temperature, window, hard_k
        self.t2i_relevance, self.chunk_size = t2i_relevance, chunk_size
        F.check_kernel(kernel)  # at construction, not at the first step
        self.kernel = kernel
        self._setup_relevance(relevance, rescale)

    def logged_terms(self) -> tuple[str, ...]:
        return (f"triplet_{self.mining}", "kendall")

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        S_i2t, S_t2i = batch.query_similarities()
        binary = _pair_term(self, batch, S_i2t, S_t2i)
        options = _KendallOptions(
            gap=self.gap,
            surrogate=self.surrogate,
            window=self.window,
            hard_k=self.hard_k,
            temperature=self.surrogate_temperature,
            chunk_size=self.chunk_size,
            kernel=self.kernel,
        )
        if batch.query_rows is None:
            kendall = F.kendall_rank_loss(S_i2t, self.relevance(batch), t2i_relevance=self.t2i_relevance, **options)
        else:
            R_i2t, R_t2i = self.relevance_lists(batch)
            kendall = rows.kendall_rows(S_i2t, S_t2i, R_i2t, R_t2i, batch.sum_over_ranks, **options)
        kendall = self.kendall_weight * kendall
        return LossOutput(
            total=binary + kendall, terms={f"triplet_{self.mining}": binary.detach(), "kendall": kendall.detach()}
        )


@register("cusa")
class CUSA(LossFamily):
    """CUSA: InfoNCE + α·CSA + β·USA (docs/methods.md §C.2).

    Teacher similarities are cosines of per-sample teacher features.

    CSA ``each``: i2t target softmax(G^I/τ_s), t2i target softmax(G^T/τ_s), one shared learnable τ_c.
    ``add``: both directions use (G^I + G^T)/2; ``dot``: sqrt(relu(G^I)·relu(G^T)).
    USA: KL(softmax(G^I/τ_s) ‖ softmax(S^II/τ_ui)) and the text analogue, on the uni-modal heads.
    Every term is a mean over query rows (both directions), so it takes ``query_rows`` (local loss).
    """

    supports_local_loss = True

    def __init__(
        self,
        temperature: TemperatureSpec = ITR_TEMPERATURE,
        reduction: str = "class_mean",
        alpha: float = 0.1,
        beta: float = 0.5,
        csa_temperature: TemperatureSpec = CSA_TEMPERATURE,
        usa_image_temperature: TemperatureSpec = USA_TEMPERATURE,
        usa_text_temperature: TemperatureSpec = USA_TEMPERATURE,
        teacher_temperature: float = 1.0,
        csa_mode: str = "each",
        multi_positive: bool = True,
    ) -> None:
        super().__init__(multi_positive)
        if csa_mode not in {"each", "add", "dot"}:
            raise ValueError(f"unknown csa_mode {csa_mode!r}")
        # the modules keep their short names: checkpoints' state_dict keys and the logged temperatures
        self.tau = build_temperature(temperature)
        self.csa_tau = build_temperature(csa_temperature)
        self.usa_image_tau = build_temperature(usa_image_temperature)
        self.usa_text_tau = build_temperature(usa_text_temperature)
        self.reduction, self.alpha, self.beta = reduction, alpha, beta
        self.teacher_temperature, self.csa_mode = teacher_temperature, csa_mode
        needs = set()
        if alpha > 0 or beta > 0:
            needs |= {"teacher_image", "teacher_text"}
        if beta > 0:
            needs |= {"image_uni", "text_uni"}
        self.requires = frozenset(needs)

    def logged_terms(self) -> tuple[str, ...]:
        """``infonce``, plus ``csa`` when alpha > 0 and ``usa`` when beta > 0."""
        return ("infonce",) + (("csa",) if self.alpha > 0 else ()) + (("usa",) if self.beta > 0 else ())

    @staticmethod
    def _cos(batch: EmbeddingBatch, x: torch.Tensor) -> torch.Tensor:
        """(Q, B) cosines of the query rows of ``x`` with all its rows ((B, B) without ``query_rows``)."""
        x = torch.nn.functional.normalize(x, dim=-1)
        return batch.rows(x) @ x.T

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        # S_i2t: query images x all texts; S_t2i: query texts x all images ((S, S.T) without query_rows)
        S_i2t, S_t2i = batch.query_similarities()
        if batch.query_rows is None:
            positives = batch.positives() if self.multi_positive else None
            itr = F.infonce(S_i2t, self.tau(), positives=positives, reduction=self.reduction, validate=False)
        else:  # positives from the ids hold each pair itself: no check (a host sync per step)
            itr = F.infonce_rows(
                S_i2t,
                S_t2i,
                self.tau(),
                batch.query_positives(self.multi_positive),
                reduction=self.reduction,
                validate=False,
            )
        total, terms = itr, {"infonce": itr.detach()}
        if self.alpha > 0 or self.beta > 0:
            G_img = self._cos(batch, self._given(batch.teacher_image, "teacher_image"))
            G_txt = self._cos(batch, self._given(batch.teacher_text, "teacher_text"))
        if self.alpha > 0:
            if self.csa_mode == "each":
                target_i2t, target_t2i = G_img, G_txt
            elif self.csa_mode == "add":
                target_i2t = target_t2i = (G_img + G_txt) / 2
            else:
                target_i2t = target_t2i = torch.sqrt(G_img.clamp_min(0) * G_txt.clamp_min(0))
            tau_c = self.csa_tau()
            csa = (
                self.alpha
                * (
                    F.soft_label_kl(S_i2t, target_i2t, tau_c, self.teacher_temperature)
                    + F.soft_label_kl(S_t2i, target_t2i, tau_c, self.teacher_temperature)
                )
                / 2
            )
            total = total + csa
            terms["csa"] = csa.detach()
        if self.beta > 0:
            image_uni = self._given(batch.image_uni, "image_uni")
            text_uni = self._given(batch.text_uni, "text_uni")
            S_ii = batch.rows(image_uni) @ image_uni.T
            S_tt = batch.rows(text_uni) @ text_uni.T
            usa = (
                self.beta
                * (
                    F.soft_label_kl(S_ii, G_img, self.usa_image_tau(), self.teacher_temperature)
                    + F.soft_label_kl(S_tt, G_txt, self.usa_text_tau(), self.teacher_temperature)
                )
                / 2
            )
            total = total + usa
            terms["usa"] = usa.detach()
        return LossOutput(total=total, terms=terms)
