"""Locked towers split into a frozen prefix (run once, cacheable) and a trainable suffix (run every step).

LiT-style training locks a pretrained tower (``model.lock_image`` / ``model.lock_text``). Only what follows the
locked part learns, so when the tower's input is deterministic (our preprocessing has no augmentation) the
prefix's outputs can be computed once per split and reused for every epoch and every trial
(:mod:`orchestrator.models.tower_cache`). An epoch then costs only the suffix.

The split, per open_clip tower (what ``lock_image_tower(0)`` / ``lock_text_tower(0)`` freeze):

* image, timm trunk (``TimmModel``): prefix = ``visual.trunk`` (pooled features), suffix = ``visual.head``;
* image, any other tower that the lock froze entirely (ViT, ResNet): prefix = ``visual``, suffix = identity;
* text, Hugging Face tower (``HFTextEncoder``): prefix = transformer + pooler, suffix = ``text.proj``;
* text, open_clip's own text transformer frozen entirely: prefix = ``encode_text``, suffix = identity.

A locked prefix always runs in eval mode and without gradients (no dropout, frozen BatchNorm statistics), cached or
not, so a cached run computes exactly what an uncached one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.encoder import DualEncoder, OpenClipModel, not_a_dual_encoder
from orchestrator.models.heads import HeadedDualEncoder


@dataclass(frozen=True)
class TowerSplit:
    """``prefix(x) -> (B, F)`` frozen features; ``suffix((B, F)) -> (B, D)`` the tower's unnormalised output.

    ``frozen``: the modules the prefix runs (kept in eval mode).
    """

    prefix: Callable[[torch.Tensor], torch.Tensor]
    suffix: nn.Module
    frozen: tuple[nn.Module, ...]
    kind: str


def _all_frozen(modules) -> bool:
    params = [p for m in modules for p in m.parameters()]
    return bool(params) and not any(p.requires_grad for p in params)


def base_model(model: nn.Module) -> OpenClipModel:
    """The open_clip model inside a ``HeadedDualEncoder`` (or the model itself); TypeError for a model that is not
    one."""
    base = model.base if isinstance(model, HeadedDualEncoder) else model
    if not isinstance(base, OpenClipModel):
        raise not_a_dual_encoder(base, OpenClipModel)
    return base


def split_image_tower(model: nn.Module) -> TowerSplit | None:
    """The split of a locked image tower, or ``None`` when it is not (entirely) locked."""
    visual = base_model(model).visual
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if isinstance(trunk, nn.Module) and isinstance(head, nn.Module):  # open_clip TimmModel
        if _all_frozen([trunk]):
            return TowerSplit(prefix=trunk, suffix=head, frozen=(trunk,), kind="timm-trunk")
        return None
    if _all_frozen([visual]):
        return TowerSplit(prefix=visual, suffix=nn.Identity(), frozen=(visual,), kind="whole-tower")
    return None


class _PooledHFText:
    """HFTextEncoder's forward up to (not including) ``proj``: tokens (B, L) -> pooled (B, H).

    ``transformer``, ``pooler`` and ``pad_token_id`` are the encoder's (``text.config.pad_token_id``)."""

    def __init__(self, transformer: nn.Module, pooler: nn.Module, pad_token_id: int) -> None:
        self.transformer, self.pooler, self.pad_token_id = transformer, pooler, pad_token_id

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_token_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        return self.pooler(out, mask)


class _WholeText:
    """open_clip's own text tower: tokens (B, L) -> ``encode_text`` (B, D), unnormalised."""

    def __init__(self, base: DualEncoder) -> None:
        self.base = base

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.encode_text(tokens, normalize=False)


