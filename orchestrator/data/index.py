"""One in-memory index for every dataset format: images, captions, caption -> image, image -> captions."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from orchestrator.data.images import check_image_file, open_failure, to_rgb
from orchestrator.errors import UserError

#: Renders image ``i`` of a generated dataset (no file on disk).
ImageRenderer = Callable[[int], Image.Image]
#: Graded relevance of images to captions: (image indices (n,), caption indices (m,)) -> float (n, m) in [0, 1].
RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class DatasetIndex:
    """A split of an image–caption dataset.

    ``image_ids`` are unique (one entry per image); ``caption_image[c]`` is the index into ``image_ids`` of
    caption ``c``'s image. Any number (>= 1) of captions per image. Images come either from files
    (``image_paths``) or from a ``renderer`` (generated data). ``relevance`` is set where the dataset knows
    the graded relevance of every (image, caption) pair (the synthetic data does).
    """

    name: str
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray
    image_paths: list[Path] | None = None
    renderer: ImageRenderer | None = None
    relevance: RelevanceFn | None = None
    caption_ids: list[str] | None = None
    source: str = ""
    _image_captions: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if (self.image_paths is None) == (self.renderer is None):
            raise ValueError("a DatasetIndex needs exactly one of image_paths or renderer")
        if self.image_paths is not None and len(self.image_paths) != len(self.image_ids):
            raise ValueError("image_paths and image_ids differ in length")
        if len(self.captions) != len(self.caption_image):
            raise ValueError("captions and caption_image differ in length")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("image_ids are not unique")
        if len(self.captions) == 0:
            raise UserError("no captions", path=self.source or self.name)
        order = np.argsort(self.caption_image, kind="stable")
        counts = np.bincount(self.caption_image, minlength=len(self.image_ids))
        if (counts == 0).any():
            missing = self.image_ids[int(np.flatnonzero(counts == 0)[0])]
            raise UserError(f"image {missing!r} has no caption", path=self.source or self.name)
        self._image_captions = np.split(order, np.cumsum(counts)[:-1])

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_of(self, image_index: int) -> np.ndarray:
        """Caption indices (int64, ascending) of image ``image_index``."""
        return self._image_captions[image_index]

    @property
    def captions_per_image(self) -> np.ndarray:
        """int64 (num_images,): how many captions each image has."""
        return np.bincount(self.caption_image, minlength=self.num_images)

    def load_image(self, image_index: int) -> Image.Image:
        """The 8-bit RGB image ``image_index`` (wide modes scaled by range: ``data.images.to_rgb``); a file that
        cannot be read raises ``UserError`` naming it."""
        if self.renderer is not None:
            return self.renderer(image_index)
        assert self.image_paths is not None
        path = self.image_paths[image_index]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except OSError as err:
            if isinstance(err.errno, int):  # the file itself: missing, a symlink loop, no permission
                raise UserError(open_failure(err), path=str(path)) from None
            raise UserError(f"cannot read image ({err.__class__.__name__}: {err})", path=str(path)) from None
        except ValueError as err:
            raise UserError(f"cannot read image ({err.__class__.__name__}: {err})", path=str(path)) from None

    def verify_images(self, mode: str = "header") -> None:
        """Fail before training on the first missing or unreadable image, naming the file.

        ``mode``: ``"exists"`` checks the files exist (a symlink loop is named as one); ``"header"`` also parses
        each image header (cheap; catches non-images); ``"full"`` decodes every image (catches truncated files); ``"none"``.
        """
        if self.image_paths is None or mode == "none":
            return
        for path in self.image_paths:
            problem = check_image_file(path)
            if problem is not None:
                raise UserError(problem, path=str(path))
            if mode == "exists":
                continue
            try:
                with Image.open(path) as img:
                    if mode == "full":
                        img.load()
                    else:
                        img.verify()
            except Exception as err:  # PIL raises many types for bad files
                raise UserError(f"not a readable image ({err.__class__.__name__}: {err})", path=str(path)) from None

    def content_hash(self) -> str:
        """A hash of the split's content: image ids, image sources and captions (in order)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        for image_id in self.image_ids:
            h.update(image_id.encode() + b"\0")
        if self.image_paths is not None:
            for path in self.image_paths:
                h.update(str(path).encode() + b"\0")
        for caption, image in zip(self.captions, self.caption_image.tolist()):
            h.update(caption.encode() + b"\0" + str(image).encode() + b"\0")
        return h.hexdigest()[:16]

    def subset_images(self, image_indices: Sequence[int], name: str | None = None) -> "DatasetIndex":
        """A new index over the given images (in that order) and all their captions."""
        image_indices = [int(i) for i in image_indices]
        caption_lists = [self.captions_of(i) for i in image_indices]
        new_caption_image = np.concatenate(
            [np.full(len(c), k, dtype=np.int64) for k, c in enumerate(caption_lists)]
        )
        all_caps = np.concatenate(caption_lists)
        renderer = None
        if self.renderer is not None:
            base = self.renderer
            renderer = lambda i: base(image_indices[i])  # noqa: E731
        relevance = None
        if self.relevance is not None:
            base_rel = self.relevance
            img_map = np.asarray(image_indices, dtype=np.int64)
            relevance = lambda im, cap: base_rel(img_map[im], all_caps[cap])  # noqa: E731
        return DatasetIndex(
            name=name or f"{self.name}[subset]",
            image_ids=[self.image_ids[i] for i in image_indices],
            captions=[self.captions[c] for c in all_caps.tolist()],
            caption_image=new_caption_image,
            image_paths=None if self.image_paths is None else [self.image_paths[i] for i in image_indices],
            renderer=renderer,
            relevance=relevance,
            caption_ids=None if self.caption_ids is None else [self.caption_ids[c] for c in all_caps.tolist()],
            source=self.source,
        )
