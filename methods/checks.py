"""Argument checks shared by the square losses (:mod:`methods.functional`) and their query-row forms
(:mod:`methods.row_losses`). Each raises ValueError naming the argument; none syncs with the device beyond
reading a 0-d temperature. Imports torch only.
"""

from __future__ import annotations

import math

import torch

from methods.dispatch import check_kernel

#: A temperature: a float, or a 0-d tensor that may receive a gradient (learnable).
TensorOrFloat = torch.Tensor | float

#: Surrogates of the Kendall discordance indicator (``methods.kendall_direction.penalty``).
SURROGATES = ("hinge", "tanh", "sigmoid")

#: How the t2i lists read the relevance: ``transpose`` (correct) or ``as_released`` (the released code's R).
T2I_OPTIONS = ("transpose", "as_released")


def check_square(S: torch.Tensor, name: str = "S") -> int:
    """B of a square (B, B) matrix S; ValueError otherwise."""
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square (B, B) matrix, got shape {tuple(S.shape)}")
    return int(S.shape[0])


def check_same_shape(S: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """ValueError unless ``other`` (called ``name``) has the shape of S."""
    if tuple(other.shape) != tuple(S.shape):
        raise ValueError(f"{name} must have the shape of S {tuple(S.shape)}, got {tuple(other.shape)}")


def check_t2i(t2i_relevance: str) -> None:
    """ValueError unless ``t2i_relevance`` is one of :data:`T2I_OPTIONS`."""
    if t2i_relevance not in T2I_OPTIONS:
        raise ValueError(f"t2i_relevance must be one of {T2I_OPTIONS}, got {t2i_relevance!r}")


def positive_float(x: TensorOrFloat, name: str) -> float:
    """``x`` (a float or 0-d tensor) as a float; ValueError unless finite and > 0."""
    value = float(x.detach().item()) if isinstance(x, torch.Tensor) else float(x)
    if not value > 0.0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def kendall_options(
    gap: float, surrogate: str, window: int | None, hard_k: int | None, temperature: float, kernel: str
) -> tuple[float, float]:
    """Check the Kendall options (ValueError); returns ``(gap, temperature)`` as floats."""
    check_kernel(kernel)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    gap_f = float(gap)
    if not gap_f >= 0.0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    temp_f = positive_float(temperature, "temperature")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if hard_k is not None and int(hard_k) < 1:
        raise ValueError(f"hard_k must be >= 1 or None, got {hard_k}")
    return gap_f, temp_f


__all__ = [
    "TensorOrFloat",
    "SURROGATES",
    "T2I_OPTIONS",
    "check_kernel",
    "check_square",
    "check_same_shape",
    "check_t2i",
    "positive_float",
    "kendall_options",
]
