"""Dataset formats, validation before training, and the training batch sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data.formats import clean_caption, read_captions_json, read_karpathy
from orchestrator.data.sampler import CaptionBatchSampler, unique_image_batches
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError


def make_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)


def test_clean_caption_is_cusa_pre_caption():
    assert clean_caption("A man's  red-hat, on (the) table/chair!") == "a man s red hat on the table chair"
    assert clean_caption(" ".join(["w"] * 80)).count("w") == 64


def test_coco_mini_irregular_caption_counts(coco_mini):
    train = load_split(DataConfig(root=coco_mini), "train")
    val = load_split(DataConfig(root=coco_mini), "val")
    assert (train.num_images, train.num_captions) == (600, 3000)
    assert (val.num_images, val.num_captions) == (201, 1000)
    records = json.loads((coco_mini / "val.json").read_text())
    expected = Counter(r["image_id"] for r in records)
    got = dict(zip(val.image_ids, val.captions_per_image.tolist()))
    assert got == dict(expected)
    assert set(val.captions_per_image.tolist()) >= {2, 3, 5}
    # every caption maps back to its own image file
    for k in (0, 17, 999):
        rec = records[k]
        c = val.captions.index(clean_caption(rec["caption"]))
        assert val.image_paths[val.caption_image[c]] == (coco_mini / rec["image"]).resolve()


def write_captions(tmp_path: Path, records) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_captions_json_missing_field_names_record(tmp_path):
    path = write_captions(
        tmp_path, [{"image": "a.jpg", "caption": "x", "image_id": "1"}, {"image": "b.jpg", "image_id": "2"}]
    )
    with pytest.raises(UserError, match=r"train\.json:\[1\]\.caption: missing field"):
        read_captions_json(path, name="t")


@pytest.mark.parametrize("caption,match", [("", "caption is empty"), ("  ,.  ", "caption is empty"), (7, "not text")])
def test_captions_json_bad_caption(tmp_path, caption, match):
    path = write_captions(tmp_path, [{"image": "a.jpg", "caption": caption, "image_id": "1"}])
    with pytest.raises(UserError, match=match):
        read_captions_json(path, name="t")


def test_captions_json_not_json_and_empty(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_captions_json(path, name="t")
    path.write_text("[]")
    with pytest.raises(UserError, match="no records"):
        read_captions_json(path, name="t")


def test_captions_json_one_id_two_files(tmp_path):
    path = write_captions(
        tmp_path,
        [{"image": "a.jpg", "caption": "x", "image_id": "1"}, {"image": "b.jpg", "caption": "y", "image_id": "1"}],
    )
    with pytest.raises(UserError, match=r"\[1\]\.image: image_id '1' names two files"):
        read_captions_json(path, name="t")


def test_missing_image_fails_before_training_naming_file(tmp_path):
    make_images(tmp_path / "images", ["a.jpg"])
    path = write_captions(
        tmp_path,
        [
            {"image": "images/a.jpg", "caption": "x", "image_id": "1"},
            {"image": "images/gone.jpg", "caption": "y", "image_id": "2"},
        ],
    )
    cfg = DataConfig(root=tmp_path)
    with pytest.raises(UserError) as info:
        load_split(cfg, "train")
    assert str(info.value) == f"{(tmp_path / 'images' / 'gone.jpg').resolve()}: image file not found"
    del path


def test_unreadable_image_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.jpg").write_bytes(b"not an image at all")
    write_captions(tmp_path, [{"image": "images/bad.jpg", "caption": "y", "image_id": "2"}])
    with pytest.raises(UserError, match=r"bad\.jpg: not a readable image"):
        load_split(DataConfig(root=tmp_path), "train")


def test_truncated_image_caught_by_full_verification(tmp_path):
    make_images(tmp_path / "images", ["t.jpg"])
    data = (tmp_path / "images" / "t.jpg").read_bytes()
    (tmp_path / "images" / "t.jpg").write_bytes(data[: len(data) // 2])
    write_captions(tmp_path, [{"image": "images/t.jpg", "caption": "y", "image_id": "2"}])
    with pytest.raises(UserError, match=r"t\.jpg: not a readable image"):
        load_split(DataConfig(root=tmp_path, verify_images="full"), "train")


def karpathy_fixture(tmp_path: Path) -> tuple[Path, Path]:
    images = []
    names = []
    for k, split in enumerate(["train", "restval", "val", "test", "test"]):
        name = f"COCO_{k:03d}.jpg"
        names.append(name)
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "cocoid": 100 + k,
                "sentences": [
                    {"raw": f"Caption {s} of image {k}.", "sentid": 1000 + 10 * k + s} for s in range(k % 3 + 1)
                ],
            }
        )
    make_images(tmp_path / "coco" / "val2014", names)
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return ann, tmp_path / "coco"


def test_karpathy_splits_train_includes_restval(tmp_path):
    ann, root = karpathy_fixture(tmp_path)
    train = read_karpathy(ann, root, "train", name="k")
    assert train.image_ids == ["100", "101"] and train.captions_per_image.tolist() == [1, 2]
    test = read_karpathy(ann, root, "test", name="k")
    assert test.image_ids == ["103", "104"]
    assert test.caption_ids == ["1030", "1040", "1041"]
    assert test.captions[0] == "caption 0 of image 3"
    cfg = DataConfig(annotations=ann, root=root)
    assert cfg.resolved_format == "karpathy"
    val = load_split(cfg, "val")
    assert val.image_paths[0] == (root / "val2014" / "COCO_002.jpg").resolve()
    assert val.caption_ids == ["1020", "1021", "1022"]


def test_unique_image_batches_never_repeat_an_image():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(50), rng.integers(1, 7, size=50))
    batches = unique_image_batches(caption_image, 16, np.random.default_rng(1))
    assert batches and all(len(b) == 16 for b in batches)
    for b in batches:
        assert len(set(caption_image[b].tolist())) == 16
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == len(flat)  # no caption twice in an epoch
    assert len(flat) >= len(caption_image) - 3 * 16  # only a tail is dropped


def test_sampler_shards_disjointly_and_deterministically():
    caption_image = np.repeat(np.arange(100), 5)
    ranks = [CaptionBatchSampler(caption_image, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    a, b = [list(map(tuple, s)) for s in ranks]
    assert len(a) == len(b) == len(ranks[0])
    assert not set(np.concatenate(a).tolist()) & set(np.concatenate(b).tolist())
    again = CaptionBatchSampler(caption_image, 10, seed=3, rank=0, world_size=2)
    again.set_epoch(4)
    assert list(map(tuple, again)) == a
    again.set_epoch(5)
    assert list(map(tuple, again)) != a


def test_random_sampler_allows_repeated_images():
    caption_image = np.repeat(np.arange(10), 5)
    s = CaptionBatchSampler(caption_image, 25, seed=0, unique_images=False)
    assert any(len(set(caption_image[b].tolist())) < 25 for b in s)
    with pytest.raises(ValueError, match="larger than the number of training images"):
        CaptionBatchSampler(caption_image, 25, seed=0, unique_images=True)
