"""A softmax temperature owned by a loss family: learnable or fixed, clamped before every forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn


class Temperature(nn.Module):
    """A scalar temperature, initialised at ``init`` and clamped in place to [``low``, ``high``] on each call.

    The clamp is the released CUSA form (``with torch.no_grad(): temp.clamp_(low, high)``); the parameter is
    the temperature itself, not its logarithm.
    """

    def __init__(self, init: float, low: float, high: float, learnable: bool = True) -> None:
        super().__init__()
        if not 0 < low <= init <= high:
            raise ValueError(f"temperature init {init} outside [{low}, {high}]")
        self.low, self.high = float(low), float(high)
        self.value = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            self.value.clamp_(self.low, self.high)
        return self.value

    def extra_repr(self) -> str:
        return f"value={self.value.item():.4g}, range=[{self.low}, {self.high}]"


#: a temperature's settings: ``init``, ``min``, ``max`` (floats, 0 < min <= init <= max) and ``learnable``
#: (optional, default True)
TemperatureSpec = Mapping[str, Any]
_TEMPERATURE_KEYS = frozenset({"init", "min", "max", "learnable"})


def temperature_spec(init: float, min: float, max: float, learnable: bool = True) -> TemperatureSpec:
    """A read-only :data:`TemperatureSpec` (the families' defaults)."""
    return MappingProxyType({"init": init, "min": min, "max": max, "learnable": learnable})


def build_temperature(spec: TemperatureSpec) -> Temperature:
    """The :class:`Temperature` of ``spec``; ValueError naming a missing or unknown key."""
    missing, unknown = {"init", "min", "max"} - set(spec), set(spec) - _TEMPERATURE_KEYS
    if missing or unknown:
        raise ValueError(
            f"a temperature is {{init, min, max, learnable}}; missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    return Temperature(spec["init"], spec["min"], spec["max"], spec.get("learnable", True))
