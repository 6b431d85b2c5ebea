"""A dataset format is one registered function: a toy TSV format registered here is validated by the config
(its required field, ``auto`` detection), read by ``load_split`` and trained on by ``train_loop``; an unknown
``data.format`` is one line naming the field and every known format (``itr train``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.config import DataConfig, data_formats, validate_config
from orchestrator.data.formats import SplitRole, register_split_format
from orchestrator.data.formats import registry as readers
from orchestrator.data.index import DatasetIndex
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop
from tests.conftest import REPO, tiny_tree
from tests.test_bad_input import assert_one_line_error, run_cli

#: the toy layout: data.root/<split>.tsv, one ``image file<TAB>caption`` line per caption
SPLITS = {
    "train": [(f"img{i}.png", f"shape {i} caption {c}") for i in range(12) for c in range(2)],
    "val": [(f"val{i}.png", f"val shape {i} caption {c}") for i in range(4) for c in range(2)],
}


def read_tsv_pairs(cfg: DataConfig, role: SplitRole, split: str) -> DatasetIndex:
    """The toy format's reader: images in first-seen order, ids their file stems."""
    assert cfg.root is not None
    path = cfg.root / f"{split}.tsv"
    if not path.is_file():
        raise UserError(f"split file {path.name} not found in data.root", path=str(path), field="data.root")
    position: dict[str, int] = {}
    captions, caption_image = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        image, caption = line.split("\t")
        captions.append(caption)
        caption_image.append(position.setdefault(image, len(position)))
    return DatasetIndex(
        name=f"tsv/{split}",
        image_ids=[Path(image).stem for image in position],
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        image_paths=[cfg.root / image for image in position],
        source=str(path),
    )


@pytest.fixture
def tsv_format(monkeypatch):
    """``tsv_pairs`` registered (both registries restored afterwards): needs data.root, and ``auto`` picks it
    where ``<root>/<train_split>.tsv`` exists, before captions_json."""
    data_formats.format_names()  # the built-ins declared before the registries are copied
    monkeypatch.setattr(data_formats, "_DECLARED", dict(data_formats._DECLARED))
    monkeypatch.setattr(readers, "_READERS", dict(readers._READERS))
    register_split_format(
        "tsv_pairs",
        requires=("root",),
        needs="format tsv_pairs needs a folder with <split>.tsv",
        detect=lambda cfg: cfg.root is not None and (cfg.root / f"{cfg.train_split}.tsv").is_file(),
        detect_order=25,
    )(read_tsv_pairs)
    return "tsv_pairs"


def write_tsv_root(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, rows in SPLITS.items():
        (root / f"{split}.tsv").write_text("".join(f"{image}\t{caption}\n" for image, caption in rows))
        for image in dict.fromkeys(image for image, _ in rows):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / image)
    return root


def data_section(tmp_path: Path, root: Path, **extra) -> dict:
    return {
        "root": str(root),
        "manifest_dir": str(tmp_path / "manifests"),
        "image_cache_dir": str(tmp_path / "images"),
        "loader_workers": 0,
        **extra,
    }


def test_a_registered_format_is_validated_and_read_by_load_split(tmp_path, tsv_format):
    root = write_tsv_root(tmp_path / "tsv")
    cfg = validate_config({"data": data_section(tmp_path, root, format="tsv_pairs", max_train_images=5)}).data
    assert cfg.resolved_format == cfg.split_format == "tsv_pairs"
    for role in ("train", "val"):
        index = load_split(cfg, role)  # images verified (header check) as for any format
        rows = SPLITS[role]
        images = list(dict.fromkeys(image for image, _ in rows))
        if role == "train":  # load_split applies data.max_train_images to whatever the reader returns
            images = images[:5]
            rows = [row for row in rows if row[0] in images]
        assert list(index.image_ids) == [Path(image).stem for image in images]
        assert list(index.captions) == [caption for _, caption in rows]
        assert index.caption_image.tolist() == [images.index(image) for image, _ in rows]
        assert index.image_paths is not None and list(index.image_paths) == [root / image for image in images]


def test_auto_detects_a_registered_format_and_its_required_field_is_named(tmp_path, tsv_format):
    root = write_tsv_root(tmp_path / "tsv")
    assert validate_config({"data": data_section(tmp_path, root)}).data.resolved_format == "tsv_pairs"
    (tmp_path / "json").mkdir()  # a root without <train_split>.tsv: captions_json, as before the registration
    assert validate_config({"data": {"root": str(tmp_path / "json")}}).data.resolved_format == "captions_json"
    assert validate_config({"data": {"root": str(root), "train_split": "other"}}).data.resolved_format == (
        "captions_json"
    )
    with pytest.raises(UserError) as err:
        validate_config({"data": {"format": "tsv_pairs"}})
    assert str(err.value) == "<config>:data.root: format tsv_pairs needs a folder with <split>.tsv"


def test_train_loop_trains_on_a_registered_format(tmp_path, tsv_format):
    root = write_tsv_root(tmp_path / "tsv")
    tree = tiny_tree(tmp_path, train={"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2})
    tree["data"] = data_section(tmp_path, root, format="tsv_pairs")
    cfg = validate_config(tree)
    session = LocalSession(tmp_path / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    metrics = train_loop(cfg, session)
    assert np.isfinite(metrics["train/loss"])
    # val is the TSV's 4 images x 2 captions: every image is within 5 of a caption query, every caption within
    # 10 of an image query, whatever the model (on other data these recalls would not be certain)
    assert metrics["val/t2i_r5"] == metrics["val/i2t_r10"] == 100.0


def test_itr_train_rejects_an_unknown_format_in_one_line_listing_the_known_ones(tmp_path, tsv_format):
    path = tmp_path / "exp.yaml"
    tree = tiny_tree(tmp_path)
    tree["data"]["format"] = "parquet"
    path.write_text(yaml.safe_dump(tree))
    rc, lines, _ = run_cli(["train", str(path)], tmp_path)
    line = assert_one_line_error(rc, lines)
    assert line == (
        f"error: {path}:data.format: Input should be 'auto', 'synthetic', 'captions_json', 'karpathy', "
        "'webdataset' or 'tsv_pairs' (got 'parquet')"
    )


def test_a_format_registered_twice_or_named_auto_is_refused(tsv_format):
    with pytest.raises(ValueError, match="split format 'tsv_pairs' registered twice"):
        register_split_format("tsv_pairs", requires=("root",))(read_tsv_pairs)
    with pytest.raises(ValueError, match="dataset format 'webdataset' declared twice, differently"):
        register_split_format("webdataset")(read_tsv_pairs)  # declared (streamed), with its own fields
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_split_format("auto")(read_tsv_pairs)


def test_validating_a_config_imports_no_reader():
    """The config checks names against the light registry: a synthetic config loads no numpy, PIL or reader."""
    code = (
        "import sys; from orchestrator.config import validate_config; "
        "validate_config({'data': {'format': 'synthetic'}}); validate_config({}); "
        "loaded = [m for m in ('numpy', 'PIL', 'torch', 'orchestrator.data') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
