"""Build a dataset split (``train`` / ``val`` / ``test``) from a validated ``DataConfig``."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import DataConfig
from orchestrator.data.formats import SplitRole, split_reader
from orchestrator.data.index import DatasetIndex
from orchestrator.data.manifest import default_manifest_dir
from orchestrator.errors import UserError

__all__ = ["SplitRole", "load_split", "manifest_dir", "split_name"]


def split_name(cfg: DataConfig, role: SplitRole) -> str:
    """The configured name of the ``role`` split (``data.train_split`` / ``val_split`` / ``test_split``)."""
    return {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}[role]


def load_split(cfg: DataConfig, role: SplitRole, *, verify: bool = True) -> DatasetIndex:
    """The ``role`` split of the configured dataset, read by the reader its format registered
    (``orchestrator.data.formats.register_split_format``); images are verified (``data.verify_images``) before
    use, once per dataset: files unchanged since a recorded check are not parsed again (``data.manifest_dir``)."""
    if cfg.resolved_format == "webdataset" and role == "train":  # streamed: orchestrator.data.shards.open_shards
        raise UserError(
            "the train split of format webdataset is streamed from data.shards, not indexed", field="data.format"
        )
    fmt = cfg.split_format  # webdataset: its eval splits are captions_json / karpathy
    index = split_reader(fmt)(cfg, role, split_name(cfg, role))  # registered by its format module
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
