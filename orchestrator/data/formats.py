"""Readers for the on-disk dataset formats: ``captions_json`` (ALBEF/CUSA layout) and ``karpathy``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.columns import PathColumn
from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

_PUNCT = re.compile(r"[,.'!?\"()*#:;~\-/]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 64) -> str:
    """CUSA's ``pre_caption``: lower-case; ``,.'!?"()*#:;~`` and ``-``/``/`` to spaces; at most 64 words."""
    text = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()
    if text.count(" ") < max_words:  # at most max_words words: nothing to cut
        return text
    return " ".join(text.split(" ")[:max_words])


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


_PARENT = os.pardir + os.sep


def escapes_root(relative: str) -> bool:
    """Whether ``relative`` leaves the folder it is relative to: absolute, or ``..`` after lexical normalisation.

    Lexical only (``os.path.normpath``, no ``resolve``): a symlink inside the root that points outside is not seen.
    """
    norm = os.path.normpath(relative)
    return os.path.isabs(norm) or norm == os.pardir or norm.startswith(_PARENT)


def is_plain_relative(path: str) -> bool:
    """Whether ``path`` is already a normalised relative path that stays inside its root: no empty, ``.`` or
    ``..`` component, no leading or trailing separator (then ``os.path.normpath(path) == path``, checked in a few
    substring tests instead of a normalisation; other paths take the full route)."""
    return (
        bool(path)
        and path[0] not in "./"
        and path[-1] != "/"
        and "//" not in path
        and "/." not in path
        and ".." not in path
    )


def _outside_root(relative: str, root: Path, path: Path, where: str) -> UserError:
    return UserError(
        f"image path {relative!r} is outside the dataset root {root} (data.allow_outside_root: true allows it)",
        path=str(path),
        field=where,
    )


def _image_id(value: Any, what: str, path: Path, where: str) -> str:
    """An id (``image_id``, ``cocoid``, ``sentid``) as text: an integer or a non-empty string, nothing coerced."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{what} must be an integer or a non-empty string, not {kind}", path=str(path), field=where)
    return str(value)


def read_captions_json(path: Path, *, name: str, clean: bool = True, allow_outside_root: bool = False) -> DatasetIndex:
    """A ``captions_json`` split: a JSON list of ``{image, caption, image_id}``, image paths relative to the file.

    Records of one ``image_id`` must name the same image file; an image may have any number of captions. An image
    path that leaves the file's folder (absolute, or ``..`` after normalisation) is refused unless
    ``allow_outside_root``. The folder is resolved once; image strings are normalised lexically (a plain relative
    path is recognised without normalising it), and the result is packed into columns (``DatasetIndex``), nothing
    per record kept.
    """
    records = _read_json(path)
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
        image_id = raw_id if type(raw_id) is str and raw_id else _image_id(raw_id, "image_id", path, f"[{k}].image_id")
        if type(raw_image) is str and is_plain_relative(raw_image):
            image_file = raw_image
        else:
            image_file = _captions_json_file(raw_image, base, path, f"[{k}].image", allow_outside_root)
        if type(raw_caption) is str:
            text = clean_caption(raw_caption) if clean else raw_caption.strip()
            if not text:
                raise UserError("caption is empty", path=str(path), field=f"[{k}].caption")
        else:
            text = _caption_text(raw_caption, path, f"[{k}].caption", clean)
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
            raise _outside_root(raw, base, path, where)
        image_file = os.path.normpath(os.path.join(base, image_file))
    return image_file


#: Karpathy split names -> the ``split`` values of their images.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(
    annotations: Path, image_root: Path, split: str, *, name: str, clean: bool = True, allow_outside_root: bool = False
) -> DatasetIndex:
    """A split of ``dataset_coco.json`` / ``dataset_flickr30k.json``: train = train + restval.

    Image ids are COCO ids (``cocoid``) where present, else the file stem; caption ids are ``sentid``; both must
    be integers or non-empty strings. Image files are ``image_root/filepath/filename`` (COCO) or
    ``image_root/filename`` (Flickr30K); one that leaves ``image_root`` is refused unless ``allow_outside_root``.
    """
    tree = _read_json(annotations)
    if not isinstance(tree, dict) or not isinstance(tree.get("images"), list):
        raise UserError("expected an object with an 'images' list (Karpathy format)", path=str(annotations))
    wanted = KARPATHY_SPLITS.get(split, (split,))
    root = Path(image_root).resolve()  # once; records are normalised lexically against it
    image_ids: list[str] = []
    image_files: list[str] = []
    captions: list[str] = []
    caption_ids: list[str] = []
    caption_image: list[int] = []
    seen: set[str] = set()
    seen_captions: set[str] = set()
    for k, img in enumerate(tree["images"]):
        if not isinstance(img, dict):
            raise UserError("image entry is not an object", path=str(annotations), field=f"images[{k}]")
        if img.get("split") not in wanted:
            continue
        where = f"images[{k}]"
        for key in ("filename", "sentences"):
            if key not in img:
                raise UserError("missing field", path=str(annotations), field=f"{where}.{key}")
        image_file = _karpathy_file(img, root, annotations, where, allow_outside_root)
        if "cocoid" in img:
            image_id = _image_id(img["cocoid"], "cocoid", annotations, f"{where}.cocoid")
        else:
            image_id = Path(img["filename"]).stem
        if image_id in seen:
            raise UserError(f"duplicate image id {image_id!r}", path=str(annotations), field=where)
        seen.add(image_id)
        sentences = img["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise UserError("no sentences", path=str(annotations), field=f"{where}.sentences")
        idx = len(image_ids)
        image_ids.append(image_id)
        image_files.append(image_file)
        for s, sent in enumerate(sentences):  # field names are built only for an error
            if not isinstance(sent, dict) or "raw" not in sent:
                raise UserError("missing field", path=str(annotations), field=f"{where}.sentences[{s}].raw")
            raw = sent["raw"]
            if type(raw) is str and clean:
                text = clean_caption(raw)
                if not text:
                    raise UserError("caption is empty", path=str(annotations), field=f"{where}.sentences[{s}].raw")
            else:
                text = _caption_text(raw, annotations, f"{where}.sentences[{s}].raw", clean)
            captions.append(text)
            if "sentid" in sent:
                sentid = sent["sentid"]
                caption_id = (
                    sentid
                    if type(sentid) is str and sentid
                    else _image_id(sentid, "sentid", annotations, f"{where}.sentences[{s}].sentid")
                )
            else:
                caption_id = f"{image_id}#{s}"
            if caption_id in seen_captions:
                raise UserError(
                    f"duplicate sentid {caption_id!r}", path=str(annotations), field=f"{where}.sentences[{s}].sentid"
                )
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
        image_paths=PathColumn(str(root), image_files),
        caption_ids=caption_ids,
        source=str(annotations),
    )


def _karpathy_file(img: dict, root: Path, annotations: Path, where: str, allow_outside_root: bool) -> str:
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
        raise _outside_root(joined, root, annotations, f"{where}.{blame}")
    return os.path.normpath(os.path.join(root, image_file))
