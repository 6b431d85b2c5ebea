"""Build a ``methods`` loss family from its validated config section (the only place the two meet)."""
from __future__ import annotations

from torch import nn

import methods
from orchestrator.config import InfoNCELoss, TripletLoss


def build_loss(cfg: InfoNCELoss | TripletLoss) -> nn.Module:
    """The registered family ``cfg.family`` with the config's parameters."""
    if isinstance(cfg, InfoNCELoss):
        t = cfg.temperature
        return methods.build("infonce", tau_init=t.init, tau_min=t.min, tau_max=t.max, learnable=t.learnable,
                             reduction=cfg.reduction, multi_positive=cfg.multi_positive)
    if isinstance(cfg, TripletLoss):
        return methods.build("triplet", margin=cfg.margin, mining=cfg.mining,
                             soft_negative_tau=cfg.soft_negative_tau, selhn_eps=cfg.selhn_eps,
                             multi_positive=cfg.multi_positive)
    raise TypeError(f"no builder for loss config {type(cfg).__name__}")
