"""The built-in synthetic shapes dataset: determinism, captions, rendering, graded relevance."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from orchestrator.data.index import DatasetIndex
from orchestrator.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    build_synthetic_split,
    describe_attributes,
    describe_caption,
    synthetic_data,
)
from orchestrator.errors import UserError


@pytest.fixture(scope="module")
def train() -> DatasetIndex:
    return build_synthetic_split("train", num_images=500, seed=0)


def _pixels(index: DatasetIndex, i: int) -> np.ndarray:
    return np.asarray(index.load_image(i))


def _naive_relevance(image: dict, caption: dict) -> float:
    """Fraction of the caption's statements true of the image, best one-to-one matching of objects."""
    attrs = ("shape", "colour", "size", "position")
    stated = sum(1 for o in caption["objects"] for a in attrs if o[a] is not None)
    stated += caption["background"] is not None
    slots = list(image["objects"]) + [None] * len(caption["objects"])  # None: no image object left
    best = 0
    for assignment in itertools.permutations(slots, len(caption["objects"])):
        true = 0
        for cap_obj, img_obj in zip(caption["objects"], assignment):
            if img_obj is None:
                continue
            true += sum(1 for a in attrs if cap_obj[a] is not None and cap_obj[a] == img_obj[a])
        best = max(best, true)
    bg = caption["background"] is not None and caption["background"] == image["background"]
    return (best + bg) / stated


def test_metadata(train: DatasetIndex) -> None:
    assert train.name == "synthetic/train"
    assert train.source == "synthetic"
    assert train.num_images == 500
    assert train.image_ids[0] == "synthetic-train-000000"
    assert train.image_ids[499] == "synthetic-train-000499"
    assert train.image_paths is None and train.renderer is not None and train.relevance is not None
    assert train.caption_ids is not None and len(set(train.caption_ids)) == train.num_captions


def test_deterministic() -> None:
    a = build_synthetic_split("val", num_images=60, seed=3)
    b = build_synthetic_split("val", num_images=60, seed=3)
    assert a.captions == b.captions
    assert np.array_equal(a.caption_image, b.caption_image)
    assert a.content_hash() == b.content_hash()
    for i in (0, 1, 17, 59):
        assert np.array_equal(_pixels(a, i), _pixels(b, i))
        assert np.array_equal(_pixels(a, i), _pixels(a, i))  # rendering twice is identical too
    cols = np.arange(a.num_captions)
    assert np.array_equal(a.relevance(np.arange(60), cols), b.relevance(np.arange(60), cols))


@pytest.mark.parametrize("other", [dict(split="val", seed=0), dict(split="test", seed=0), dict(split="train", seed=1)])
def test_different_seed_or_split_differs(other: dict) -> None:
    base = build_synthetic_split("train", num_images=50, seed=0)
    alt = build_synthetic_split(other["split"], num_images=50, seed=other["seed"])
    assert base.captions != alt.captions
    differing = sum(not np.array_equal(_pixels(base, i), _pixels(alt, i)) for i in range(10))
    assert differing >= 8


def test_caption_counts_in_range_and_irregular() -> None:
    index = build_synthetic_split("train", num_images=300, seed=0, captions_per_image=(2, 5))
    counts = index.captions_per_image
    assert counts.min() >= 2 and counts.max() <= 5
    assert set(counts.tolist()) == {2, 3, 4, 5}
    fixed = build_synthetic_split("train", num_images=20, seed=0, captions_per_image=(3, 3))
    assert (fixed.captions_per_image == 3).all()


def test_captions_are_templated_text(train: DatasetIndex) -> None:
    shapes = ("circle", "square", "triangle", "star", "cross")
    for c, text in enumerate(train.captions):
        assert text == text.strip() and "  " not in text
        assert any(s in text for s in shapes)
        for obj in describe_caption(train, c)["objects"]:  # every stated attribute appears in the text
            for value in obj.values():
                if value is not None and value not in ("left", "right", "top", "bottom", "centre"):
                    assert value in text
    assert len(set(train.captions)) > 0.5 * train.num_captions  # varied templates


def test_images_rgb_of_requested_size() -> None:
    for size in (32, 64):
        index = build_synthetic_split("test", num_images=5, seed=0, image_size=size)
        for i in range(5):
            img = index.load_image(i)
            assert img.mode == "RGB" and img.size == (size, size)


def test_own_captions_fully_relevant(train: DatasetIndex) -> None:
    rel = train.relevance(np.arange(train.num_images), np.arange(train.num_captions))
    assert rel.dtype == np.float32 and rel.shape == (train.num_images, train.num_captions)
    assert (rel[train.caption_image, np.arange(train.num_captions)] == 1.0).all()
    assert rel.min() >= 0.0 and rel.max() <= 1.0
    assert rel.mean() < 0.5  # unrelated pairs score low


