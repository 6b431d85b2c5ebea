"""Built-in synthetic dataset: images of coloured shapes with templated captions (no download).

Every image holds 1 or 2 objects on a plain background. Each object has

* a shape: circle, square, triangle, star, cross (5);
* a colour: red, green, blue, yellow, purple, orange (6, clearly distinct RGB);
* a size: small, large;
* a position: left, right, top, bottom, centre (a 2-object image puts its objects at opposite sides:
  left/right or top/bottom, in either order, so they never overlap);

and the image has a background colour: black, gray, white (3). The two objects of an image always differ
in (shape, colour). The space is small on purpose: with 1000 images, dozens of images share each
(shape, colour) and many share a full description, so "negatives" that are in fact true matches exist,
which the graded :func:`relevance <SyntheticData.relevance>` reports.

Images are rendered lazily with ``PIL.ImageDraw`` from the stored attributes, with a small deterministic
per-object jitter of position (about +-4 % of the side) and size (+-10 %), so images with the same
description are not pixel-identical. Captions mention a subset of the attributes: the shape always, the
colour usually, size / position / background sometimes; a 2-object image's caption names one or both
objects. Everything is deterministic given ``(seed, split)``; different splits draw from different
random streams.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

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
#: Ordered position pairs of 2-object images (opposite sides, no overlap).
_PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2))
_JITTER_XY = 0.04
_JITTER_SCALE = 0.10

#: Attribute codes of an unstated caption attribute (never equal to an image code, which are >= -1).
_UNSTATED = -2
#: Probabilities that a caption states an object's colour / size / position, the background, and (for a
#: 2-object image) both objects.
_P_COLOUR, _P_SIZE, _P_POSITION, _P_BACKGROUND, _P_BOTH = 0.85, 0.3, 0.25, 0.3, 0.55

_POSITION_PHRASES = {
    "left": ("on the left", "to the left"),
    "right": ("on the right", "to the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
_PREFIXES = ("", "a picture of ", "an image of ", "there is ", "a photo showing ")
_JOINERS = (" and ", " together with ", " as well as ")
_BG_SUFFIXES = (" on {} background", " against {} background", " with {} background")


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


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _stream(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8"))]))


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


def _object_phrase(shape: int, colour: int, size: int, position: int, rng: np.random.Generator) -> str:
    words = []
    if size >= 0:
        words.append(SIZES[size])
    if colour >= 0:
        words.append(COLOUR_NAMES[colour])
    words.append(SHAPES[shape])
    phrase = " ".join(words)
    if position >= 0:
        options = _POSITION_PHRASES[POSITIONS[position]]
        phrase += " " + options[int(rng.integers(len(options)))]
    return _article(phrase)


def _caption_text(spec: dict[str, Any], rng: np.random.Generator) -> str:
    objects = [_object_phrase(*o, rng) for o in spec["objects"]]
    body = objects[0] if len(objects) == 1 else _JOINERS[int(rng.integers(len(_JOINERS)))].join(objects)
    bg = spec["background"]
    if bg < 0:
        return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + body
    bg_phrase = _article(BACKGROUND_NAMES[bg])
    if rng.random() < 0.3:
        return f"{bg_phrase} background with {body}"
    suffix = _BG_SUFFIXES[int(rng.integers(len(_BG_SUFFIXES)))].format(bg_phrase)
    return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + body + suffix


def _draw_caption_spec(data: SyntheticData, i: int, rng: np.random.Generator) -> dict[str, Any]:
    n_obj = 1 if data.obj_shape[i, 1] < 0 else 2
    if n_obj == 1:
        slots = [0]
    elif rng.random() < _P_BOTH:
        slots = [0, 1] if rng.random() < 0.5 else [1, 0]
    else:
        slots = [int(rng.integers(2))]
    objects = []
    for k in slots:
        objects.append(
            (
                int(data.obj_shape[i, k]),
                int(data.obj_colour[i, k]) if rng.random() < _P_COLOUR else _UNSTATED,
                int(data.obj_size[i, k]) if rng.random() < _P_SIZE else _UNSTATED,
                int(data.obj_position[i, k]) if rng.random() < _P_POSITION else _UNSTATED,
            )
        )
    background = int(data.background[i]) if rng.random() < _P_BACKGROUND else _UNSTATED
    return {"objects": objects, "background": background}


def build_synthetic_split(
    split: str,
    *,
    num_images: int,
    seed: int = 0,
    image_size: int = 64,
    captions_per_image: tuple[int, int] = (2, 5),
) -> DatasetIndex:
    """A synthetic split of ``num_images`` shape images with ``captions_per_image`` (inclusive range,
    drawn uniformly per image) templated captions each; deterministic given ``(seed, split)``.

    The index renders images on demand (``renderer``) and knows the graded relevance of every pair
    (``relevance``; see :meth:`SyntheticData.relevance`). Image ids are ``synthetic-{split}-{i:06d}``,
    caption ids ``{image_id}#{k}``.
    """
    if not isinstance(split, str) or not split:
        raise UserError(f"split must be a non-empty string, got {split!r}", field="split")
    if int(num_images) < 1:
        raise UserError(f"num_images must be >= 1, got {num_images}", field="num_images")
    if int(seed) < 0:
        raise UserError(f"seed must be >= 0, got {seed}", field="seed")
    if int(image_size) < 8:
        raise UserError(f"image_size must be >= 8, got {image_size}", field="image_size")
    lo_caps, hi_caps = (int(v) for v in captions_per_image)
    if not 1 <= lo_caps <= hi_caps:
        raise UserError(
            f"captions_per_image must be (lo, hi) with 1 <= lo <= hi, got {captions_per_image}",
            field="captions_per_image",
        )
    n = int(num_images)
    rng = _stream(seed, split)
    data = SyntheticData(image_size)

    # ---- image attributes (vectorised)
    two = rng.random(n) < 0.5
    n_combos = len(SHAPES) * len(COLOURS)
    combo0 = rng.integers(0, n_combos, size=n)
    combo1 = rng.integers(0, n_combos - 1, size=n)
    combo1 += combo1 >= combo0  # a different (shape, colour) from object 0
    sizes = rng.integers(0, len(SIZES), size=(n, 2))
    single_pos = rng.integers(0, len(POSITIONS), size=n)
    pair = np.asarray(_PAIRS)[rng.integers(0, len(_PAIRS), size=n)]
    background = rng.integers(0, len(BACKGROUNDS), size=n)
    jitter = np.empty((n, 2, 3), dtype=np.float64)
    jitter[..., :2] = rng.uniform(-_JITTER_XY, _JITTER_XY, size=(n, 2, 2))
    jitter[..., 2] = rng.uniform(1 - _JITTER_SCALE, 1 + _JITTER_SCALE, size=(n, 2))

    combos = np.stack([combo0, np.where(two, combo1, -1)], axis=1)
    present = combos >= 0
    data.obj_shape = np.where(present, combos // len(COLOURS), -1).astype(np.int8)
    data.obj_colour = np.where(present, combos % len(COLOURS), -1).astype(np.int8)
    data.obj_size = np.where(present, sizes, -1).astype(np.int8)
    positions = np.where(two[:, None], pair, np.stack([single_pos, np.full(n, -1)], axis=1))
    data.obj_position = positions.astype(np.int8)
    data.background = background.astype(np.int8)
    jitter[~present] = 0.0
    data.jitter = jitter

    # ---- captions
    counts = rng.integers(lo_caps, hi_caps + 1, size=n)
    captions: list[str] = []
    caption_image: list[int] = []
    caption_ids: list[str] = []
    specs: list[dict[str, Any]] = []
    image_ids = [f"synthetic-{split}-{i:06d}" for i in range(n)]
    for i in range(n):
        seen: set[str] = set()
        for k in range(int(counts[i])):
            for _attempt in range(6):  # prefer distinct captions for one image
                spec = _draw_caption_spec(data, i, rng)
                text = _caption_text(spec, rng)
                if text not in seen:
                    break
            seen.add(text)
            captions.append(text)
            caption_image.append(i)
            caption_ids.append(f"{image_ids[i]}#{k}")
            specs.append(spec)

    m = len(captions)
    cap = np.full((4, m, 2), _UNSTATED, dtype=np.int8)
    cap_bg = np.full(m, _UNSTATED, dtype=np.int8)
    for c, spec in enumerate(specs):
        for k, obj in enumerate(spec["objects"]):
            cap[:, c, k] = obj
        cap_bg[c] = spec["background"]
    data.cap_shape, data.cap_colour, data.cap_size, data.cap_position = cap
    data.cap_background = cap_bg
    data.cap_stated = ((cap >= 0).sum(axis=(0, 2)) + (cap_bg >= 0)).astype(np.int8)

    return DatasetIndex(
        name=f"synthetic/{split}",
        image_ids=image_ids,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        renderer=data.render,
        relevance=data.relevance,
        caption_ids=caption_ids,
        source="synthetic",
    )


def synthetic_data(index: DatasetIndex) -> SyntheticData:
    """The :class:`SyntheticData` behind an index built by :func:`build_synthetic_split` (not a subset)."""
    data = getattr(index.renderer, "__self__", None)
    if not isinstance(data, SyntheticData):
        raise ValueError(f"{index.name!r} is not a synthetic split built by build_synthetic_split")
    return data


def describe_attributes(index: DatasetIndex, image_index: int) -> dict[str, Any]:
    """Image ``image_index``'s attributes (names) and its captions with what each states, for debugging."""
    data = synthetic_data(index)
    record = data.image_record(int(image_index))
    record["image_id"] = index.image_ids[int(image_index)]
    record["captions"] = [
        {"text": index.captions[c], "states": data.caption_record(int(c))}
        for c in index.captions_of(int(image_index)).tolist()
    ]
    return record


def describe_caption(index: DatasetIndex, caption_index: int) -> dict[str, Any]:
    """What caption ``caption_index`` states (names, ``None`` where not stated)."""
    return synthetic_data(index).caption_record(int(caption_index))


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SyntheticData",
    "build_synthetic_split",
    "describe_attributes",
    "describe_caption",
    "synthetic_data",
]
