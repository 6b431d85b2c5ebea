"""Locked-tower outputs, computed once per split and cached exactly like teacher features.

A locked tower's prefix (:mod:`orchestrator.models.locked_towers`) is a frozen, deterministic function of its input
(open_clip's eval transform has no augmentation), so its outputs go through the teachers' content-addressed store
(:mod:`orchestrator.teachers.cache`): keyed by the tower's identity (model config, a digest of the prefix's
weights, the preprocessing or tokenizer) and by each image file / caption string. A second run, a second trial of a
sweep, a second seed: nothing is recomputed, and an epoch costs only the trainable suffix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from orchestrator.data.index import DatasetIndex
from orchestrator.models.locked_towers import TowerSplit, split_image_tower, split_text_tower
from orchestrator.teachers.encoders import TeacherEncoder
from orchestrator.teachers.extract import ExtractStats, extract_modality

if TYPE_CHECKING:
    from orchestrator.data.splits import SplitRole

log = logging.getLogger(__name__)


def _modules_digest(modules: Sequence[torch.nn.Module]) -> str:
    h = hashlib.sha256()
    for k, module in enumerate(modules):
        h.update(repr(module).encode())  # the structure too: same weights in other layers compute otherwise
        for name, tensor in module.state_dict().items():
            h.update(f"{k}.{name}\0".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LockedTowerEncoder(TeacherEncoder):
    """One locked tower's prefix as a cacheable encoder: items -> float32 (N, F), NOT normalised.

    ``modality`` ``"image"``: PIL images through the student's ``preprocess``; ``"text"``: caption strings through
    its ``tokenizer``. Runs in fp32 under ``inference_mode`` (the frozen modules are in eval mode).
    """

    cacheable: ClassVar[bool] = True

    def __init__(
        self,
        model_name: str,
        split: TowerSplit,
        modality: str,
        *,
        owner: torch.nn.Module,
        preprocess=None,
        tokenizer=None,
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        super().__init__(f"tower:{model_name}", modality, device=device, batch_size=batch_size)  # type: ignore[arg-type]
        self.inputs = "pixels" if modality == "image" else "text"  # type: ignore[misc]
        self.model_name = model_name
        self.split = split
        self.owner = owner  # the model holding the tower: moved as a whole (a prefix may use its parameters)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._dim: int | None = None

    def _weights_digest(self) -> str:
        import open_clip

        arch = json.dumps(open_clip.get_model_config(self.model_name), sort_keys=True, default=str)
        return hashlib.sha256((arch + self.split.kind + _modules_digest(self.split.frozen)).encode()).hexdigest()

    @property
    def preprocessing(self) -> str:
        if self.modality == "image":
            return f"open_clip eval transform: {self.preprocess!r}; prefix {self.split.kind}, fp32"
        tok = self.tokenizer
        name = getattr(getattr(tok, "tokenizer", None), "name_or_path", type(tok).__name__)
        return (
            f"tokenizer {type(tok).__name__}({name}, context {getattr(tok, 'context_length', '?')}); "
            f"prefix {self.split.kind}, fp32"
        )

    def _load(self) -> Any:
        self.owner.to(self._device())
        for module in self.split.frozen:
            module.eval()
        return self.split

    def to(self, device: str | None) -> LockedTowerEncoder:
        self.device = device
        self.owner.to(self._device())
        return self

    @property
    def dim(self) -> int:
        if self._dim is None:
            from PIL import Image

            probe = [Image.new("RGB", (32, 32))] if self.modality == "image" else ["a"]
            self._dim = int(self.encode(probe).shape[1])
        return self._dim

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """PIL images or caption strings (N,) -> float32 (N, F) prefix features."""
        self.load()
        device = torch.device(self._device())
        out = []
        with torch.inference_mode():
            for lo in range(0, len(items), self.batch_size):
                chunk = items[lo : lo + self.batch_size]
                if self.modality == "image":
                    x = torch.stack([self.preprocess(img.convert("RGB")) for img in chunk])
                else:
                    x = self.tokenizer(list(chunk))
                out.append(self.split.prefix(x.to(device)).float().flatten(1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


@dataclass
class TowerFeatures:
    """Cached prefix outputs of a split: ``image`` float32 (num_images, F_i) and/or ``text`` (num_captions, F_t)
    memmaps in index order (``None`` for a side that is not cached)."""

    image: np.ndarray | None = None
    text: np.ndarray | None = None
    stats: dict[str, ExtractStats] = field(default_factory=dict)

    @property
    def sides(self) -> set[str]:
        return {s for s in ("image", "text") if getattr(self, s) is not None}


def cached_sides(model: torch.nn.Module, enabled: bool) -> dict[str, TowerSplit]:
    """The locked towers of ``model`` whose prefix outputs are cached (none when caching is off)."""
    if not enabled:
        return {}
    splits = {"image": split_image_tower(model), "text": split_text_tower(model)}
    return {side: s for side, s in splits.items() if s is not None}


def tower_features(
    model_name: str,
    model: torch.nn.Module,
    index: DatasetIndex,
    cache_dir: Path | str,
    *,
    preprocess,
    tokenizer,
    sides: dict[str, TowerSplit],
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = False,
) -> TowerFeatures:
    """Prefix features of every image / caption of ``index`` for each locked side in ``sides``, via the cache.

    ``device``: where a missing feature is computed (default: CUDA when available). The tower modules are put
    back on their original device afterwards.
    """
    out = TowerFeatures()
    home = next(iter(model.parameters())).device
    was_training = model.training
    for side, split in sides.items():
        encoder = LockedTowerEncoder(
            model_name,
            split,
            side,
            owner=model,
            preprocess=preprocess,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device,
        )
        try:
            view, stats = extract_modality(
                encoder, index, cache_dir, backend="local", batch_size=batch_size, progress=progress, device=device
            )
        finally:
            model.to(home)
            model.train(was_training)
        setattr(out, side, view)
        out.stats[side] = stats
        log.info(
            "locked %s tower of %s on %s: %d rows, %d computed, %d reused, F=%d, %.1f s",
            side,
            model_name,
            index.name,
            stats.total,
            stats.computed,
            stats.reused,
            view.shape[1],
            stats.seconds,
        )
    return out


def experiment_tower_features(
    cfg,
    student,
    index: DatasetIndex,
    sides: dict[str, TowerSplit],
    *,
    device: str | None = None,
    progress: bool = False,
) -> TowerFeatures:
    """``tower_features`` for an ``ExperimentConfig``'s student (cache under ``teachers.cache_dir``)."""
    return tower_features(
        cfg.model.name,
        student.model,
        index,
        cfg.teachers.cache_dir,
        preprocess=student.preprocess,
        tokenizer=student.tokenizer,
        sides=sides,
        batch_size=cfg.teachers.batch_size,
        device=device,
        progress=progress,
    )


def prepare_tower_features(
    cfg, roles: Sequence[SplitRole] = ("train", "val"), progress: bool = True
) -> dict[str, TowerFeatures]:
    """On the driver, before workers start: cache the locked towers' outputs for each split ``role`` (a split the
    data lacks is skipped). Returns ``{role: TowerFeatures}``; empty when no tower is locked or caching is off."""
    from orchestrator.data.splits import load_split
    from orchestrator.errors import UserError
    from orchestrator.models.student import build_student

    if not cfg.model.cache_locked_towers or not (cfg.model.lock_image or cfg.model.lock_text):
        return {}
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    sides = cached_sides(student.model, True)
    if not sides:
        return {}
    out: dict[str, TowerFeatures] = {}
    for role in roles:
        if role != "train" and role not in cfg.eval.splits:
            continue
        try:
            index = load_split(cfg.data, role)
        except UserError as err:
            if role == "train":
                raise
            log.info("locked towers: skipping split %s (%s)", role, err)
            continue
        out[role] = experiment_tower_features(cfg, student, index, sides, progress=progress)
    return out