def test_relevance_matches_naive_recomputation(train: DatasetIndex) -> None:
    data = synthetic_data(train)
    rng = np.random.default_rng(0)
    images = rng.choice(train.num_images, size=40, replace=False)
    captions = rng.choice(train.num_captions, size=120, replace=False)
    rel = train.relevance(images, captions)
    for a, i in enumerate(images.tolist()):
        image = data.image_record(i)
        for b, c in enumerate(captions.tolist()):
            expected = _naive_relevance(image, data.caption_record(c))
            assert rel[a, b] == pytest.approx(expected, abs=1e-6), (i, c, image, train.captions[c])


def test_relevance_values_graded(train: DatasetIndex) -> None:
    rel = train.relevance(np.arange(train.num_images), np.arange(train.num_captions))
    values = np.unique(rel)
    assert 0.0 in values and 1.0 in values
    assert ((values > 0) & (values < 1)).sum() >= 5  # partial credit exists


def test_shared_descriptions_exist(train: DatasetIndex) -> None:
    rel = train.relevance(np.arange(train.num_images), np.arange(train.num_captions))
    full = (rel == 1.0).sum(axis=0)
    assert (full >= 2).any()
    assert (full >= 2).mean() > 0.5  # most captions are true of another image as well


def test_same_description_not_pixel_identical(train: DatasetIndex) -> None:
    data = synthetic_data(train)
    by_desc: dict[str, list[int]] = {}
    for i in range(train.num_images):
        by_desc.setdefault(repr(data.image_record(i)), []).append(i)
    group = max(by_desc.values(), key=len)
    assert len(group) >= 2
    assert not np.array_equal(_pixels(train, group[0]), _pixels(train, group[1]))


def test_relevance_handles_empty_and_subset(train: DatasetIndex) -> None:
    assert train.relevance(np.array([], dtype=np.int64), np.arange(3)).shape == (0, 3)
    sub = train.subset_images([5, 2, 9])
    rel = sub.relevance(np.arange(3), np.arange(sub.num_captions))
    assert (rel[sub.caption_image, np.arange(sub.num_captions)] == 1.0).all()


def test_relevance_is_fast() -> None:
    index = build_synthetic_split("train", num_images=1500, seed=0)
    caps = np.arange(min(5000, index.num_captions))
    start = time.perf_counter()
    rel = index.relevance(np.arange(1000), caps)
    assert time.perf_counter() - start < 1.0
    assert rel.shape == (1000, len(caps))


def test_rendering_is_fast(train: DatasetIndex) -> None:
    start = time.perf_counter()
    for i in range(200):
        train.load_image(i)
    assert time.perf_counter() - start < 2.0


def test_caption_colour_appears_in_image(train: DatasetIndex) -> None:
    red = np.array(COLOURS["red"])
    checked = 0
    for c, text in enumerate(train.captions):
        if "red" not in text.split():
            continue
        px = _pixels(train, int(train.caption_image[c])).astype(int)
        reddish = (px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)
        assert reddish.sum() >= 20, text
        assert (np.abs(px - red).sum(axis=-1) == 0).sum() >= 20  # the exact object colour is drawn
        checked += 1
        if checked >= 25:
            break
    assert checked >= 10


def test_every_object_colour_and_background_drawn(train: DatasetIndex) -> None:
    data = synthetic_data(train)
    for i in range(30):
        record = data.image_record(i)
        px = _pixels(train, i).reshape(-1, 3)
        colours = {tuple(p) for p in px.tolist()}
        assert tuple(BACKGROUNDS[record["background"]]) in colours
        for obj in record["objects"]:
            assert tuple(COLOURS[obj["colour"]]) in colours


def test_describe_attributes(train: DatasetIndex) -> None:
    info = describe_attributes(train, 3)
    assert info["image_id"] == "synthetic-train-000003"
    assert 1 <= len(info["objects"]) <= 2
    assert len(info["captions"]) == len(train.captions_of(3))
    assert info["background"] in BACKGROUNDS


def test_attribute_space_small() -> None:
    index = build_synthetic_split("train", num_images=1000, seed=0)
    data = synthetic_data(index)
    object_sets = {}
    for i in range(index.num_images):
        key = frozenset((o["shape"], o["colour"]) for o in data.image_record(i)["objects"])
        object_sets[key] = object_sets.get(key, 0) + 1
    assert max(object_sets.values()) >= 10  # many images share a (shape, colour) object set
    assert sum(v for v in object_sets.values() if v >= 2) > 500


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_images=0),
        dict(num_images=5, captions_per_image=(0, 2)),
        dict(num_images=5, captions_per_image=(4, 2)),
        dict(num_images=5, seed=-1),
        dict(num_images=5, image_size=4),
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(UserError):
        build_synthetic_split("train", **kwargs)
