"""The ``captions_json`` format (ALBEF/CUSA layout, ../shared/data/coco-mini): ``data.root/<split>.json``, a JSON
list of ``{image, caption, image_id}`` records, image paths relative to the file."""

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


@register_split_format(
    "captions_json",
    requires=("root",),
    needs="format captions_json needs a folder with <split>.json",
    detect=lambda cfg: cfg.root is not None,
    detect_order=30,
)
def load_captions_json(cfg: DataConfig, role: SplitRole, split: str) -> DatasetIndex:
    """The split ``data.root/<split>.json``, named ``<root folder>/<split>``."""
    assert cfg.root is not None
    path = cfg.root / f"{split}.json"
    if not path.is_file():
        raise UserError(f"split file {path.name} not found in data.root", path=str(path), field="data.root")
    return read_captions_json(
        path, name=f"{cfg.root.name}/{split}", clean=cfg.clean_captions, allow_outside_root=cfg.allow_outside_root
    )


def read_captions_json(path: Path, *, name: str, clean: bool = True, allow_outside_root: bool = False) -> DatasetIndex:
    """A ``captions_json`` split: a JSON list of ``{image, caption, image_id}``, image paths relative to the file.

    Records of one ``image_id`` must name the same image file; an image may have any number of captions. An image
    path that leaves the file's folder (absolute, or ``..`` after normalisation) is refused unless
    ``allow_outside_root``. The folder is resolved once; image strings are normalised lexically (a plain relative
    path is recognised without normalising it), and the result is packed into columns (``DatasetIndex``), nothing
    per record kept.
    """
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"expected a JSON list of records, got {type(records).__name__}", path=str(path))
    if not records:
        raise UserError("no records", path=str(path))
    base = path.parent.resolve()  # once; records are normalised lexically against it
    image_index: dict[str, int] = {}
    image_ids: list[str] = []
    image_files: list[str] = []  # normalised, relative to ``base`` unless allowed outside
    captions: list[str] = []
    caption_image: list[int] = []
    add_caption, add_image = captions.append, caption_image.append
    for k, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"record is a {type(rec).__name__}, not an object", path=str(path), field=f"[{k}]")
        try:
            raw_image, raw_caption, raw_id = rec["image"], rec["caption"], rec["image_id"]
        except KeyError:
            key = next(key for key in ("image", "caption", "image_id") if key not in rec)
            raise UserError("missing field", path=str(path), field=f"[{k}].{key}") from None
        image_id = raw_id if type(raw_id) is str and raw_id else text_id(raw_id, "image_id", path, f"[{k}].image_id")
        if type(raw_image) is str and is_plain_relative(raw_image):
            image_file = raw_image
        else:
            image_file = _captions_json_file(raw_image, base, path, f"[{k}].image", allow_outside_root)
        if type(raw_caption) is str:
            text = clean_caption(raw_caption) if clean else raw_caption.strip()
            if not text:
                raise UserError("caption is empty", path=str(path), field=f"[{k}].caption")
        else:
            text = caption_text(raw_caption, path, f"[{k}].caption", clean)
        idx = image_index.get(image_id)
        if idx is None:
            idx = len(image_ids)
            image_index[image_id] = idx
            image_ids.append(image_id)
            image_files.append(image_file)
        elif image_files[idx] != image_file:
            raise UserError(
                f"image_id {image_id!r} names two files ({os.path.basename(image_files[idx])}, "
                f"{os.path.basename(image_file)})",
                path=str(path),
                field=f"[{k}].image",
            )
        add_caption(text)
        add_image(idx)
    del records, image_index
    return DatasetIndex(
        name=name,
        image_ids=image_ids,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        image_paths=PathColumn(str(base), image_files),
        source=str(path),
    )


def _captions_json_file(raw: Any, base: Path, path: Path, where: str, allow_outside_root: bool) -> str:
    """A record's ``image`` normalised lexically: relative to ``base``, or absolute where allowed outside it."""
    if not isinstance(raw, str) or not raw:
        raise UserError("image must be a non-empty path", path=str(path), field=where)
    image_file = os.path.normpath(raw)
    if escapes_root(image_file):
        if not allow_outside_root:
            raise outside_root(raw, base, path, where)
        image_file = os.path.normpath(os.path.join(base, image_file))
    return image_file
