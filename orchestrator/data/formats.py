"""Readers for the on-disk dataset formats: ``captions_json`` (ALBEF/CUSA layout) and ``karpathy``."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

_PUNCT = re.compile(r"[,.'!?\"()*#:;~\-/]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 64) -> str:
    """CUSA's ``pre_caption``: lower-case; ``,.'!?"()*#:;~`` and ``-``/``/`` to spaces; at most 64 words."""
    text = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()
    words = text.split(" ")
    return " ".join(words[:max_words])


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError("annotation file not found", path=str(path))
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON (line {err.lineno}: {err.msg})", path=str(path)) from None
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", path=str(path)) from None


def _caption_text(value: Any, path: Path, where: str, clean: bool) -> str:
    if not isinstance(value, str):
        raise UserError(f"caption is not text ({type(value).__name__})", path=str(path), field=where)
    text = clean_caption(value) if clean else value.strip()
    if not text:
        raise UserError("caption is empty", path=str(path), field=where)
    return text


def read_captions_json(path: Path, *, name: str, clean: bool = True) -> DatasetIndex:
    """A ``captions_json`` split: a JSON list of ``{image, caption, image_id}``, image paths relative to the file.

    Records of one ``image_id`` must name the same image file; an image may have any number of captions.
    """
    records = _read_json(path)
    if not isinstance(records, list):
        raise UserError(f"expected a JSON list of records, got {type(records).__name__}", path=str(path))
    if not records:
        raise UserError("no records", path=str(path))
    base = path.parent
    image_index: dict[str, int] = {}
    image_ids: list[str] = []
    image_paths: list[Path] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for k, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"record is a {type(rec).__name__}, not an object", path=str(path), field=f"[{k}]")
        for key in ("image", "caption", "image_id"):
            if key not in rec:
                raise UserError("missing field", path=str(path), field=f"[{k}].{key}")
        image_id = rec["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or str(image_id) == "":
            raise UserError("image_id must be a non-empty string or integer", path=str(path), field=f"[{k}].image_id")
        image_id = str(image_id)
        if not isinstance(rec["image"], str) or not rec["image"]:
            raise UserError("image must be a non-empty path", path=str(path), field=f"[{k}].image")
        image_path = (base / rec["image"]).resolve()
        text = _caption_text(rec["caption"], path, f"[{k}].caption", clean)
        idx = image_index.get(image_id)
        if idx is None:
            idx = len(image_ids)
            image_index[image_id] = idx
            image_ids.append(image_id)
            image_paths.append(image_path)
        elif image_paths[idx] != image_path:
            raise UserError(
                f"image_id {image_id!r} names two files ({image_paths[idx].name}, {image_path.name})",
                path=str(path),
                field=f"[{k}].image",
            )
        captions.append(text)
        caption_image.append(idx)
    return DatasetIndex(
        name=name,
        image_ids=image_ids,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        image_paths=image_paths,
        source=str(path),
    )


#: Karpathy split names -> the ``split`` values of their images.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(annotations: Path, image_root: Path, split: str, *, name: str, clean: bool = True) -> DatasetIndex:
    """A split of ``dataset_coco.json`` / ``dataset_flickr30k.json``: train = train + restval.

    Image ids are COCO ids (``cocoid``) where present, else the file stem; caption ids are ``sentid``.
    Image files are ``image_root/filepath/filename`` (COCO) or ``image_root/filename`` (Flickr30K).
    """
    tree = _read_json(annotations)
    if not isinstance(tree, dict) or not isinstance(tree.get("images"), list):
        raise UserError("expected an object with an 'images' list (Karpathy format)", path=str(annotations))
    wanted = KARPATHY_SPLITS.get(split, (split,))
    image_ids: list[str] = []
    image_paths: list[Path] = []
    captions: list[str] = []
    caption_ids: list[str] = []
    caption_image: list[int] = []
    seen: set[str] = set()
    seen_captions: set[str] = set()
    for k, img in enumerate(tree["images"]):
        where = f"images[{k}]"
        if not isinstance(img, dict):
            raise UserError("image entry is not an object", path=str(annotations), field=where)
        if img.get("split") not in wanted:
            continue
        for key in ("filename", "sentences"):
            if key not in img:
                raise UserError("missing field", path=str(annotations), field=f"{where}.{key}")
        image_id = str(img.get("cocoid", Path(str(img["filename"])).stem))
        if image_id in seen:
            raise UserError(f"duplicate image id {image_id!r}", path=str(annotations), field=where)
        seen.add(image_id)
        sentences = img["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise UserError("no sentences", path=str(annotations), field=f"{where}.sentences")
        idx = len(image_ids)
        image_ids.append(image_id)
        image_paths.append((image_root / str(img.get("filepath", "")) / str(img["filename"])).resolve())
        for s, sent in enumerate(sentences):
            swhere = f"{where}.sentences[{s}]"
            if not isinstance(sent, dict) or "raw" not in sent:
                raise UserError("missing field", path=str(annotations), field=f"{swhere}.raw")
            captions.append(_caption_text(sent["raw"], annotations, f"{swhere}.raw", clean))
            caption_id = str(sent.get("sentid", f"{image_id}#{s}"))
            if caption_id in seen_captions:
                raise UserError(f"duplicate sentid {caption_id!r}", path=str(annotations), field=f"{swhere}.sentid")
            seen_captions.add(caption_id)
            caption_ids.append(caption_id)
            caption_image.append(idx)
    if not image_ids:
        raise UserError(f"no images in split {split!r} (split values {list(wanted)})", path=str(annotations))
    return DatasetIndex(
        name=name,
        image_ids=image_ids,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        image_paths=image_paths,
        caption_ids=caption_ids,
        source=str(annotations),
    )
