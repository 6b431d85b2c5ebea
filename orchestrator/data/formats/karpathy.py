"""The ``karpathy`` format: a split of ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``data.annotations``),
images under ``data.root``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.data.columns import PathColumn
from orchestrator.data.formats.common import (
    caption_text,
    clean_caption,
    escapes_root,
    is_plain_relative,
    outside_root,
    read_json,
    text_id,
)
from orchestrator.data.formats.registry import SplitRole, register_split_format
from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.config.data import DataConfig

#: Karpathy split names -> the ``split`` values of their images.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@register_split_format(
    "karpathy",
    requires=("annotations", "root"),
    needs="format karpathy needs data.annotations (dataset_*.json) and data.root (images)",
    detect=lambda cfg: cfg.annotations is not None,
    detect_order=20,
)
def load_karpathy(cfg: DataConfig, role: SplitRole, split: str) -> DatasetIndex:
    """The split ``split`` of ``data.annotations``, images under ``data.root``, named ``<annotations stem>/<split>``."""
    assert cfg.annotations is not None and cfg.root is not None
    return read_karpathy(
        cfg.annotations,
        cfg.root,
        split,
        name=f"{cfg.annotations.stem}/{split}",
        clean=cfg.clean_captions,
        allow_outside_root=cfg.allow_outside_root,
    )


def read_karpathy(
    annotations: Path, image_root: Path, split: str, *, name: str, clean: bool = True, allow_outside_root: bool = False
) -> DatasetIndex:
    """A split of ``dataset_coco.json`` / ``dataset_flickr30k.json``: train = train + restval.

    Image ids are COCO ids (``cocoid``) where present, else the file stem; caption ids are ``sentid``; both must
    be integers or non-empty strings. Image files are ``image_root/filepath/filename`` (COCO) or
    ``image_root/filename`` (Flickr30K); one that leaves ``image_root`` is refused unless ``allow_outside_root``.
    """
    tree = read_json(annotations)
    if not isinstance(tree, dict) or not isinstance(tree.get("images"), list):
        raise UserError("expected an object with an 'images' list (Karpathy format)", path=str(annotations))
    wanted = KARPATHY_SPLITS.get(split, (split,))
    # the root resolved once; records are normalised lexically against it
    columns = _KarpathyColumns(annotations, Path(image_root).resolve(), clean, allow_outside_root)
    for k, img in enumerate(tree["images"]):
        if not isinstance(img, dict):
            raise UserError("image entry is not an object", path=str(annotations), field=f"images[{k}]")
        if img.get("split") in wanted:
            columns.add_image(img, f"images[{k}]")
    if not columns.image_ids:
        raise UserError(f"no images in split {split!r} (split values {list(wanted)})", path=str(annotations))
    return columns.index(name)


class _KarpathyColumns:
    """The columns of one Karpathy split, filled image by image; image and caption ids checked unique as they
    come. ``UserError``s name ``annotations`` and the entry (``images[k]...``)."""

    def __init__(self, annotations: Path, root: Path, clean: bool, allow_outside_root: bool) -> None:
        self.annotations, self.root = annotations, root
        self.clean, self.allow_outside_root = clean, allow_outside_root
        self.image_ids: list[str] = []
        self.image_files: list[str] = []  # normalised, relative to ``root`` unless allowed outside
        self.captions: list[str] = []
        self.caption_ids: list[str] = []
        self.caption_image: list[int] = []
        self._seen_images: set[str] = set()
        self._seen_captions: set[str] = set()

    def add_image(self, img: dict[str, Any], where: str) -> None:
        """The image entry ``img`` (at ``where``) and its sentences."""
        annotations = self.annotations
        for key in ("filename", "sentences"):
            if key not in img:
                raise UserError("missing field", path=str(annotations), field=f"{where}.{key}")
        image_file = _karpathy_file(img, self.root, annotations, where, self.allow_outside_root)
        if "cocoid" in img:
            image_id = text_id(img["cocoid"], "cocoid", annotations, f"{where}.cocoid")
        else:
            image_id = Path(img["filename"]).stem
        if image_id in self._seen_images:
            raise UserError(f"duplicate image id {image_id!r}", path=str(annotations), field=where)
        self._seen_images.add(image_id)
        sentences = img["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise UserError("no sentences", path=str(annotations), field=f"{where}.sentences")
        idx = len(self.image_ids)
        self.image_ids.append(image_id)
        self.image_files.append(image_file)
        self._add_sentences(sentences, where, image_id, idx)

    def _add_sentences(self, sentences: list[Any], where: str, image_id: str, idx: int) -> None:
        """The captions of image ``idx``: ``raw`` cleaned (or stripped), ids ``sentid`` or ``<image id>#<s>``."""
        annotations, clean, seen = self.annotations, self.clean, self._seen_captions
        add_caption, add_id, add_image = self.captions.append, self.caption_ids.append, self.caption_image.append
        for s, sent in enumerate(sentences):  # field names are built only for an error
            if not isinstance(sent, dict) or "raw" not in sent:
                raise UserError("missing field", path=str(annotations), field=f"{where}.sentences[{s}].raw")
            raw = sent["raw"]
            if type(raw) is str and clean:
                text = clean_caption(raw)
                if not text:
                    raise UserError("caption is empty", path=str(annotations), field=f"{where}.sentences[{s}].raw")
            else:
                text = caption_text(raw, annotations, f"{where}.sentences[{s}].raw", clean)
            add_caption(text)
            caption_id = _caption_id(sent, image_id, s, annotations, where)
            if caption_id in seen:
                raise UserError(
                    f"duplicate sentid {caption_id!r}", path=str(annotations), field=f"{where}.sentences[{s}].sentid"
                )
            seen.add(caption_id)
            add_id(caption_id)
            add_image(idx)

    def index(self, name: str) -> DatasetIndex:
        """The split as a :class:`DatasetIndex` named ``name``."""
        return DatasetIndex(
            name=name,
            image_ids=self.image_ids,
            captions=self.captions,
            caption_image=np.asarray(self.caption_image, dtype=np.int64),
            image_paths=PathColumn(str(self.root), self.image_files),
            caption_ids=self.caption_ids,
            source=str(self.annotations),
        )


def _caption_id(sent: dict[str, Any], image_id: str, s: int, annotations: Path, where: str) -> str:
    """Sentence ``s``'s id: its ``sentid`` as text (an integer or a non-empty string), else ``<image id>#<s>``."""
    if "sentid" not in sent:
        return f"{image_id}#{s}"
    sentid = sent["sentid"]
    if type(sentid) is str and sentid:
        return sentid
    return text_id(sentid, "sentid", annotations, f"{where}.sentences[{s}].sentid")


def _karpathy_file(img: dict[str, Any], root: Path, annotations: Path, where: str, allow_outside_root: bool) -> str:
    """``filepath/filename`` of a Karpathy image entry, normalised lexically (relative to ``root`` when inside)."""
    filename, filepath = img["filename"], img.get("filepath", "")
    if not isinstance(filename, str) or not filename:
        raise UserError("filename must be a non-empty string", path=str(annotations), field=f"{where}.filename")
    if not isinstance(filepath, str):
        raise UserError("filepath must be a string", path=str(annotations), field=f"{where}.filepath")
    joined = os.path.join(filepath, filename)
    if is_plain_relative(joined):
        return joined
    image_file = os.path.normpath(joined)
    if not escapes_root(image_file):
        return image_file
    if not allow_outside_root:
        blame = "filepath" if filepath and escapes_root(filepath) else "filename"
        raise outside_root(joined, root, annotations, f"{where}.{blame}")
    return os.path.normpath(os.path.join(root, image_file))
