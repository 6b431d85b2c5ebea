"""Data and model inputs that must not be accepted silently: train/eval leakage, image paths leaving the dataset
root, coerced Karpathy ids, 16-bit images, symlink loops and a ``model.pretrained`` that is not a weights file.

Datasets are built in tmp folders (a few small PNGs); the CLI is called in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data.formats import read_karpathy
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError
from tests.test_bad_input import assert_one_line_error, base_tree, run_cli, snapshot


# ------------------------------------------------------------------------------------------------ helpers
def check_leakage(*args, **kwargs):
    from orchestrator.data.leakage import check_leakage as check

    return check(*args, **kwargs)


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, dtype=np.uint8)).save(path)


def captions_tree(tmp: Path, data: Path, **extra: Any) -> dict[str, Any]:
    tree = base_tree(tmp)
    tree["data"] = {"format": "captions_json", "root": str(data), **extra}
    tree["tracking"] = {"enabled": False}
    return tree


def train_must_fail(tmp: Path, tree: dict[str, Any], *needles: str) -> str:
    """``itr train`` on ``tree``: exit 2, one error line with every needle, nothing written."""
    cfg = tmp / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    before = snapshot(tmp)
    rc, lines, out = run_cli(["train", str(cfg)], tmp)
    line = assert_one_line_error(rc, lines, *needles)
    assert snapshot(tmp) == before, sorted(snapshot(tmp) - before)
    assert out == ""
    return line


def records(*rows: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"image": image, "caption": caption, "image_id": image_id} for image, caption, image_id in rows]


def karpathy_images() -> list[dict[str, Any]]:
    """train: cocoids 1, 2 (restval); val: 3; test: 4. sentids 10..14."""
    return [
        {
            "filename": "a.png",
            "filepath": "img",
            "cocoid": 1,
            "split": "train",
            "sentences": [{"raw": "a red square", "sentid": 10}, {"raw": "red square", "sentid": 11}],
        },
        {
            "filename": "b.png",
            "filepath": "img",
            "cocoid": 2,
            "split": "restval",
            "sentences": [{"raw": "a blue circle", "sentid": 12}],
        },
        {
            "filename": "c.png",
            "filepath": "img",
            "cocoid": 3,
            "split": "val",
            "sentences": [{"raw": "a green star", "sentid": 13}],
        },
        {
            "filename": "d.png",
            "filepath": "img",
            "cocoid": 4,
            "split": "test",
            "sentences": [{"raw": "a grey line", "sentid": 14}],
        },
    ]


def write_karpathy(tmp: Path, images: list[dict[str, Any]]) -> tuple[Path, Path]:
    root = tmp / "data"
    for img in images:
        if isinstance(img.get("filename"), str) and isinstance(img.get("filepath", ""), str):
            target = Path(os.path.normpath(root / img.get("filepath", "") / img["filename"]))
            if root in target.parents:  # never write outside tmp
                write_png(target)
    ann = tmp / "dataset.json"
    ann.write_text(json.dumps({"images": images}))
    return ann, root


# ------------------------------------------------------------------------------- image paths leaving the root
@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "img/../../outside.png"])
def test_captions_json_image_outside_root_is_refused(tmp_path, bad):
    data = tmp_path / "data"
    write_png(data / "img" / "a.png")
    write_png(tmp_path / "outside.png")
    (data / "train.json").write_text(
        json.dumps(records(("img/a.png", "a cat", "a"), ("img/a.png", "a dog", "a"), (bad, "a leak", "b")))
    )
    (data / "val.json").write_text(json.dumps(records(("img/a.png", "a cat", "a"))))
    line = train_must_fail(
        tmp_path,
        captions_tree(tmp_path, data),
        f"{data / 'train.json'}:[2].image:",
        repr(bad),
        "outside the dataset root",
        "data.allow_outside_root",
    )
    assert "not a readable image" not in line


def test_allow_outside_root_opts_in_and_dotdot_names_stay_inside(tmp_path):
    data = tmp_path / "data"
    write_png(data / "img" / "..a.png")  # a name starting with '..' is not a parent reference
    write_png(tmp_path / "outside.png", value=7)
    (data / "train.json").write_text(
        json.dumps(records(("img/..a.png", "inside", "a"), ("img/./../../outside.png", "outside", "b")))
    )
    with pytest.raises(UserError, match=r"\[1\]\.image: image path .* is outside the dataset root"):
        load_split(DataConfig(root=data), "train")
    index = load_split(DataConfig(root=data, allow_outside_root=True), "train")
    assert index.image_paths == [data / "img" / "..a.png", tmp_path / "outside.png"]
    assert np.asarray(index.load_image(1))[0, 0].tolist() == [7, 7, 7]
    # the same file inside the root is accepted without the option, normalised lexically
    (data / "train.json").write_text(json.dumps(records(("img/./sub/../..a.png", "inside", "a"))))
    assert load_split(DataConfig(root=data), "train").image_paths == [data / "img" / "..a.png"]


@pytest.mark.parametrize(
    "field,value,where",
    [
        ("filename", "/etc/passwd", "filename"),
        ("filepath", "../..", "filepath"),
        ("filename", "../../../x.png", "filename"),
    ],
)
def test_karpathy_image_outside_root_is_refused(tmp_path, field, value, where):
    images = karpathy_images()
    images[1][field] = value
    ann, root = write_karpathy(tmp_path, images)
    tree = captions_tree(tmp_path, root, format="karpathy", annotations=str(ann))
    train_must_fail(tmp_path, tree, f"{ann}:images[1].{where}:", "outside the dataset root", "data.allow_outside_root")


# ------------------------------------------------------------------------------------------ symlink loops
def test_symlink_loop_image_is_one_line_naming_it(tmp_path):
    data = tmp_path / "data"
    write_png(data / "img" / "a.png")
    os.symlink("loop.png", data / "img" / "loop.png")  # points at itself
    (data / "train.json").write_text(json.dumps(records(("img/a.png", "a cat", "a"), ("img/loop.png", "a loop", "b"))))
    for verify in ("exists", "header"):
        train_must_fail(
            tmp_path,
            captions_tree(tmp_path, data, verify_images=verify),
            f"{data / 'img' / 'loop.png'}: ",
            "symlink loop",
        )
    index = load_split(DataConfig(root=data, verify_images="none"), "train")
    with pytest.raises(UserError) as info:
        index.load_image(1)
    assert str(info.value).startswith(f"{data / 'img' / 'loop.png'}: ") and "symlink loop" in str(info.value)


# ------------------------------------------------------------------------------------------ Karpathy coercions
@pytest.mark.parametrize(
    "mutate,where,what",
    [
        (lambda t: t[0].update(cocoid={"a": 1}), "images[0].cocoid", "cocoid must be"),
        (lambda t: t[0].update(cocoid=True), "images[0].cocoid", "cocoid must be"),
        (lambda t: t[0].update(cocoid=1.5), "images[0].cocoid", "cocoid must be"),
        (lambda t: t[0]["sentences"][1].update(sentid=[11]), "images[0].sentences[1].sentid", "sentid must be"),
        (lambda t: t[1].update(filename=5), "images[1].filename", "must be a non-empty string"),
        (lambda t: t[1].update(filepath={"x": 1}), "images[1].filepath", "must be a string"),
    ],
)
def test_karpathy_ids_and_paths_are_not_coerced(tmp_path, mutate, where, what):
    images = karpathy_images()
    mutate(images)
    ann, root = write_karpathy(tmp_path, images)
    tree = captions_tree(tmp_path, root, format="karpathy", annotations=str(ann))
    train_must_fail(tmp_path, tree, f"{ann}:{where}:", what)


def test_karpathy_string_and_integer_ids_still_load(tmp_path):
    images = karpathy_images()
    images[0]["cocoid"] = "coco-1"
    images[0]["sentences"][0]["sentid"] = "s10"
    ann, root = write_karpathy(tmp_path, images)
    train = read_karpathy(ann, root, "train", name="k")
    assert train.image_ids == ["coco-1", "2"] and train.caption_ids == ["s10", "11", "12"]


# --------------------------------------------------------------------------------------------- 16-bit images
RAMP = (np.arange(16 * 64, dtype=np.uint32) * 64).reshape(16, 64)  # 0 .. 65472


def test_16bit_png_is_scaled_by_its_range_not_white(tmp_path):
    path = tmp_path / "data" / "img" / "g16.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(RAMP.astype(np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    (tmp_path / "data" / "train.json").write_text(json.dumps(records(("img/g16.png", "a ramp", "g"))))
    index = load_split(DataConfig(root=tmp_path / "data"), "train")
    got = np.asarray(index.load_image(0))
    assert got.shape == (16, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([(RAMP >> 8).astype(np.uint8)] * 3, axis=-1))
    assert (got == 255).mean() < 0.01


@pytest.mark.parametrize("array", [RAMP.astype(">u2"), RAMP.astype("<u2"), RAMP.astype(np.int32)])
def test_other_16bit_and_int_modes_are_scaled_too(array):
    from orchestrator.data.images import to_rgb

    image = Image.fromarray(array)
    assert image.mode in {"I;16B", "I;16", "I;16L", "I"}, image.mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 1], (RAMP >> 8).astype(np.uint8))


def test_float_image_in_unit_range_is_scaled_and_out_of_range_refused(tmp_path):
    from orchestrator.data.images import to_rgb

    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    got = np.asarray(to_rgb(Image.fromarray(ramp)))
    np.testing.assert_array_equal(got[..., 0], np.round(ramp * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"values in \[-3, 9\]"):
        to_rgb(Image.fromarray(np.array([[-3.0, 9.0]], dtype=np.float32)))
    with pytest.raises(ValueError, match="outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


# ------------------------------------------------------------------------------------------ train/eval leakage
def leaky_captions(tmp: Path) -> Path:
    """train: a, b; val: a (same id, same file), z (another id, b's file), v (clean); test: t (clean)."""
    data = tmp / "data"
    for name in ("a", "b", "v", "t"):
        write_png(data / "img" / f"{name}.png")
    (data / "train.json").write_text(json.dumps(records(("img/a.png", "a cat", "a"), ("img/b.png", "a dog", "b"))))
    (data / "val.json").write_text(
        json.dumps(
            records(("img/a.png", "a cat again", "a"), ("img/./b.png", "the dog", "z"), ("img/v.png", "a vase", "v"))
        )
    )
    (data / "test.json").write_text(json.dumps(records(("img/t.png", "a tree", "t"))))
    return data


def test_captions_json_leakage_warns_by_default_naming_count_splits_examples(tmp_path, caplog):
    data = leaky_captions(tmp_path)
    cfg = DataConfig(root=data)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.leakage"):
        found = check_leakage(cfg, {"train": load_split(cfg, "train")})
    assert {k: v.counts() for k, v in found.items()} == {"val": {"image ids": 1, "image files": 2}}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    for needle in (
        "2 of 3 images of split 'val' are also in split 'train'",
        "1 image id ('a')",
        "2 image files (img/a.png, img/b.png)",
        "data.leakage: error",
    ):
        assert needle in msg, (needle, msg)
    assert "split 'test'" not in msg


def test_captions_json_leakage_is_an_error_with_the_switch(tmp_path):
    data = leaky_captions(tmp_path)
    line = train_must_fail(
        tmp_path,
        captions_tree(tmp_path, data, leakage="error"),
        f"{data / 'val.json'}:data.leakage:",
        "2 of 3 images of split 'val'",
        "('a')",
    )
    assert "img/b.png" in line


def test_clean_splits_and_coco_mini_pass_silently(tmp_path, caplog, coco_mini):
    cfg = DataConfig(root=coco_mini, verify_images="none")
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.leakage"):
        assert check_leakage(cfg, {"train": load_split(cfg, "train"), "val": load_split(cfg, "val")}) == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_karpathy_leakage_by_cocoid_and_sentid(tmp_path, caplog):
    images = karpathy_images()
    images.append(
        {
            "filename": "e.png",
            "filepath": "img",
            "cocoid": 1,
            "split": "test",  # cocoid of a train image
            "sentences": [{"raw": "again", "sentid": 15}],
        }
    )
    images[2]["sentences"][0]["sentid"] = 11  # a train sentid, on a val image
    ann, root = write_karpathy(tmp_path, images)
    cfg = DataConfig(annotations=ann, root=root)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.leakage"):
        found = check_leakage(cfg, {"train": load_split(cfg, "train")})
    assert {k: v.counts() for k, v in found.items()} == {"val": {"caption ids": 1}, "test": {"image ids": 1}}
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 caption id ('11')" in msg and "1 of 2 images of split 'test'" in msg and "1 image id ('1')" in msg
    with pytest.raises(UserError) as info:
        check_leakage(DataConfig(annotations=ann, root=root, leakage="error"), None)
    assert str(info.value).startswith(f"{ann}:data.leakage: ") and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- model.pretrained
class NotWeights:
    """A pickled object that torch.load(weights_only=True) must refuse."""


@pytest.mark.parametrize("kind", ["random", "pickled", "empty"])
def test_pretrained_not_a_weights_file_is_one_line(tmp_path, kind):
    import torch

    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "pickled":
        torch.save({"state_dict": argparse.Namespace(a=1), "obj": NotWeights()}, path)
    else:
        path.write_bytes(b"")
    tree = base_tree(tmp_path)
    tree["model"]["pretrained"] = str(path)
    tree["tracking"] = {"enabled": False}
    line = train_must_fail(
        tmp_path, tree, f"{path}:model.pretrained: not a weights file (torch.load weights_only=True refused it: "
    )
    assert "weights_only=False" not in line and line.endswith(")")
    assert len(line) < 400


def test_pretrained_of_another_architecture_still_does_not_fit(tmp_path):
    import torch

    from orchestrator.config import ModelConfig
    from orchestrator.models.student import build_student, check_pretrained

    tiny = build_student(ModelConfig(name="itr-tiny-vit"))
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    check_pretrained(ModelConfig(name="itr-small-vit", pretrained=path))  # weights: the preflight lets it pass
    with pytest.raises(UserError) as info:
        build_student(ModelConfig(name="itr-small-vit", pretrained=path))
    assert str(info.value).startswith(f"{path}:model.pretrained: checkpoint does not fit model 'itr-small-vit'")
    loaded = build_student(ModelConfig(name="itr-tiny-vit", pretrained=path))
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


class PixelMean:
    """A stand-in teacher (not the code under test): one feature, the mean of the RGB pixels it is given."""

    def to(self, device: str) -> PixelMean:
        return self

    def load(self) -> PixelMean:
        return self

    def encode(self, items) -> np.ndarray:
        return np.array([[np.asarray(item, dtype=np.float64).mean()] for item in items])


def test_ray_teacher_actor_decodes_16bit_files_by_range(tmp_path):
    from orchestrator.teachers.ray_backend import EncoderActor

    path = tmp_path / "g16.png"
    Image.fromarray(RAMP.astype(np.uint16)).save(path)
    out = EncoderActor(PixelMean(), "cpu")({"pos": np.array([0]), "path": np.array([str(path)])})
    assert out["feature"][0, 0] == pytest.approx((RAMP >> 8).mean())
