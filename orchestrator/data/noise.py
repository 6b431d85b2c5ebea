"""Noisy correspondence: the training split with a share of its captions re-paired with other images.

The protocol of the noisy-correspondence papers (NCR, NeurIPS 2021; NPC, CVPR 2024), as ``data.noise``:
``caption_shuffle: r`` picks ``round(r * M)`` of the split's M captions (Python's ``round``: half to even) by a
permutation seeded with ``data.noise.seed``, and hands each of them the image of another chosen caption, so that
none keeps its own image (a derangement over *images*: two chosen captions of one image never swap with each
other). Everything else stays: the captions' texts, ids and order, the images, how many captions each image has
(the chosen captions' images are permuted among them). Val and test are never touched.

- :func:`plan_caption_shuffle`: which captions move, from which image to which (a :class:`CaptionShuffle`);
- :func:`shuffle_captions`: the noisy index (what ``data.splits.load_split`` returns for the train split);
- :func:`write_noise_mask` / :func:`record_noise_mask`: the mask as ``noise_mask.json`` for the run's artifacts.

The seed is its own field, not ``train.seed``: every training seed and every loss of a sweep sees the same
corrupted pairs, as with the papers' fixed noise files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import DataConfig, NoiseConfig
from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: The artifact that records which captions were re-paired (in the run's MLflow artifacts, and the local run folder).
MASK_NAME = "noise_mask.json"
FIELD = "data.noise.caption_shuffle"


@dataclass(frozen=True)
class CaptionShuffle:
    """Which captions of a split move: ``captions`` int64 (n,), ascending caption indices; ``from_image`` and
    ``to_image`` int64 (n,), each one's image index before and after (``from_image[k] != to_image[k]``).
    ``to_image`` is a rearrangement of ``from_image``."""

    ratio: float
    seed: int
    num_captions: int
    captions: np.ndarray
    from_image: np.ndarray
    to_image: np.ndarray


def shuffled_count(ratio: float, num_captions: int) -> int:
    """How many of ``num_captions`` captions ``caption_shuffle: ratio`` re-pairs: ``round(ratio * M)``."""
    return int(round(ratio * num_captions))


def derange(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rearrangement ``out`` of ``labels`` (int (n,)) with ``out[k] != labels[k]`` for every k.

    A uniform permutation first; then each position that kept its own label swaps with a random position ``j``
    such that neither keeps its own after the swap (``out[j] != labels[i]`` and ``labels[j] != out[i]``), so each
    swap removes at least one clash and adds none. Such a ``j`` always exists when no label fills more than half
    of the positions (the condition for any solution): of the ``n - g`` positions whose label is not ``a =
    labels[i]``, at most ``g - 1`` hold the value ``a`` (``i`` holds one), leaving ``n - 2g + 1 >= 1``. Expected
    clashes are ``sum(g**2) / n`` (a few for COCO's five captions an image), each fixed in O(n)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = labels[rng.permutation(labels.size)]
    for i in np.flatnonzero(out == labels).tolist():
        if out[i] != labels[i]:  # an earlier swap fixed it
            continue
        candidates = np.flatnonzero((out != labels[i]) & (labels != out[i]))
        assert candidates.size, "derange needs every label on at most half of the positions"
        j = int(candidates[rng.integers(candidates.size)])
        out[i], out[j] = out[j], out[i]
    return out


def plan_caption_shuffle(
    caption_image: np.ndarray,
    ratio: float,
    seed: int,
    *,
    where: str | None = None,
    image_ids: Sequence[str] | None = None,
) -> CaptionShuffle:
    """The captions ``caption_shuffle: ratio`` re-pairs in a split whose caption ``c`` shows image
    ``caption_image[c]`` (int (M,)), and their new images: deterministic in ``seed``.

    A ``UserError`` on ``data.noise.caption_shuffle`` (``where``: the split, for the message) when ``ratio > 0``
    rounds to no caption, or when one image (named by ``image_ids`` where given) holds more than half of the
    chosen captions: then some caption of it could only be handed to another caption of the same image (a single
    chosen caption, or all of them of one image, included)."""
    owner = np.asarray(caption_image, dtype=np.int64).reshape(-1)
    m = owner.size
    n = shuffled_count(ratio, m)
    if ratio > 0 and n == 0:
        raise UserError(
            f"{ratio:g} of {m} training captions rounds to none; raise it to at least {1 / max(m, 1):.2g}, or "
            "set 0 for clean data",
            path=where,
            field=FIELD,
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(m)[:n])
    from_image = owner[chosen]
    if n:
        images, counts = np.unique(from_image, return_counts=True)
        top = int(np.argmax(counts))
        if 2 * int(counts[top]) > n:
            image = repr(image_ids[int(images[top])]) if image_ids is not None else f"index {int(images[top])}"
            raise UserError(
                f"{ratio:g} re-pairs {n} training caption(s), {int(counts[top])} of them of image {image}: they "
                "cannot all move to another image (no image may hold more than half of the chosen captions); "
                "change data.noise.caption_shuffle or data.noise.seed, or use more images",
                path=where,
                field=FIELD,
            )
    to_image = derange(from_image, rng)
    return CaptionShuffle(float(ratio), int(seed), m, chosen, from_image, to_image)


def apply_shuffle(index: DatasetIndex, plan: CaptionShuffle) -> DatasetIndex:
    """``index`` with the planned captions re-paired (only ``caption_image`` changes, and the name)."""
    if plan.num_captions != index.num_captions:
        raise ValueError(f"the plan is for {plan.num_captions} captions, the index has {index.num_captions}")
    caption_image = index.caption_image.copy()
    caption_image[plan.captions] = plan.to_image
    name = f"{index.name}[caption_shuffle={plan.ratio:g},seed={plan.seed}]"
    return dataclasses.replace(index, name=name, caption_image=caption_image)


def shuffle_captions(index: DatasetIndex, noise: NoiseConfig) -> DatasetIndex:
    """The training split ``index`` with ``noise.caption_shuffle`` of its captions re-paired (unchanged at 0)."""
    if noise.caption_shuffle <= 0:
        return index
    plan = plan_caption_shuffle(
        index.caption_image, noise.caption_shuffle, noise.seed, where=index.source or None, image_ids=index.image_ids
    )
    log.info(
        "data.noise: %d of %d training captions of %s re-paired with another image (seed %d)",
        plan.captions.size,
        plan.num_captions,
        index.name,
        plan.seed,
    )
    return apply_shuffle(index, plan)


def mask_document(index: DatasetIndex, plan: CaptionShuffle) -> dict[str, Any]:
    """The mask of ``plan`` over the clean split ``index``: settings, counts, and per re-paired caption (in
    ascending caption order) its index in the split, its id (``None`` where the format has none) and the ids of
    the image it came from and the one it was given."""
    ids = index.image_ids
    return {
        "protocol": "caption_shuffle",
        "caption_shuffle": plan.ratio,
        "seed": plan.seed,
        "split": index.name,
        "content_hash": index.content_hash(),
        "num_captions": plan.num_captions,
        "num_shuffled": int(plan.captions.size),
        "caption_index": plan.captions.tolist(),
        "caption_id": None if index.caption_ids is None else [index.caption_ids[c] for c in plan.captions.tolist()],
        "from_image": [ids[i] for i in plan.from_image.tolist()],
        "to_image": [ids[i] for i in plan.to_image.tolist()],
    }


def write_noise_mask(data: DataConfig, folder: Path) -> Path:
    """Write ``folder/noise_mask.json`` for the train split of ``data`` (loaded clean, unverified) and return it."""
    from orchestrator.data.splits import load_split

    clean = load_split(data.model_copy(update={"noise": NoiseConfig()}), "train", verify=False)
    plan = plan_caption_shuffle(
        clean.caption_image, data.noise.caption_shuffle, data.noise.seed, image_ids=clean.image_ids
    )
    doc = mask_document(clean, plan)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MASK_NAME
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n"
    path.write_text(text, encoding="utf-8")
    return path


def record_noise_mask(
    data: DataConfig, log_files: Callable[[list[Path]], None] | None, folder: Path | None = None
) -> Path | None:
    """With noise on: the mask written into ``folder`` (kept; a temporary folder when ``None``) and handed to
    ``log_files`` (e.g. MLflow artifacts; it must copy or send the file before returning). ``None`` when off."""
    if data.noise.caption_shuffle <= 0:
        return None
    if folder is not None:
        path = write_noise_mask(data, folder)
        if log_files is not None:
            log_files([path])
        return path
    if log_files is not None:
        with tempfile.TemporaryDirectory(prefix="itr-noise-") as tmp:
            log_files([write_noise_mask(data, Path(tmp))])
    return None
