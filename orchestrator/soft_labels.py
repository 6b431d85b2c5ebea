"""Per-batch soft-label inputs: teacher features, caption groups and exact relevance, looked up by index.

Teacher features are precomputed for the whole split (``orchestrator.teachers``; memory-mapped), so a batch
only gathers rows. Exact relevance comes from datasets that know it (the synthetic data).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from orchestrator.data.index import DatasetIndex
from orchestrator.data.loader import caption_groups
from orchestrator.errors import UserError


class SplitFeatures(Protocol):
    """Teacher features of one split: ``image`` (num_images, D_i) and ``text`` (num_captions, D_t), or None."""

    image: np.ndarray | None
    text: np.ndarray | None


#: Which batch inputs each source provides.
PROVIDES = {
    "teacher_image": ("teacher_image",),
    "teacher_text": ("teacher_text", "caption_group_emb", "caption_group_mask", "text_caption_emb"),
    "relevance": ("relevance",),
}


class BatchInputs:
    """Builds the optional ``EmbeddingBatch`` inputs for a batch from its image and caption indices.

    ``need``: the input names the loss requires; only those are built. Raises ``UserError`` at construction
    when an input cannot be provided (no teacher features, or data without exact relevance).
    """

    def __init__(self, index: DatasetIndex, features: SplitFeatures | None, need: frozenset[str] | set[str]) -> None:
        self.index = index
        self.features = features
        self.need = set(need)
        self._image = features.image if features is not None else None
        self._text = features.text if features is not None else None
        if self._image is not None and self._image.shape[0] != index.num_images:
            raise UserError(
                f"image teacher features have {self._image.shape[0]} rows for {index.num_images} images",
                path=index.name,
                field="teachers.image",
            )
        if self._text is not None and self._text.shape[0] != index.num_captions:
            raise UserError(
                f"text teacher features have {self._text.shape[0]} rows for {index.num_captions} captions",
                path=index.name,
                field="teachers.text",
            )
        available: set[str] = set()
        if self._image is not None:
            available.update(PROVIDES["teacher_image"])
        if self._text is not None:
            available.update(PROVIDES["teacher_text"])
        if index.relevance is not None:
            available.update(PROVIDES["relevance"])
        missing = sorted(self.need - available)
        if missing:
            raise UserError(
                f"the loss needs batch inputs {missing} that this data/teacher setup cannot provide",
                path=index.name,
                field="loss",
            )
        self.available = available

    def __call__(self, image_index: np.ndarray, caption_index: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors (CPU) for a batch: image_index/caption_index (B,) int -> the needed inputs."""
        out: dict[str, torch.Tensor] = {}
        if "teacher_image" in self.need:
            image = self._teacher("image")
            out["teacher_image"] = torch.from_numpy(np.ascontiguousarray(image[image_index], dtype=np.float32))
        if "teacher_text" in self.need or "text_caption_emb" in self.need:
            text = torch.from_numpy(np.ascontiguousarray(self._teacher("text")[caption_index], dtype=np.float32))
            if "teacher_text" in self.need:
                out["teacher_text"] = text
            if "text_caption_emb" in self.need:
                out["text_caption_emb"] = text
        if "caption_group_emb" in self.need:
            groups, mask = caption_groups(self.index, image_index)  # (B, K); padding points at row 0
            emb = np.asarray(self._teacher("text")[groups.reshape(-1)], dtype=np.float32).reshape(*groups.shape, -1)
            out["caption_group_emb"] = torch.from_numpy(emb * mask[..., None])
            out["caption_group_mask"] = torch.from_numpy(mask)
        if "relevance" in self.need:
            relevance = self.index.relevance
            if relevance is None:  # __init__ refused the need already
                raise RuntimeError(f"{self.index.name} knows no graded relevance")
            R = relevance(np.asarray(image_index), np.asarray(caption_index))
            out["relevance"] = torch.from_numpy(np.asarray(R, dtype=np.float32))
        return out

    def _teacher(self, side: str) -> np.ndarray:
        """The ``side`` ("image"/"text") teacher features; ``__init__`` refused every input they would give when
        they are absent, so None here is a programming error."""
        features = self._image if side == "image" else self._text
        if features is None:
            raise RuntimeError(f"no {side} teacher features for {self.index.name}")
        return features
