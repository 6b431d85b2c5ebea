"""One in-memory, columnar index for every dataset format: images, captions, caption -> image, image -> captions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.data.columns import PackedStrings, PathColumn, as_packed, as_path_column
from orchestrator.data.images import load_rgb
from orchestrator.data.manifest import VerifyReport, verify_image_files
from orchestrator.errors import UserError

#: Renders image ``i`` of a generated dataset (no file on disk).
ImageRenderer = Callable[[int], Image.Image]
#: Graded relevance of images to captions: (image indices (n,), caption indices (m,)) -> float (n, m) in [0, 1].
RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class DatasetIndex:
    """A split of an image–caption dataset, held as columns (no Python object per record).

    ``image_ids`` are unique (one entry per image); ``caption_image[c]`` (int64) is the index into ``image_ids`` of
    caption ``c``'s image. Any number (>= 1) of captions per image. Images come either from files
    (``image_paths``) or from a ``renderer`` (generated data). ``relevance`` is set where the dataset knows
    the graded relevance of every (image, caption) pair (the synthetic data does).

    Callers may pass plain lists; they are stored as :class:`~orchestrator.data.columns.PackedStrings`
    (``image_ids``, ``captions``, ``caption_ids``: ``[i]`` -> ``str``, ``[a:b]`` -> ``list[str]``) and
    ``image_paths`` as a :class:`~orchestrator.data.columns.PathColumn` (``[i]`` -> ``Path``: the root joined to
    the normalised relative path, not resolved). ``captions_of`` reads a CSR array: the caption indices sorted by
    image (``_caption_order``, int64 (num_captions,)) and each image's start in it (``_image_offsets``, int64
    (num_images + 1,)). About 16 bytes per caption and 8 per image besides the text (``column_nbytes``).
    """

    name: str
    image_ids: Sequence[str]
    captions: Sequence[str]
    caption_image: np.ndarray
    image_paths: Sequence[Path] | None = None
    renderer: ImageRenderer | None = None
    relevance: RelevanceFn | None = None
    caption_ids: Sequence[str] | None = None
    source: str = ""
    _caption_order: np.ndarray = field(init=False, repr=False)
    _image_offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids_given = self.image_ids
        self.image_ids = as_packed(ids_given)
        self.captions = as_packed(self.captions)
        if self.caption_ids is not None:
            self.caption_ids = as_packed(self.caption_ids)
        if self.image_paths is not None:
            self.image_paths = as_path_column(self.image_paths)
        self.caption_image = np.array(self.caption_image, dtype=np.int64).reshape(-1)  # the index's own copy
        if (self.image_paths is None) == (self.renderer is None):
            raise ValueError("a DatasetIndex needs exactly one of image_paths or renderer")
        n_img = len(self.image_ids)
        if self.image_paths is not None and len(self.image_paths) != n_img:
            raise ValueError("image_paths and image_ids differ in length")
        if len(self.captions) != len(self.caption_image):
            raise ValueError("captions and caption_image differ in length")
        if self.caption_ids is not None and len(self.caption_ids) != len(self.captions):
            raise ValueError("caption_ids and captions differ in length")
        if len(set(ids_given if isinstance(ids_given, (list, tuple)) else self.image_ids)) != n_img:
            raise ValueError("image_ids are not unique")
        if len(self.captions) == 0:
            raise UserError("no captions", path=self.source or self.name)
        ci = self.caption_image
        if ci.min() < 0 or ci.max() >= n_img:
            raise ValueError(f"caption_image values must lie in [0, {n_img})")
        counts = np.bincount(ci, minlength=n_img)
        if (counts == 0).any():
            missing = self.image_ids[int(np.flatnonzero(counts == 0)[0])]
            raise UserError(f"image {missing!r} has no caption", path=self.source or self.name)
        if ci.size < 2 or (ci[1:] >= ci[:-1]).all():  # captions already grouped by image (the usual layout)
            order = np.arange(ci.size, dtype=np.int64)
        else:
            order = np.argsort(ci, kind="stable").astype(np.int64, copy=False)
        offsets = np.zeros(n_img + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        self._caption_order, self._image_offsets = order, offsets

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_of(self, image_index: int) -> np.ndarray:
        """Caption indices (int64 (k,), ascending; a view into the CSR order, do not write) of image
        ``image_index``."""
        i = int(image_index)
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"image index {i} out of range for {self.num_images} images")
        i %= self.num_images
        return self._caption_order[self._image_offsets[i] : self._image_offsets[i + 1]]

    @property
    def captions_per_image(self) -> np.ndarray:
        """int64 (num_images,): how many captions each image has."""
        return np.diff(self._image_offsets)

    def column_nbytes(self) -> dict[str, int]:
        """Bytes held per column (text buffers + offsets, int64 arrays); Python object headers not counted."""
        sizes = {
            "image_ids": as_packed(self.image_ids).nbytes,  # packed by __post_init__: as_packed returns it
            "captions": as_packed(self.captions).nbytes,
            "caption_image": self.caption_image.nbytes,
            "captions_of": self._caption_order.nbytes + self._image_offsets.nbytes,
        }
        if self.caption_ids is not None:
            sizes["caption_ids"] = as_packed(self.caption_ids).nbytes
        if isinstance(self.image_paths, PathColumn):
            sizes["image_paths"] = self.image_paths.nbytes
        return sizes

    def load_image(self, image_index: int) -> Image.Image:
        """The 8-bit RGB image ``image_index`` (wide modes scaled by range: ``data.images.to_rgb``); a file that
        cannot be read raises ``UserError`` naming it."""
        if self.renderer is not None:
            return self.renderer(image_index)
        assert self.image_paths is not None
        return load_rgb(self.image_paths[image_index])

    def verify_images(
        self, mode: str = "header", *, manifest_dir: Path | None = None, progress: bool = True
    ) -> VerifyReport:
        """Fail before training on the first missing or unreadable image, naming the file.

        ``mode``: ``"exists"`` checks the files exist (a symlink loop is named as one); ``"header"`` also parses
        each image header (cheap; catches non-images); ``"full"`` decodes every image (catches truncated files);
        ``"none"``.
        With ``manifest_dir`` the ``header``/``full`` checks are recorded there and files unchanged since their last
        check are not parsed again (``orchestrator.data.manifest``); without it every file is checked.
        """
        if self.image_paths is None:
            return VerifyReport(self.num_images, 0, 0, None)
        return verify_image_files(as_path_column(self.image_paths), mode, manifest_dir=manifest_dir, progress=progress)

    def content_hash(self) -> str:
        """A hash of the split's content: image ids, image sources and captions (in order); 16 hex.

        Computed over the packed columns (buffers and offsets), so it costs one pass over the bytes. Image
        sources enter as the path column's root and relative paths: the same files spelt with another root (an
        index built from a list of whole paths) hash differently, which can only cost a cache miss.
        """
        h = hashlib.sha256()
        h.update(b"itr-index-v2\0" + self.name.encode("utf-8", "surrogatepass") + b"\0")

        def packed(column: PackedStrings) -> None:
            h.update(len(column).to_bytes(8, "little"))
            h.update(column.offsets.tobytes())
            h.update(column.buffer)

        packed(as_packed(self.image_ids))  # the columns __post_init__ packed (as_packed returns them)
        if isinstance(self.image_paths, PathColumn):
            h.update(b"paths\0" + self.image_paths.root.encode("utf-8", "surrogatepass") + b"\0")
            packed(self.image_paths.relative)
        else:
            h.update(b"rendered\0")
        packed(as_packed(self.captions))
        h.update(self.caption_image.astype("<i8", copy=False).tobytes())
        return h.hexdigest()[:16]

    def subset_images(self, image_indices: Sequence[int], name: str | None = None) -> DatasetIndex:
        """A new index over the given images (in that order, no repeats) and all their captions."""
        idx = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_images or idx.max() >= self.num_images):
            raise IndexError(f"image indices out of range for {self.num_images} images")
        idx = idx % max(1, self.num_images)
        counts = self._image_offsets[idx + 1] - self._image_offsets[idx]
        starts = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        # caption positions: for image k, _caption_order[offsets[idx[k]] : ... + counts[k]], concatenated
        within = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], counts)
        all_caps = self._caption_order[np.repeat(self._image_offsets[idx], counts) + within]
        new_caption_image = np.repeat(np.arange(idx.size, dtype=np.int64), counts)
        image_list = idx.tolist()
        renderer = None
        if self.renderer is not None:
            base = self.renderer
            renderer = lambda i: base(image_list[i])  # noqa: E731
        relevance = None
        if self.relevance is not None:
            base_rel = self.relevance
            img_map = idx  # closure names read by teachers.encoders._synthetic_source
            relevance = lambda im, cap: base_rel(img_map[im], all_caps[cap])  # noqa: E731
        return DatasetIndex(  # the columns __post_init__ packed (as_packed / as_path_column return them)
            name=name or f"{self.name}[subset]",
            image_ids=as_packed(self.image_ids).take(idx),
            captions=as_packed(self.captions).take(all_caps),
            caption_image=new_caption_image,
            image_paths=None if self.image_paths is None else as_path_column(self.image_paths).take(idx),
            renderer=renderer,
            relevance=relevance,
            caption_ids=None if self.caption_ids is None else as_packed(self.caption_ids).take(all_caps),
            source=self.source,
        )
