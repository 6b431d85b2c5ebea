"""``file:<features.npz>``: precomputed image features keyed by image id (no model; nothing to cache)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.encoders.base import Inputs, TeacherEncoder, l2_normalise
from orchestrator.teachers.encoders.registry import TeacherRequest, existing_file, register_teacher
from orchestrator.teachers.hashing import files_digest

log = logging.getLogger(__name__)


class FileFeatureTeacher(TeacherEncoder):
    """``file:<path>``: precomputed image features keyed by image id.

    Format: an ``.npz`` with arrays ``ids`` (N,) and ``features`` (N, D), read with ``allow_pickle=False``;
    every value must be finite. A ``.npy`` holding a pickled dict ``{image_id: array (1, D) or (D,)}`` (the
    way the CUSA authors ship their Unicom features, ``{split}_unicom.npy``) is refused without being
    unpickled, since unpickling can run code from the file: ``itr convert-features IN.npy OUT.npz``
    converts it once through a restricted unpickler (:mod:`orchestrator.teachers.feature_files`).

    Ids are compared as strings. Rows are L2-normalised. ``encode(positions)`` needs :meth:`bind`.
    """

    inputs: ClassVar[Inputs] = "index"
    cacheable: ClassVar[bool] = False

    def __init__(self, spec: str, path: Path, **kwargs: Any) -> None:
        super().__init__(spec, "image", **kwargs)
        self.path = Path(path)
        self._image_ids: list[str] | None = None

    def _weights_digest(self) -> str:
        return files_digest([("features", self.path)], self._memo)

    @property
    def preprocessing(self) -> str:
        return "precomputed features, rows L2-normalised"

    def _load(self) -> tuple[dict[str, int], np.ndarray]:
        """(id -> row, float32 (N, D) unit rows); ``UserError`` for a pickled ``.npy`` or non-finite rows."""
        from orchestrator.teachers.feature_files import read_features_file

        path = self.path
        ids, feats = read_features_file(path, field="teachers.image")
        lookup: dict[str, int] = {}
        for row, image_id in enumerate(ids):
            lookup.setdefault(image_id, row)
        log.info("loaded %d precomputed image features (D=%d) from %s", len(ids), feats.shape[1], path)
        return lookup, l2_normalise(feats)

    @property
    def dim(self) -> int:
        return int(self.load()._model[1].shape[1])

    def bind(self, index: DatasetIndex) -> FileFeatureTeacher:
        bound = copy.copy(self)
        bound._image_ids = list(index.image_ids)
        return bound

    def lookup_ids(self, image_ids: Sequence[str]) -> np.ndarray:
        """float32 (len(image_ids), D) by id; ``UserError`` naming the file and the first missing id."""
        table, feats = self.load()._model
        rows = [table.get(str(i), -1) for i in image_ids]
        missing = [i for i, r in zip(image_ids, rows) if r < 0]
        if missing:
            raise UserError(
                f"no features for image id {missing[0]!r} ({len(missing)} of {len(rows)} ids missing)",
                path=str(self.path),
                field="teachers.image",
            )
        return feats[np.asarray(rows, dtype=np.int64)]

    def encode(self, items: Sequence[int]) -> np.ndarray:
        """Image positions (N,) in the bound split -> float32 (N, D)."""
        if self._image_ids is None:
            raise RuntimeError("FileFeatureTeacher.encode needs bind(index) first")
        return self.lookup_ids([self._image_ids[int(p)] for p in items])


@register_teacher("file", "image", forms=("file:<features>",))
def build_feature_file(request: TeacherRequest) -> FileFeatureTeacher:
    """``file:<path>``: the features file must exist (relative paths: to the working folder)."""
    path = existing_file(request.value, "teacher features file", request.field)
    return FileFeatureTeacher(request.spec, path, **request.options)
