"""Encode a split with a student and score it: the bridge from a model to the retrieval metrics."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.data.index import DatasetIndex
from orchestrator.data.loader import ImageTensorCache, Tokenizer, iter_caption_batches, iter_image_batches
from orchestrator.evaluation.recall import retrieval_metrics


@dataclass
class SplitEmbeddings:
    """image_emb (N, D) and text_emb (M, D) float32, L2-normalised, CPU; text_image (M,) int64 index into images;
    caption_ids (M,) where the data has them."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    text_image: np.ndarray
    image_ids: list[str]
    caption_ids: list[str] | None = None

    def save_npz(self, path) -> None:
        """``image_emb``, ``text_emb``, ``image_ids``, ``text_image_ids`` (the image id of each caption)."""
        ids = np.asarray(self.image_ids)
        np.savez(path, image_emb=self.image_emb.numpy(), text_emb=self.text_emb.numpy(), image_ids=ids,
                 text_image_ids=ids[self.text_image])

    @classmethod
    def load_npz(cls, path) -> "SplitEmbeddings":
        """Embeddings written by :meth:`save_npz` (or by hand with the same keys; an optional ``caption_ids``
        (M,) array is kept); ``UserError`` naming the file for a missing key or an unknown image id."""
        from orchestrator.errors import UserError

        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"not a readable npz file ({err})", path=str(path)) from None
        missing = {"image_emb", "text_emb", "image_ids", "text_image_ids"} - set(data.files)
        if missing:
            raise UserError(f"missing arrays {sorted(missing)}", path=str(path))
        image_ids = [str(x) for x in data["image_ids"].tolist()]
        lookup = {x: i for i, x in enumerate(image_ids)}
        owners = [str(x) for x in data["text_image_ids"].tolist()]
        unknown = next((x for x in owners if x not in lookup), None)
        if unknown is not None:
            raise UserError(f"text_image_ids names image {unknown!r}, which is not in image_ids", path=str(path))
        image_emb = torch.from_numpy(np.asarray(data["image_emb"], dtype=np.float32))
        text_emb = torch.from_numpy(np.asarray(data["text_emb"], dtype=np.float32))
        if image_emb.shape[0] != len(image_ids) or text_emb.shape[0] != len(owners):
            raise UserError("image_emb / text_emb rows do not match image_ids / text_image_ids", path=str(path))
        caption_ids = [str(x) for x in data["caption_ids"].tolist()] if "caption_ids" in data.files else None
        return cls(image_emb, text_emb, np.asarray([lookup[x] for x in owners], dtype=np.int64), image_ids,
                   caption_ids)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA for precision ``auto``/``bf16``; nothing otherwise."""
    if device.type == "cuda" and precision in {"auto", "bf16"}:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_split(model: nn.Module, index: DatasetIndex, images: ImageTensorCache, tokenizer: Tokenizer, *,
                 device: torch.device, batch_size: int = 256, precision: str = "auto") -> SplitEmbeddings:
    """Embeddings of every image and caption of ``index`` (the model is put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, precision):
            img = [model.encode_image(b.to(device), normalize=True).float().cpu()
                   for b in iter_image_batches(index, images, batch_size)]
            txt = [model.encode_text(t.to(device), normalize=True).float().cpu()
                   for t in iter_caption_batches(index, tokenizer, batch_size)]
    finally:
        model.train(was_training)
    return SplitEmbeddings(torch.cat(img), torch.cat(txt), index.caption_image.copy(), list(index.image_ids),
                           None if index.caption_ids is None else list(index.caption_ids))


def evaluate_embeddings(emb: SplitEmbeddings, *, ks=(1, 5, 10), chunk_size: int = 1024,
                        device: torch.device | None = None) -> dict[str, float]:
    """Recall@K both ways, RSUM, median/mean rank (``retrieval_metrics``) on ``device`` (default: CPU)."""
    device = device or torch.device("cpu")
    return retrieval_metrics(emb.image_emb.to(device), emb.text_emb.to(device), emb.text_image, ks=tuple(ks),
                             chunk_size=chunk_size)
