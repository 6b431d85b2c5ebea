"""Train/eval leakage: images (by id or by file) and caption ids of the train split that are also in val or test.

Scores on an eval split that shares images with the train split overstate the model. ``check_leakage`` compares
the splits with set operations over the index columns (the packed ids and paths; no JSON re-read, no ``Path`` per
record) and logs one WARNING naming the counts, the splits and a few examples (``data.leakage: warn``, the
default) or raises a ``UserError`` (``data.leakage: error``). Image files are compared by their lexically
normalised absolute paths (as the readers build them), so two spellings of one file match; two symlinks to one
file do not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data.columns import PackedStrings, PathColumn
from orchestrator.data.index import DatasetIndex
from orchestrator.data.splits import SplitRole, load_split
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: How many overlapping values a message shows per kind.
EXAMPLES = 3
EVAL_ROLES: tuple[SplitRole, ...] = ("val", "test")
#: Data configs (as JSON) this process has already checked -> what was found (the preflight, then the loop).
_CHECKED: dict[str, dict[str, Overlap]] = {}


@dataclass
class Overlap:
    """What eval split ``role`` shares with the train split: ``num_images`` of its ``total_images`` images share an
    id or a file; ``values`` maps a kind (``image ids``, ``image files``, ``caption ids``) to the shared values."""

    role: str
    source: str
    num_images: int
    total_images: int
    values: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Kind -> number of shared values (kinds with none left out)."""
        return {kind: len(vals) for kind, vals in self.values.items() if vals}

    def describe(self, root: Path | None) -> str:
        """One clause: ``2 of 3 images of split 'val' are also in split 'train' (1 image id ('a'); ...)``."""

        def phrase(kind: str) -> str:
            vals = self.values[kind]
            shown = [_display(v, root) if kind == "image files" else repr(v) for v in vals[:EXAMPLES]]
            more = ", ..." if len(vals) > EXAMPLES else ""
            noun = kind if len(vals) != 1 else kind[:-1]
            return f"{len(vals)} {noun} ({', '.join(shown)}{more})"

        parts = []
        image_kinds = [phrase(k) for k in ("image ids", "image files") if self.values.get(k)]
        if image_kinds:
            parts.append(
                f"{self.num_images} of {self.total_images} images of split {self.role!r} are also in split "
                f"'train' ({'; '.join(image_kinds)})"
            )
        if self.values.get("caption ids"):
            parts.append(f"split {self.role!r} has {phrase('caption ids')} of split 'train'")
        return "; ".join(parts)


def _display(path: str, root: Path | None) -> str:
    if root is not None:
        rel = os.path.relpath(path, root)
        if not rel.startswith(os.pardir):
            return rel
    return path


def _path_keys(train: PathColumn, other: PathColumn) -> tuple[PackedStrings, PackedStrings]:
    """Columns whose equal items are equal files (lexically): the relative paths when both share a root and hold
    no absolute (outside-root) rows, else the joined paths."""
    if train.root == other.root and not (train.has_absolute() or other.has_absolute()):
        return train.relative, other.relative
    return train.full(), other.full()


def _hits(column: PackedStrings, mask: np.ndarray) -> list[str]:
    return sorted(set(column[np.flatnonzero(mask)]))


def find_overlap(train: DatasetIndex, other: DatasetIndex, role: str) -> Overlap | None:
    """What ``other`` (eval split ``role``) shares with ``train``; ``None`` when nothing. Over the index columns
    (``PackedStrings.is_in`` on the ids and paths as stored, joined to their roots only where the roots differ)."""
    assert isinstance(train.image_ids, PackedStrings) and isinstance(other.image_ids, PackedStrings)
    id_hit = other.image_ids.is_in(train.image_ids)
    values: dict[str, list[str]] = {"image ids": _hits(other.image_ids, id_hit)}
    file_hit = np.zeros(other.num_images, dtype=bool)
    if isinstance(train.image_paths, PathColumn) and isinstance(other.image_paths, PathColumn):
        train_keys, other_keys = _path_keys(train.image_paths, other.image_paths)
        file_hit = other_keys.is_in(train_keys)
        shown = other.image_paths.take(np.flatnonzero(file_hit))
        values["image files"] = sorted(set(shown.strings()))
    if isinstance(train.caption_ids, PackedStrings) and isinstance(other.caption_ids, PackedStrings):
        values["caption ids"] = _hits(other.caption_ids, other.caption_ids.is_in(train.caption_ids))
    num_images = int((id_hit | file_hit).sum())
    if not num_images and not values.get("caption ids"):
        return None
    return Overlap(
        role=role,
        source=other.source or other.name,
        num_images=num_images,
        total_images=other.num_images,
        values=values,
    )


def _eval_split(cfg: DataConfig, role: SplitRole) -> DatasetIndex | None:
    """Split ``role`` for the comparison (images not verified), or ``None`` where the data has no such split."""
    if cfg.resolved_format == "captions_json":
        assert cfg.root is not None
        name = {"val": cfg.val_split, "test": cfg.test_split}[role]
        if not (cfg.root / f"{name}.json").is_file():
            return None
    try:
        return load_split(cfg, role, verify=False)
    except UserError as err:  # e.g. a Karpathy file without test images: nothing to compare
        log.info("leakage check: no %s split to compare (%s)", role, err)
        return None


def check_leakage(cfg: DataConfig, loaded: dict[str, DatasetIndex] | None = None) -> dict[str, Overlap]:
    """Compare the train split with val and test; warn (``data.leakage: warn``) or raise (``error``).

    ``loaded``: splits already loaded by the caller (``train``, ``val``, ``test``), reused as they are; the others
    are read here (images not verified). Generated (synthetic) data is not checked. Returns role -> overlap. A
    data config already checked in this process is not read or reported again.
    """
    if cfg.resolved_format == "synthetic":
        return {}
    key = cfg.model_dump_json()
    if key in _CHECKED:  # already checked (and warned) in this process: once is loud enough
        return _CHECKED[key]
    loaded = dict(loaded or {})
    train = loaded.get("train") or load_split(cfg, "train", verify=False)
    found: dict[str, Overlap] = {}
    for role in EVAL_ROLES:
        other = loaded.get(role) or _eval_split(cfg, role)
        if other is None:
            continue
        overlap = find_overlap(train, other, role)
        if overlap is not None:
            found[role] = overlap
    if not found:
        _CHECKED[key] = found
        return found
    text = "; ".join(o.describe(cfg.root) for o in found.values())
    if cfg.leakage == "error":
        first = next(iter(found.values()))
        raise UserError(f"{text} (set data.leakage: warn to train anyway)", path=first.source, field="data.leakage")
    sources = sorted({o.source for o in found.values()} | {train.source or train.name})
    log.warning(
        "train/eval leakage: %s; eval scores on these splits overstate the model (data in %s; "
        "data.leakage: error refuses such data)",
        text,
        ", ".join(sources),
    )
    _CHECKED[key] = found
    return found
