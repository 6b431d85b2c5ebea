"""Encode a split with a student and score it: the bridge from a model to the retrieval metrics."""

from __future__ import annotations

import contextlib
import logging
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.data.index import DatasetIndex
from orchestrator.data.loader import (
    ImageTensorCache,
    TextInput,
    Tokenizer,
    images_on_device,
    iter_caption_batches,
    iter_image_batches,
)
from orchestrator.evaluation.recall import non_finite_rows, retrieval_metrics
from orchestrator.models.encoder import DualEncoder, not_a_dual_encoder

log = logging.getLogger(__name__)

#: Below this many images a split's recall is too coarse to compare models: a WARNING is logged.
MIN_EVAL_IMAGES = 100


def warn_small_split(num_images: int, what: str, ks: Sequence[int] = (1, 5, 10)) -> str | None:
    """Log (and return) a WARNING when ``what`` (``"val split"``, a file) has fewer than :data:`MIN_EVAL_IMAGES`
    images; ``None`` otherwise.

    One image scores RSUM 600 whatever the model; with N images every R@K with K >= N is 100."""
    if num_images >= MIN_EVAL_IMAGES:
        return None
    trivial = sorted(int(k) for k in ks if int(k) >= num_images)
    why = f"; R@{trivial[0]} and above are 100 for any model" if trivial else ""
    message = (
        f"{what} has only {num_images} image{'s' if num_images != 1 else ''}: retrieval metrics over "
        f"fewer than {MIN_EVAL_IMAGES} images are unreliable{why}"
    )
    log.warning("%s", message)
    return message


class NonFiniteEmbeddingsError(ValueError):
    """A split's embeddings hold NaN or Inf (a diverged model): an error, never a score (a NaN would rank first)."""


def non_finite_message(image_emb: torch.Tensor, text_emb: torch.Tensor, split: str | None = None) -> str | None:
    """``"val split: 12 of 201 image embeddings are not finite"`` (and / or the caption count), or ``None``
    when every row is finite."""
    parts = []
    for name, emb in (("image", image_emb), ("caption", text_emb)):
        bad = non_finite_rows(emb)
        if bad:
            parts.append(f"{bad} of {emb.shape[0]} {name} embeddings")
    if not parts:
        return None
    return f"{split + ' split: ' if split else ''}{' and '.join(parts)} are not finite"


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
        np.savez(
            path,
            image_emb=self.image_emb.numpy(),
            text_emb=self.text_emb.numpy(),
            image_ids=ids,
            text_image_ids=ids[self.text_image],
        )

    @classmethod
    def load_npz(cls, path) -> SplitEmbeddings:
        """Embeddings written by :meth:`save_npz` (or by hand with the same keys; an optional ``caption_ids``
        (M,) array is kept); ``UserError`` naming the file and the array for a missing key, an object array,
        a wrong shape or dtype, non-finite values or an unknown image id."""
        from orchestrator.errors import UserError

        where = str(path)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"not a readable npz file ({err})", path=where) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError("not an npz archive (a single .npy array?)", path=where)
        missing = {"image_emb", "text_emb", "image_ids", "text_image_ids"} - set(data.files)
        if missing:
            raise UserError(f"missing arrays {sorted(missing)}", path=where)
        arrays = {
            key: _npz_array(data, key, where)
            for key in data.files
            if key in {"image_emb", "text_emb", "image_ids", "text_image_ids", "caption_ids"}
        }
        for key in ("image_emb", "text_emb"):
            arr = arrays[key]
            if arr.ndim != 2 or arr.dtype.kind not in "fiu":
                raise UserError(f"expected a 2-D numeric array, got {arr.ndim}-D {arr.dtype}", path=where, field=key)
        for key in ("image_ids", "text_image_ids", "caption_ids"):
            if key in arrays and arrays[key].ndim != 1:
                raise UserError(f"expected a 1-D array, got shape {arrays[key].shape}", path=where, field=key)
        if arrays["image_emb"].shape[1] != arrays["text_emb"].shape[1]:
            raise UserError(
                f"{arrays['text_emb'].shape[1]} columns, but image_emb has {arrays['image_emb'].shape[1]}",
                path=where,
                field="text_emb",
            )
        image_ids = [str(x) for x in arrays["image_ids"].tolist()]
        lookup = {x: i for i, x in enumerate(image_ids)}
        owners = [str(x) for x in arrays["text_image_ids"].tolist()]
        unknown = next((x for x in owners if x not in lookup), None)
        if unknown is not None:
            raise UserError(f"text_image_ids names image {unknown!r}, which is not in image_ids", path=where)
        image_emb = torch.from_numpy(np.asarray(arrays["image_emb"], dtype=np.float32))
        text_emb = torch.from_numpy(np.asarray(arrays["text_emb"], dtype=np.float32))
        if image_emb.shape[0] != len(image_ids) or text_emb.shape[0] != len(owners):
            raise UserError("image_emb / text_emb rows do not match image_ids / text_image_ids", path=where)
        for key, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
            bad = non_finite_rows(emb)
            if bad:
                raise UserError(f"{bad} of {emb.shape[0]} rows are not finite (NaN or Inf)", path=where, field=key)
        caption_ids = [str(x) for x in arrays["caption_ids"].tolist()] if "caption_ids" in arrays else None
        if caption_ids is not None and len(caption_ids) != len(owners):
            raise UserError(f"{len(caption_ids)} ids for {len(owners)} captions", path=where, field="caption_ids")
        return cls(image_emb, text_emb, np.asarray([lookup[x] for x in owners], dtype=np.int64), image_ids, caption_ids)


