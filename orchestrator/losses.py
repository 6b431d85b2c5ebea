"""Build a ``methods`` loss family from its validated config section (the only place the two meet)."""

from __future__ import annotations

import methods
from methods.families import LossFamily
from orchestrator.config import ExperimentConfig


def build_loss(cfg: ExperimentConfig) -> LossFamily:
    """The registered family ``cfg.loss.family``, its constructor given the section's fields by name
    (``LossSection.family_kwargs``: nested sections as mappings, experiment-dependent values resolved).

    A family is a ``methods.families.LossFamily``: the loop reads its ``requires``, ``check_inputs`` and terms."""
    family = methods.build(cfg.loss.family, **cfg.loss.family_kwargs(cfg))
    if not isinstance(family, LossFamily):
        raise TypeError(f"loss family {cfg.loss.family!r} builds a {type(family).__name__}, not a LossFamily")
    return family
