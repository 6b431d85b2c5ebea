"""What the project calls on a student model, as protocols.

open_clip ships no type information, so a type checker sees its models (and every value typed ``nn.Module``)
without ``encode_image`` / ``encode_text``. Code that takes any ``nn.Module`` narrows it with ``isinstance`` against
these runtime-checkable protocols (which only check that the methods exist) and raises :func:`not_a_dual_encoder`
otherwise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DualEncoder(Protocol):
    """Encodes images (B, 3, H, W) and tokens (B, L) to (B, D) embeddings, L2-normalised with ``normalize``:
    open_clip's ``CLIP`` / ``CustomTextCLIP``, :class:`~orchestrator.models.heads.HeadedDualEncoder` and
    :class:`~orchestrator.models.locked_towers.LockedTowerModel`."""

    def encode_image(self, image: torch.Tensor, /, normalize: bool = ...) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, /, normalize: bool = ...) -> torch.Tensor: ...


@runtime_checkable
class OpenClipModel(DualEncoder, Protocol):
    """open_clip's ``CLIP`` / ``CustomTextCLIP`` as this project uses them: the image tower ``visual`` and the
    LiT locks (signatures as open_clip defines them)."""

    visual: nn.Module

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None: ...

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None: ...


def not_a_dual_encoder(model: object, needs: type = DualEncoder) -> TypeError:
    """The error for a ``model`` that lacks what protocol ``needs`` lists."""
    return TypeError(f"{type(model).__name__} is not a {needs.__name__} (see orchestrator.models.encoder)")


__all__ = ["DualEncoder", "OpenClipModel", "not_a_dual_encoder"]
