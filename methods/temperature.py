"""A softmax temperature owned by a loss family: learnable or fixed, clamped before every forward pass."""

from __future__ import annotations

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
