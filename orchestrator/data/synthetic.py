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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.data.synthetic_scene import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SyntheticData,
)
from orchestrator.errors import UserError

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


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _stream(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8"))]))


#: One object a caption mentions: (shape, colour, size, position) codes, ``_UNSTATED`` where not stated.
_ObjectSpec = tuple[int, int, int, int]


@dataclass(frozen=True)
class _CaptionSpec:
    """What one caption states: the objects it mentions (1 or 2, in mention order) and the background code
    (``_UNSTATED`` where not stated)."""

    objects: list[_ObjectSpec]
    background: int


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


def _caption_text(spec: _CaptionSpec, rng: np.random.Generator) -> str:
    objects = [_object_phrase(*o, rng) for o in spec.objects]
    body = objects[0] if len(objects) == 1 else _JOINERS[int(rng.integers(len(_JOINERS)))].join(objects)
    bg = spec.background
    if bg < 0:
        return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + body
    bg_phrase = _article(BACKGROUND_NAMES[bg])
    if rng.random() < 0.3:
        return f"{bg_phrase} background with {body}"
    suffix = _BG_SUFFIXES[int(rng.integers(len(_BG_SUFFIXES)))].format(bg_phrase)
    return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + body + suffix


def _draw_caption_spec(data: SyntheticData, i: int, rng: np.random.Generator) -> _CaptionSpec:
    n_obj = 1 if data.obj_shape[i, 1] < 0 else 2
    if n_obj == 1:
        slots = [0]
    elif rng.random() < _P_BOTH:
        slots = [0, 1] if rng.random() < 0.5 else [1, 0]
    else:
        slots = [int(rng.integers(2))]
    objects: list[_ObjectSpec] = []
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
    return _CaptionSpec(objects=objects, background=background)


def _validated_caption_range(
    split: str, num_images: int, seed: int, image_size: int, captions_per_image: tuple[int, int]
) -> tuple[int, int]:
    """Check :func:`build_synthetic_split`'s arguments (:class:`UserError` naming the field); the
    ``(lo, hi)`` captions-per-image range as ints."""
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
    return lo_caps, hi_caps


def _draw_image_attributes(data: SyntheticData, n: int, rng: np.random.Generator) -> None:
    """Draw (vectorised) the objects, background and jitter of ``n`` images into ``data``'s image arrays."""
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


@dataclass
class _DrawnCaptions:
    """The captions of a split, in order: text, image index, id and what each states."""

    texts: list[str] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    specs: list[_CaptionSpec] = field(default_factory=list)


def _draw_captions(
    data: SyntheticData, image_ids: list[str], caption_range: tuple[int, int], rng: np.random.Generator
) -> _DrawnCaptions:
    """Draw ``caption_range`` (inclusive, uniform per image) captions for every image of ``data``, preferring
    distinct texts within one image; caption ``k`` of image ``i`` has id ``{image_ids[i]}#{k}``."""
    n = len(image_ids)
    counts = rng.integers(caption_range[0], caption_range[1] + 1, size=n)
    drawn = _DrawnCaptions()
    for i in range(n):
        seen: set[str] = set()
        for k in range(int(counts[i])):
            for _attempt in range(6):  # prefer distinct captions for one image
                spec = _draw_caption_spec(data, i, rng)
                text = _caption_text(spec, rng)
                if text not in seen:
                    break
            seen.add(text)
            drawn.texts.append(text)
            drawn.image.append(i)
            drawn.ids.append(f"{image_ids[i]}#{k}")
            drawn.specs.append(spec)
    return drawn


def _store_caption_attributes(data: SyntheticData, specs: list[_CaptionSpec]) -> None:
    """Fill ``data``'s caption arrays (``cap_*``, (len(specs), 2) int8 and ``cap_background``, ``cap_stated``
    (len(specs),) int8) from the captions' statements."""
    m = len(specs)
    cap = np.full((4, m, 2), _UNSTATED, dtype=np.int8)
    cap_bg = np.full(m, _UNSTATED, dtype=np.int8)
    for c, spec in enumerate(specs):
        for k, obj in enumerate(spec.objects):
            cap[:, c, k] = obj
        cap_bg[c] = spec.background
    data.cap_shape, data.cap_colour, data.cap_size, data.cap_position = cap
    data.cap_background = cap_bg
    data.cap_stated = ((cap >= 0).sum(axis=(0, 2)) + (cap_bg >= 0)).astype(np.int8)


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
    caption_range = _validated_caption_range(split, num_images, seed, image_size, captions_per_image)
    n = int(num_images)
    rng = _stream(seed, split)  # one stream, drawn in a fixed order: image attributes, then captions
    data = SyntheticData(image_size)
    _draw_image_attributes(data, n, rng)
    image_ids = [f"synthetic-{split}-{i:06d}" for i in range(n)]
    drawn = _draw_captions(data, image_ids, caption_range, rng)
    _store_caption_attributes(data, drawn.specs)
    return DatasetIndex(
        name=f"synthetic/{split}",
        image_ids=image_ids,
        captions=drawn.texts,
        caption_image=np.asarray(drawn.image, dtype=np.int64),
        renderer=data.render,
        relevance=data.relevance,
        caption_ids=drawn.ids,
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
