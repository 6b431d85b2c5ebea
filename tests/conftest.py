"""Shared fixtures: offline environment, tiny configs, the coco-mini path (skip where absent)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

# Without a GPU, the Triton kernels of methods/kernels.py are tested in Triton's interpreter. Triton
# reads this when its own modules are imported, i.e. before anything imports methods.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = (REPO.parent / "shared" / "data" / "coco-mini").resolve()


@pytest.fixture
def coco_mini() -> Path:
    if not (COCO_MINI / "train.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI} (it lives in ../shared/data on the team's machines)")
    return COCO_MINI


def tiny_tree(tmp_path: Path, **sections) -> dict:
    """A config mapping for the tiny model on a small synthetic set, writing only under ``tmp_path``."""
    tree = {
        "data": {
            "format": "synthetic",
            "synthetic": {
                "num_train_images": 160,
                "num_val_images": 40,
                "num_test_images": 40,
                "image_size": 32,
                "seed": 0,
            },
            "loader_workers": 0,
        },  # the data-pipeline tests cover the workers (default: auto)
        "model": {"name": "itr-tiny-vit"},
        "loss": {"family": "infonce"},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 1e-3,
            "min_lr": 1e-5,
            "weight_decay": 0.1,
            "warmup_steps": 2,
            "seed": 0,
            "output_dir": str(tmp_path / "runs"),
            "max_steps_per_epoch": 6,
        },
        "scaling": {"backend": "local", "num_workers": 1},
        "tracking": {
            "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_dir": str(tmp_path / "mlartifacts"),
            "experiment": "test",
        },
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


@pytest.fixture
def tiny_config_tree(tmp_path: Path) -> dict:
    return tiny_tree(tmp_path)