def _npz_array(data, key: str, where: str) -> np.ndarray:
    """``data[key]``; an object array (it would need pickle) or an unreadable member is a ``UserError``."""
    from orchestrator.errors import UserError

    try:
        return data[key]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UserError(
                "an object array (pickled Python objects) is refused; save numbers and strings", path=where, field=key
            ) from None
        raise UserError(f"unreadable array ({err})", path=where, field=key) from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:  # a truncated / corrupt member
        raise UserError(f"unreadable array ({err.__class__.__name__}: {err})", path=where, field=key) from None


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA for precision ``auto``/``bf16``; nothing otherwise."""
    if device.type == "cuda" and precision in {"auto", "bf16"}:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_split(
    model: nn.Module,
    index: DatasetIndex,
    images: ImageTensorCache,
    tokenizer: TextInput | Tokenizer,
    *,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "auto",
    split: str | None = None,
) -> SplitEmbeddings:
    """Embeddings of every image and caption of ``index`` (the model is put in eval mode, then restored).

    ``images``: the split's image source (``DecodedImages``: uint8 rows, normalised on ``device``;
    ``ImageTensorCache``; cached tower features).

    Raises :class:`NonFiniteEmbeddingsError` (naming ``split``, default the index's name, and the counts) when
    any embedding holds NaN or Inf; TypeError for a model without ``encode_image`` / ``encode_text``."""
    if not isinstance(model, DualEncoder):
        raise not_a_dual_encoder(model)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, precision):
            img = [
                model.encode_image(images_on_device(images, b.to(device)), normalize=True).float().cpu()
                for b in iter_image_batches(index, images, batch_size)
            ]  # cache rows: uint8, normalised there
            txt = [
                model.encode_text(t.to(device), normalize=True).float().cpu()
                for t in iter_caption_batches(index, tokenizer, batch_size)
            ]
    finally:
        model.train(was_training)
    image_emb, text_emb = torch.cat(img), torch.cat(txt)
    problem = non_finite_message(image_emb, text_emb, split or index.name)
    if problem:
        raise NonFiniteEmbeddingsError(problem)
    return SplitEmbeddings(
        image_emb,
        text_emb,
        index.caption_image.copy(),
        list(index.image_ids),
        None if index.caption_ids is None else list(index.caption_ids),
    )


def evaluate_embeddings(
    emb: SplitEmbeddings, *, ks=(1, 5, 10), chunk_size: int = 1024, device: torch.device | None = None
) -> dict[str, float]:
    """Recall@K both ways, RSUM, median/mean rank (``retrieval_metrics``) on ``device`` (default: CPU)."""
    device = device or torch.device("cpu")
    return retrieval_metrics(
        emb.image_emb.to(device), emb.text_emb.to(device), emb.text_image, ks=tuple(ks), chunk_size=chunk_size
    )
