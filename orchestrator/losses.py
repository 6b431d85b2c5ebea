"""Build a ``methods`` loss family from its validated config section (the only place the two meet)."""
from __future__ import annotations

from torch import nn

import methods
from orchestrator.config import BCLSLoss, CUSALoss, ExperimentConfig, InfoNCELoss, ListwiseLoss, TripletLoss


def _tau(t) -> tuple[float, float, float, bool]:
    return (t.init, t.min, t.max, t.learnable)


def build_loss(cfg: ExperimentConfig) -> nn.Module:
    """The registered family ``cfg.loss.family`` with the config's parameters."""
    loss = cfg.loss
    if isinstance(loss, InfoNCELoss):
        t = loss.temperature
        return methods.build("infonce", tau_init=t.init, tau_min=t.min, tau_max=t.max, learnable=t.learnable,
                             reduction=loss.reduction, multi_positive=loss.multi_positive)
    if isinstance(loss, TripletLoss):
        return methods.build("triplet", margin=loss.margin, mining=loss.mining,
                             soft_negative_tau=loss.soft_negative_tau, selhn_eps=loss.selhn_eps,
                             multi_positive=loss.multi_positive)
    if isinstance(loss, ListwiseLoss):
        return methods.build("listwise", weight=loss.weight, tau=loss.tau, margin=loss.margin, mining=loss.mining,
                             t2i_relevance=loss.t2i_relevance, relevance=cfg.relevance_source, rescale=loss.rescale,
                             chunk_size=loss.chunk_size, kernel=loss.kernel, multi_positive=loss.multi_positive)
    if isinstance(loss, BCLSLoss):
        return methods.build("bcls", margin=loss.margin, mining=loss.mining,
                             soft_negative_tau=loss.soft_negative_tau, kendall_weight=loss.kendall_weight,
                             gap=loss.gap, surrogate=loss.surrogate, surrogate_temperature=loss.surrogate_temperature,
                             window=loss.window, hard_k=loss.hard_k, t2i_relevance=loss.t2i_relevance,
                             relevance=cfg.relevance_source, rescale=loss.rescale, chunk_size=loss.chunk_size,
                             kernel=loss.kernel, multi_positive=loss.multi_positive)
    if isinstance(loss, CUSALoss):
        t = loss.temperature
        return methods.build("cusa", tau_init=t.init, tau_min=t.min, tau_max=t.max, tau_learnable=t.learnable,
                             reduction=loss.reduction, alpha=loss.alpha, beta=loss.beta,
                             csa_tau=_tau(loss.csa_temperature), usa_image_tau=_tau(loss.usa_image_temperature),
                             usa_text_tau=_tau(loss.usa_text_temperature), teacher_tau=loss.teacher_temperature,
                             csa_mode=loss.csa_mode, multi_positive=loss.multi_positive)
    raise TypeError(f"no builder for loss config {type(loss).__name__}")
