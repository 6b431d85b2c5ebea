"""``synthetic:attributes``: an oracle teacher on both sides for the built-in synthetic shapes data."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.encoders.base import Inputs, Modality, TeacherEncoder, l2_normalise
from orchestrator.teachers.encoders.registry import TeacherRequest, register_teacher


#: Feature layout of ``synthetic:attributes`` (blocks, in order).
def _synthetic_layout() -> dict[str, tuple[int, int]]:
    from orchestrator.data.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

    ns, nc, nz, np_, nb = len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS), len(BACKGROUNDS)
    sizes = {
        "shape": ns,
        "colour": nc,
        "size": nz,
        "position": np_,
        "shape*colour": ns * nc,
        "shape*size": ns * nz,
        "shape*position": ns * np_,
        "background": nb,
    }
    layout, offset = {}, 0
    for name, n in sizes.items():
        layout[name] = (offset, n)
        offset += n
    return layout


def _synthetic_source(index: DatasetIndex) -> tuple[Any, np.ndarray, np.ndarray]:
    """(SyntheticData, image map (num_images,), caption map (num_captions,)) of a synthetic split or a
    subset of one (``subset_images``, e.g. ``data.max_train_images``); ``UserError`` for other data."""
    from orchestrator.data.synthetic import SyntheticData, synthetic_data

    n_img, n_cap = index.num_images, index.num_captions
    try:
        return synthetic_data(index), np.arange(n_img), np.arange(n_cap)
    except ValueError:
        pass
    # A subset: follow the relevance closures of DatasetIndex.subset_images down to the SyntheticData.
    img_map, cap_map = np.arange(n_img), np.arange(n_cap)
    rel: Any = index.relevance  # a bound method or a closure of DatasetIndex.subset_images
    try:
        for _ in range(64):
            owner = getattr(rel, "__self__", None)
            if isinstance(owner, SyntheticData):
                if len(img_map) != n_img or len(cap_map) != n_cap:
                    break
                return owner, img_map, cap_map
            cells = dict(zip(rel.__code__.co_freevars, (c.cell_contents for c in rel.__closure__ or ())))
            img_map = np.asarray(cells["img_map"])[img_map]
            cap_map = np.asarray(cells["all_caps"])[cap_map]
            rel = cells["base_rel"]
    except (AttributeError, KeyError, TypeError, IndexError):
        pass
    raise UserError(
        f"synthetic:attributes is an oracle for the built-in synthetic data only; split "
        f"{index.name!r} is not synthetic",
        field="teachers",
    )


class SyntheticAttributeTeacher(TeacherEncoder):
    """``synthetic:attributes``: an oracle teacher for the built-in synthetic shapes data.

    Both sides live in one 86-d space of multi-hot blocks: shape (5), colour (6), size (2), position (5),
    the conjunctions shape x colour (30), shape x size (10), shape x position (25), and background (3).
    An image sets every attribute of each of its objects (and their conjunctions) plus its background;
    a caption sets only what it states (the shape always; colour, size, position and background where
    stated, with the conjunctions of the stated ones). Rows are L2-normalised, so cos(image, caption) is
    high when everything the caption states is true of the image. ``encode(positions)`` needs :meth:`bind`.
    """

    inputs: ClassVar[Inputs] = "index"

    def __init__(self, spec: str, modality: Modality, **kwargs: Any) -> None:
        super().__init__(spec, modality, **kwargs)
        self._data: Any = None
        self._map: np.ndarray | None = None

    VERSION: ClassVar[str] = "attributes-v1"

    def _weights_digest(self) -> str:
        return hashlib.sha256(f"{self.VERSION}:{sorted(_synthetic_layout().items())}".encode()).hexdigest()

    @property
    def preprocessing(self) -> str:
        return f"{self.VERSION}: multi-hot {list(_synthetic_layout())}, rows L2-normalised"

    @property
    def dim(self) -> int:
        return sum(n for _, n in _synthetic_layout().values())

    def _load(self) -> Any:
        return True  # nothing to load

    def bind(self, index: DatasetIndex) -> SyntheticAttributeTeacher:
        data, img_map, cap_map = _synthetic_source(index)
        bound = copy.copy(self)
        bound._data = data
        bound._map = img_map if self.modality == "image" else cap_map
        return bound

    def encode(self, items: Sequence[int]) -> np.ndarray:
        """Positions (N,) in the bound split (images or captions, by ``modality``) -> float32 (N, 86)."""
        if self._data is None or self._map is None:
            raise RuntimeError("SyntheticAttributeTeacher.encode needs bind(index) first")
        from orchestrator.data.synthetic import COLOURS, POSITIONS, SIZES

        d = self._data
        rows = self._map[np.asarray(items, dtype=np.int64)]
        if self.modality == "image":
            shape, colour, size, pos, bg = d.obj_shape, d.obj_colour, d.obj_size, d.obj_position, d.background
        else:
            shape, colour, size, pos, bg = d.cap_shape, d.cap_colour, d.cap_size, d.cap_position, d.cap_background
        lay = _synthetic_layout()
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        ar = np.arange(len(rows))

        def put(block: str, code: np.ndarray, ok: np.ndarray) -> None:
            off, _ = lay[block]
            out[ar[ok], off + code[ok].astype(np.int64)] = 1.0

        for k in range(2):
            s, c, z, p = (a[rows, k].astype(np.int64) for a in (shape, colour, size, pos))
            has = s >= 0
            put("shape", s, has)
            put("colour", c, has & (c >= 0))
            put("size", z, has & (z >= 0))
            put("position", p, has & (p >= 0))
            put("shape*colour", s * len(COLOURS) + c, has & (c >= 0))
            put("shape*size", s * len(SIZES) + z, has & (z >= 0))
            put("shape*position", s * len(POSITIONS) + p, has & (p >= 0))
        b = bg[rows].astype(np.int64)
        put("background", b, b >= 0)
        return l2_normalise(out)


@register_teacher("synthetic", "image", "text", forms=("synthetic:attributes",))
def build_synthetic(request: TeacherRequest) -> SyntheticAttributeTeacher:
    """``synthetic:attributes`` (the only synthetic teacher), on either side."""
    if request.value != "attributes":
        raise UserError(
            f"unknown synthetic teacher {request.value!r} (known: synthetic:attributes)", field=request.field
        )
    return SyntheticAttributeTeacher(request.spec, request.modality, **request.options)
