"""CUSA's extra projectors: LayerNorm + Linear heads on top of the student's embeddings, one per modality.

The cross-modal heads feed InfoNCE, CSA and retrieval; the uni-modal heads feed only USA and the uni-modal
evaluations (docs/methods.md §C.1). Linear weights ~ N(0, 0.02²), biases at PyTorch's default init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.encoder import OpenClipModel, not_a_dual_encoder


def projector(dim: int) -> nn.Sequential:
    """LayerNorm(dim) -> Linear(dim, dim) with N(0, 0.02²) weights."""
    linear = nn.Linear(dim, dim)
    nn.init.normal_(linear.weight, std=0.02)
    return nn.Sequential(nn.LayerNorm(dim), linear)


class HeadedDualEncoder(nn.Module):
    """An open_clip model with cross-modal (and optionally uni-modal) projector heads.

    ``forward(images (B,3,H,W), tokens (B,L))`` returns a dict of L2-normalised (B, D) tensors:
    ``image_features``/``text_features`` (cross-modal heads) and, with ``uni=True``, ``image_uni``/``text_uni``.
    ``encode_image``/``encode_text`` use the cross-modal heads (retrieval evaluation); pass
    ``uni_modal=True`` for the uni-modal heads (image retrieval, STS).
    """

    def __init__(self, base: nn.Module, dim: int, uni: bool = True) -> None:
        super().__init__()
        if not isinstance(base, OpenClipModel):
            raise not_a_dual_encoder(base, OpenClipModel)
        self.base = base
        self.cross_image = projector(dim)
        self.cross_text = projector(dim)
        self.uni = uni
        if uni:
            self.uni_image = projector(dim)
            self.uni_text = projector(dim)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        self.base.lock_image_tower(unlocked_groups, freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        self.base.lock_text_tower(unlocked_layers, freeze_layer_norm)

    def _image_head(self, uni_modal: bool) -> nn.Module:
        return self.uni_image if uni_modal else self.cross_image

    def _text_head(self, uni_modal: bool) -> nn.Module:
        return self.uni_text if uni_modal else self.cross_text

    def encode_image(self, images: torch.Tensor, normalize: bool = True, uni_modal: bool = False) -> torch.Tensor:
        out = self._image_head(uni_modal)(self.base.encode_image(images, normalize=False))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, uni_modal: bool = False) -> torch.Tensor:
        out = self._text_head(uni_modal)(self.base.encode_text(tokens, normalize=False))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.project(
            self.base.encode_image(images, normalize=False), self.base.encode_text(tokens, normalize=False)
        )

    def project(self, img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads on the base towers' unnormalised outputs ``img``/``txt`` (B, D): ``forward``'s dict."""
        out = {
            "image_features": F.normalize(self.cross_image(img), dim=-1),
            "text_features": F.normalize(self.cross_text(txt), dim=-1),
        }
        if self.uni:
            out["image_uni"] = F.normalize(self.uni_image(img), dim=-1)
            out["text_uni"] = F.normalize(self.uni_text(txt), dim=-1)
        return out