def split_text_tower(model: nn.Module) -> TowerSplit | None:
    """The split of a locked text tower, or ``None`` when it is not (entirely) locked."""
    base = base_model(model)
    text = getattr(base, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj"):
        if _all_frozen([text.transformer]) and not any(p.requires_grad for p in text.pooler.parameters()):
            return TowerSplit(
                prefix=_PooledHFText(text.transformer, text.pooler, text.config.pad_token_id),
                suffix=text.proj,
                frozen=(text.transformer, text.pooler),
                kind="hf-pooled",
            )
        return None
    if text is not None:  # another custom text tower: cache it only when entirely frozen
        if _all_frozen([text]):
            return TowerSplit(prefix=text, suffix=nn.Identity(), frozen=(text,), kind="whole-tower")
        return None
    parts = [
        m
        for m in (
            getattr(base, "transformer", None),
            getattr(base, "token_embedding", None),
            getattr(base, "ln_final", None),
        )
        if isinstance(m, nn.Module)
    ]
    candidates = [getattr(base, n, None) for n in ("positional_embedding", "text_projection")]
    extra = [p for p in candidates if isinstance(p, nn.Parameter)]
    if parts and _all_frozen(parts) and not any(p.requires_grad for p in extra):
        return TowerSplit(prefix=_WholeText(base), suffix=nn.Identity(), frozen=tuple(parts), kind="whole-tower")
    return None


class LockedTowerModel(nn.Module):
    """A student whose locked towers run frozen (eval mode, no grad) and may take cached prefix features.

    ``forward(images, tokens)``: ``images`` is (B, 3, H, W) pixels, or (B, F_i) prefix features when
    ``image_from_features``; ``tokens`` is (B, L) token ids, or (B, F_t) prefix features when
    ``text_from_features``. Returns open_clip's output dict (L2-normalised ``image_features``/``text_features``
    (B, D), plus ``image_uni``/``text_uni`` with CUSA's uni-modal heads). ``encode_image``/``encode_text`` take the
    same inputs. The wrapped ``model`` is the one to checkpoint: its state dict is the plain student's.
    """

    def __init__(
        self,
        model: nn.Module,
        image: TowerSplit | None,
        text: TowerSplit | None,
        *,
        image_from_features: bool = False,
        text_from_features: bool = False,
    ) -> None:
        super().__init__()
        if image_from_features and image is None:
            raise ValueError("image features need a locked image tower")
        if text_from_features and text is None:
            raise ValueError("text features need a locked text tower")
        self.model = model
        # not registered as submodules: they alias modules of ``model`` (one copy of each parameter)
        self._splits = {"image": image, "text": text}
        self.image_from_features = image_from_features
        self.text_from_features = text_from_features
        self._base = base_model(model)

    def train(self, mode: bool = True) -> LockedTowerModel:
        super().train(mode)
        for split in self._splits.values():
            if split is not None:
                for module in split.frozen:
                    module.eval()
        return self

    def _tower(self, side: str, x: torch.Tensor, from_features: bool) -> torch.Tensor:
        split = self._splits[side]
        if split is None:
            encode = self._base.encode_image if side == "image" else self._base.encode_text
            return encode(x, normalize=False)
        if not from_features:
            with torch.no_grad():
                x = split.prefix(x)
        return split.suffix(x)

    def image_tower(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) unnormalised output of the image tower (``x``: pixels or prefix features)."""
        return self._tower("image", x, self.image_from_features)

    def text_tower(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) unnormalised output of the text tower (``x``: tokens or prefix features)."""
        return self._tower("text", x, self.text_from_features)

    def encode_image(self, x: torch.Tensor, normalize: bool = True, uni_modal: bool = False) -> torch.Tensor:
        out = self.image_tower(x)
        if isinstance(self.model, HeadedDualEncoder):
            out = self.model._image_head(uni_modal)(out)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, x: torch.Tensor, normalize: bool = True, uni_modal: bool = False) -> torch.Tensor:
        out = self.text_tower(x)
        if isinstance(self.model, HeadedDualEncoder):
            out = self.model._text_head(uni_modal)(out)
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        img, txt = self.image_tower(images), self.text_tower(tokens)
        if isinstance(self.model, HeadedDualEncoder):
            return self.model.project(img, txt)
        return {"image_features": F.normalize(img, dim=-1), "text_features": F.normalize(txt, dim=-1)}


def wrap_locked_towers(
    model: nn.Module, *, image_from_features: bool = False, text_from_features: bool = False
) -> nn.Module:
    """``LockedTowerModel`` around ``model`` when a tower is locked, else ``model`` itself."""
    image, text = split_image_tower(model), split_text_tower(model)
    if image is None and text is None:
        return model
    return LockedTowerModel(
        model, image, text, image_from_features=image_from_features, text_from_features=text_from_features
    )
