"""Per-query ranks of a final evaluation: the artifact a paired bootstrap between two settings is computed from.

One ``.npz`` (``np.savez``, no pickled objects) with the arrays

* ``i2t``: (N,) int64, the 1-based image->text rank of each image's best-ranked ground-truth caption;
* ``t2i``: (M,) int64, the 1-based text->image rank of each caption's image;
* ``text_image``: (M,) int64, the row in ``[0, N)`` of each caption's image;
* ``image_ids``: (N,) str, the evaluation images' ids (what two settings are matched on);
* ``ks``: (K,) int64, the K of the evaluation's Recall@K;
* ``version``: () int64, the file format (1).

The ranks are those of ``orchestrator.evaluation.recall.ranks`` (ties count against the model). A file is about
``8 (N + 2M)`` bytes plus the ids: 0.5 MB for COCO 5K.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "QueryRanks"]

FORMAT_VERSION = 1
_KEYS = ("i2t", "t2i", "text_image", "image_ids", "ks", "version")


def _int_array(name: str, value: object, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: {name} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class QueryRanks:
    """Per-query ranks of one evaluation (see the module docstring for the arrays and their shapes).

    Constructed through :meth:`create` (or :meth:`read`), which validates the arrays; direct construction
    trusts them."""

    i2t: np.ndarray
    t2i: np.ndarray
    text_image: np.ndarray
    image_ids: np.ndarray
    ks: tuple[int, ...]

    @property
    def n_images(self) -> int:
        return int(self.i2t.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.t2i.shape[0])

    @classmethod
    def create(
        cls,
        i2t: np.ndarray | Sequence[int],
        t2i: np.ndarray | Sequence[int],
        text_image: np.ndarray | Sequence[int],
        image_ids: np.ndarray | Sequence[str],
        ks: np.ndarray | Sequence[int] = (1, 5, 10),
        *,
        where: str = "query ranks",
    ) -> QueryRanks:
        """Validated ranks: (N,) ``i2t`` in [1, M], (M,) ``t2i`` in [1, N], (M,) ``text_image`` in [0, N) with
        every image captioned, (N,) unique string ``image_ids``, positive ``ks``.

        Raises:
            ValueError: naming ``where`` (the file, on :meth:`read`) and what is wrong.
        """
        r_i2t = _int_array("i2t", i2t, where)
        r_t2i = _int_array("t2i", t2i, where)
        ti = _int_array("text_image", text_image, where)
        ids = np.asarray(image_ids)
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise ValueError(f"{where}: image_ids must be a 1-D str array, got dtype {ids.dtype} shape {ids.shape}")
        k_arr = np.asarray(ks)
        if k_arr.ndim != 1 or k_arr.size == 0 or k_arr.dtype.kind not in "iu" or bool((k_arr < 1).any()):
            raise ValueError(f"{where}: ks must be a non-empty list of positive ints, got {k_arr.tolist()!r}")
        n, m = r_i2t.shape[0], r_t2i.shape[0]
        if n == 0 or m == 0:
            raise ValueError(f"{where}: needs at least one image and one caption, got N={n}, M={m}")
        if ids.shape[0] != n:
            raise ValueError(f"{where}: image_ids has {ids.shape[0]} entries for N={n} images (i2t)")
        if ti.shape[0] != m:
            raise ValueError(f"{where}: text_image has {ti.shape[0]} entries for M={m} captions (t2i)")
        if int(ti.min()) < 0 or int(ti.max()) >= n:
            raise ValueError(f"{where}: text_image values must lie in [0, {n}), got [{ti.min()}, {ti.max()}]")
        if bool((np.bincount(ti, minlength=n) == 0).any()):
            raise ValueError(f"{where}: every image needs at least one caption in text_image")
        for name, r, top in (("i2t", r_i2t, m), ("t2i", r_t2i, n)):
            if int(r.min()) < 1 or int(r.max()) > top:
                raise ValueError(f"{where}: {name} ranks must lie in [1, {top}], got [{r.min()}, {r.max()}]")
        if np.unique(ids).size != n:
            raise ValueError(f"{where}: image_ids are not unique")
        return cls(r_i2t, r_t2i, ti, ids, tuple(int(k) for k in k_arr))

    def write(self, path: str | Path) -> Path:
        """Write the ``.npz`` to exactly ``path`` (no suffix added), atomically (temp file beside it, then
        rename); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    i2t=self.i2t.astype(np.int64),
                    t2i=self.t2i.astype(np.int64),
                    text_image=self.text_image.astype(np.int64),
                    image_ids=self.image_ids.astype(str),
                    ks=np.asarray(self.ks, dtype=np.int64),
                    version=np.int64(FORMAT_VERSION),
                )
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def read(cls, path: str | Path) -> QueryRanks:
        """Load and validate a file written by :meth:`write` (``allow_pickle=False``).

        Raises:
            ValueError: naming the file, when it is not such an ``.npz`` (unreadable, missing or extra arrays,
                wrong shapes, dtypes or values, another format version).
            FileNotFoundError: no such file.
        """
        where = f"query ranks file {path}"
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(f"{where}: not an .npz archive (a bare .npy array)")
            with data:
                arrays = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as err:
            if str(err).startswith(where):
                raise
            raise ValueError(f"{where}: cannot be read as an .npz of query ranks ({err})") from None
        if set(arrays) != set(_KEYS):
            missing, extra = sorted(set(_KEYS) - set(arrays)), sorted(set(arrays) - set(_KEYS))
            raise ValueError(f"{where}: expected arrays {list(_KEYS)}; missing {missing}, unexpected {extra}")
        version = arrays["version"]
        if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
            raise ValueError(f"{where}: format version {version!r}, expected {FORMAT_VERSION}")
        return cls.create(
            arrays["i2t"], arrays["t2i"], arrays["text_image"], arrays["image_ids"], arrays["ks"], where=where
        )
