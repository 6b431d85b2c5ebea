"""Build a dataset split (``train`` / ``val`` / ``test``) from a validated ``DataConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from orchestrator.config import DataConfig
from orchestrator.data.formats import read_captions_json, read_karpathy
from orchestrator.data.index import DatasetIndex
from orchestrator.data.manifest import default_manifest_dir
from orchestrator.errors import UserError

SplitRole = Literal["train", "val", "test"]


def split_name(cfg: DataConfig, role: SplitRole) -> str:
    return {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}[role]


def load_split(cfg: DataConfig, role: SplitRole, *, verify: bool = True) -> DatasetIndex:
    """The ``role`` split of the configured dataset; images are verified (``data.verify_images``) before use,
    once per dataset: files unchanged since a recorded check are not parsed again (``data.manifest_dir``)."""
    if cfg.resolved_format == "webdataset" and role == "train":  # streamed: orchestrator.data.shards.open_shards
        raise UserError(
            "the train split of format webdataset is streamed from data.shards, not indexed", field="data.format"
        )
    fmt = cfg.split_format  # webdataset: its eval splits are captions_json / karpathy
    name = split_name(cfg, role)
    if fmt == "synthetic":
        from orchestrator.data.synthetic import build_synthetic_split

        syn = cfg.synthetic
        count = {"train": syn.num_train_images, "val": syn.num_val_images, "test": syn.num_test_images}[role]
        index = build_synthetic_split(
            name,
            num_images=count,
            seed=syn.seed,
            image_size=syn.image_size,
            captions_per_image=tuple(syn.captions_per_image),
        )
    elif fmt == "captions_json":
        assert cfg.root is not None
        path = cfg.root / f"{name}.json"
        if not path.is_file():
            raise UserError(f"split file {path.name} not found in data.root", path=str(path), field="data.root")
        index = read_captions_json(
            path, name=f"{cfg.root.name}/{name}", clean=cfg.clean_captions, allow_outside_root=cfg.allow_outside_root
        )
    else:
        assert cfg.annotations is not None and cfg.root is not None
        index = read_karpathy(
            cfg.annotations,
            cfg.root,
            name,
            name=f"{cfg.annotations.stem}/{name}",
            clean=cfg.clean_captions,
            allow_outside_root=cfg.allow_outside_root,
        )
    if role == "train" and cfg.max_train_images is not None and cfg.max_train_images < index.num_images:
        index = index.subset_images(range(cfg.max_train_images), name=f"{index.name}[:{cfg.max_train_images}]")
    if role == "train" and cfg.noise.caption_shuffle > 0:  # noisy correspondence: re-paired captions
        from orchestrator.data.noise import shuffle_captions

        index = shuffle_captions(index, cfg.noise)
    if verify:  # header/full checks recorded in the manifest: ranks and later runs re-parse only changed files
        index.verify_images(cfg.verify_images, manifest_dir=manifest_dir(cfg))
    return index


def manifest_dir(cfg: DataConfig) -> Path:
    """The folder of the verified-image manifests: ``data.manifest_dir``, else the user cache
    (``orchestrator.data.manifest.default_manifest_dir``)."""
    return cfg.manifest_dir if cfg.manifest_dir is not None else default_manifest_dir()
