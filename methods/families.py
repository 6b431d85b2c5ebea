"""Loss families: small modules that own their temperatures and turn an ``EmbeddingBatch`` into a ``LossOutput``."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from methods import functional as F
from methods.batch import EmbeddingBatch, LossOutput
from methods.registry import register
from methods.temperature import Temperature


class LossFamily(nn.Module):
    """Base: ``requires`` lists the optional ``EmbeddingBatch`` inputs the family needs."""

    requires: ClassVar[frozenset[str]] = frozenset()
    supports_multi_positive: bool = True

    def check_inputs(self, available: set[str]) -> None:
        """Fail early (at construction time, before any epoch) when the batch will lack an input."""
        missing = sorted(self.requires - available)
        if missing:
            raise ValueError(f"loss family {self.family_name!r} needs batch inputs {missing}")  # type: ignore[attr-defined]

    def temperatures(self) -> dict[str, float]:
        """Current value of every temperature this family owns (for logging)."""
        return {name: float(mod.value.detach()) for name, mod in self.named_modules() if isinstance(mod, Temperature)}


@register("infonce")
class InfoNCE(LossFamily):
    """Multi-positive InfoNCE (CUSA's L_itr): targets = every caption of the same image, learnable clamped tau."""

    def __init__(self, tau_init: float = 0.05, tau_min: float = 0.01, tau_max: float = 0.10, learnable: bool = True,
                 reduction: str = "sum", multi_positive: bool = True) -> None:
        super().__init__()
        self.tau = Temperature(tau_init, tau_min, tau_max, learnable)
        self.reduction = reduction
        self.multi_positive = multi_positive
        self.supports_multi_positive = multi_positive

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        positives = batch.positives() if self.multi_positive else None
        loss = F.infonce(batch.similarity(), self.tau(), positives=positives, reduction=self.reduction)
        return LossOutput(total=loss, terms={"infonce": loss.detach()})


@register("triplet")
class Triplet(LossFamily):
    """Bidirectional triplet ranking loss; ``mining``: hardest (VSE++), soft_negative (Triplet-SN) or selhn."""

    def __init__(self, margin: float = 0.2, mining: str = "hardest", soft_negative_tau: float = 0.05,
                 selhn_eps: float = 0.1, multi_positive: bool = True) -> None:
        super().__init__()
        if mining not in {"hardest", "soft_negative", "selhn"}:
            raise ValueError(f"unknown triplet mining {mining!r}")
        self.margin = margin
        self.mining = mining
        self.soft_negative_tau = soft_negative_tau
        self.selhn_eps = selhn_eps
        self.multi_positive = multi_positive
        self.supports_multi_positive = multi_positive

    def forward(self, batch: EmbeddingBatch) -> LossOutput:
        S = batch.similarity()
        positives = batch.positives() if self.multi_positive else None
        if self.mining == "hardest":
            loss = F.triplet_hardest(S, self.margin, positives=positives)
        elif self.mining == "soft_negative":
            loss = F.triplet_soft_negative(S, self.margin, tau=self.soft_negative_tau, positives=positives)
        else:
            loss = F.triplet_selhn(S, self.margin, eps=self.selhn_eps, positives=positives)
        return LossOutput(total=loss, terms={f"triplet_{self.mining}": loss.detach()})
