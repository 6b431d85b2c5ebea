"""Build a ``methods`` loss family from its validated config section (the only place the two meet)."""

from __future__ import annotations

from torch import nn

import methods
from orchestrator.config import ExperimentConfig


def build_loss(cfg: ExperimentConfig) -> nn.Module:
    """The registered family ``cfg.loss.family``, its constructor given the section's fields by name
    (``LossSection.family_kwargs``: nested sections as mappings, experiment-dependent values resolved)."""
    return methods.build(cfg.loss.family, **cfg.loss.family_kwargs(cfg))
