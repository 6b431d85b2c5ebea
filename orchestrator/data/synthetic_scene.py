"""What a synthetic image and caption are (see :mod:`orchestrator.data.synthetic`): the attribute
vocabulary, and :class:`SyntheticData`, which holds a split's attribute arrays, renders its images and scores
(image, caption) relevance."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "orange": (255, 135, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

#: Radius of an object, as a fraction of the image side, by size index.
_SIZE_RADIUS = (0.13, 0.21)
#: Object centre (x, y), as fractions of the image side, by position index.
_POSITION_XY = ((0.27, 0.5), (0.73, 0.5), (0.5, 0.27), (0.5, 0.73), (0.5, 0.5))


def _unit_polygon(points: list[tuple[float, float]]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _star(n: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_W = 0.34  # half-width of a cross arm, relative to the radius
_UNIT_SHAPES: dict[str, np.ndarray] = {
    "square": _unit_polygon([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
    "triangle": _unit_polygon([(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]),
    "star": _star(),
    "cross": _unit_polygon(
        [
            (-_W, -1),
            (_W, -1),
            (_W, -_W),
            (1, -_W),
            (1, _W),
            (_W, _W),
            (_W, 1),
            (-_W, 1),
            (-_W, _W),
            (-1, _W),
            (-1, -_W),
            (-_W, -_W),
        ]
    ),
}


class SyntheticData:
    """The attributes of one synthetic split: renders images and scores (image, caption) relevance.

    Image arrays (``num_images`` rows, 2 object slots; slot 1 is ``-1`` everywhere for 1-object images):
    ``obj_shape``, ``obj_colour``, ``obj_size``, ``obj_position`` (int8, indices into ``SHAPES``, ...),
    ``background`` (int8, (num_images,)), ``jitter`` (float64 (num_images, 2, 3): dx, dy, scale).
    Caption arrays (``num_captions`` rows, 2 mentioned-object slots): ``cap_shape``, ``cap_colour``,
    ``cap_size``, ``cap_position`` (int8; ``-2`` where not stated, the whole slot ``-2`` where the caption
    mentions one object), ``cap_background`` (int8, ``-2`` where not stated), ``cap_stated`` (int8: how
    many attributes the caption states).
    """

    obj_shape: np.ndarray
    obj_colour: np.ndarray
    obj_size: np.ndarray
    obj_position: np.ndarray
    background: np.ndarray
    jitter: np.ndarray
    cap_shape: np.ndarray
    cap_colour: np.ndarray
    cap_size: np.ndarray
    cap_position: np.ndarray
    cap_background: np.ndarray
    cap_stated: np.ndarray

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)

    # ----------------------------------------------------------------------------------------- images
    def render(self, i: int) -> Image.Image:
        """The RGB image ``i`` (``image_size`` x ``image_size``), drawn from its attributes."""
        i = int(i)
        if not 0 <= i < len(self.background):
            raise IndexError(f"image index {i} out of range [0, {len(self.background)})")
        s = self.image_size
        img = Image.new("RGB", (s, s), BACKGROUNDS[BACKGROUND_NAMES[self.background[i]]])
        draw = ImageDraw.Draw(img)
        for k in range(2):
            shape = int(self.obj_shape[i, k])
            if shape < 0:
                break
            dx, dy, scale = self.jitter[i, k].tolist()
            px, py = _POSITION_XY[self.obj_position[i, k]]
            cx, cy = (px + dx) * s, (py + dy) * s
            r = _SIZE_RADIUS[self.obj_size[i, k]] * scale * s
            fill = COLOURS[COLOUR_NAMES[self.obj_colour[i, k]]]
            name = SHAPES[shape]
            if name == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                pts = _UNIT_SHAPES[name] * r + (cx, cy)
                draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
        return img

    def __call__(self, i: int) -> Image.Image:
        return self.render(i)

    # -------------------------------------------------------------------------------------- relevance
    def relevance(self, image_idx: np.ndarray, caption_idx: np.ndarray) -> np.ndarray:
        """Graded relevance, float32 ``(len(image_idx), len(caption_idx))`` in [0, 1].

        A caption states, for each object it mentions (1 or 2), the object's shape (always) and possibly
        its colour, size and position, and possibly the background colour. ``stated`` is the number of
        these statements. For image ``i`` and caption ``c``::

            match(k, j) = number of stated attributes of c's mentioned object k that equal the attributes
                          of i's object j (0 where i has no object j)
            best        = max over one-to-one assignments of c's mentioned objects to i's objects of the
                          summed match (a mentioned object left without an image object scores 0), i.e.
                          max(match(0,0) + match(1,1), match(0,1) + match(1,0))
            relevance   = (best + [c states the background and it equals i's background]) / stated

        So a caption is 1 for its own image and for every image of which all its statements are true
        (e.g. "a red circle" for every image holding a red circle), and partial credit otherwise.
        """
        image_idx = np.asarray(image_idx, dtype=np.int64).reshape(-1)
        caption_idx = np.asarray(caption_idx, dtype=np.int64).reshape(-1)
        n, m = len(image_idx), len(caption_idx)
        out = np.empty((n, m), dtype=np.float32)
        if n == 0 or m == 0:
            return out
        img_attrs = [a[image_idx] for a in (self.obj_shape, self.obj_colour, self.obj_size, self.obj_position)]
        cap_attrs = [a[caption_idx] for a in (self.cap_shape, self.cap_colour, self.cap_size, self.cap_position)]
        img_bg = self.background[image_idx]
        cap_bg = self.cap_background[caption_idx]
        inv_stated = (1.0 / self.cap_stated[caption_idx].astype(np.float32))[None, :]
        step = max(1, (1 << 22) // m)  # bound the temporaries to a few MB per block
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            match = {}
            for k in range(2):
                for j in range(2):
                    acc = np.zeros((hi - lo, m), dtype=np.uint8)
                    for ia, ca in zip(img_attrs, cap_attrs):
                        acc += ia[lo:hi, j, None] == ca[None, :, k]
                    match[k, j] = acc
            best = np.maximum(match[0, 0] + match[1, 1], match[0, 1] + match[1, 0])
            best += img_bg[lo:hi, None] == cap_bg[None, :]
            np.multiply(best, inv_stated, out=out[lo:hi])
        return out

    # ---------------------------------------------------------------------------------------- records
    def image_record(self, i: int) -> dict[str, Any]:
        """Image ``i``'s attributes as names: ``{"objects": [{"shape", "colour", "size", "position"}],
        "background"}``."""
        objects = []
        for k in range(2):
            if self.obj_shape[i, k] < 0:
                break
            objects.append(
                {
                    "shape": SHAPES[self.obj_shape[i, k]],
                    "colour": COLOUR_NAMES[self.obj_colour[i, k]],
                    "size": SIZES[self.obj_size[i, k]],
                    "position": POSITIONS[self.obj_position[i, k]],
                }
            )
        return {"objects": objects, "background": BACKGROUND_NAMES[self.background[i]]}

    def caption_record(self, c: int) -> dict[str, Any]:
        """Caption ``c``'s statements as names (``None`` where not stated): ``{"objects": [{"shape",
        "colour", "size", "position"}], "background"}``."""

        def name(table: tuple[str, ...], code: int) -> str | None:
            return None if code < 0 else table[code]

        objects = []
        for k in range(2):
            if self.cap_shape[c, k] < 0:
                break
            objects.append(
                {
                    "shape": SHAPES[self.cap_shape[c, k]],
                    "colour": name(COLOUR_NAMES, self.cap_colour[c, k]),
                    "size": name(SIZES, self.cap_size[c, k]),
                    "position": name(POSITIONS, self.cap_position[c, k]),
                }
            )
        return {"objects": objects, "background": name(BACKGROUND_NAMES, self.cap_background[c])}


__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_NAMES",
    "COLOURS",
    "COLOUR_NAMES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SyntheticData",
]
