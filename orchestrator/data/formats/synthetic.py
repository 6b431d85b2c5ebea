"""The ``synthetic`` format: the built-in generated shapes (``orchestrator.data.synthetic``), sized by
``data.synthetic``; what ``auto`` is when no data location is set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.data.formats.registry import SplitRole, register_split_format

if TYPE_CHECKING:
    from orchestrator.config.data import DataConfig
    from orchestrator.data.index import DatasetIndex


@register_split_format("synthetic")  # auto's fallback: orchestrator.config.data_formats.FALLBACK_FORMAT
def load_synthetic(cfg: DataConfig, role: SplitRole, split: str) -> DatasetIndex:
    """The ``role`` split of the generated shapes: ``data.synthetic.num_<role>_images`` images, its seed."""
    from orchestrator.data.synthetic import build_synthetic_split  # drawing code: loaded when generating

    syn = cfg.synthetic
    count = {"train": syn.num_train_images, "val": syn.num_val_images, "test": syn.num_test_images}[role]
    return build_synthetic_split(
        split,
        num_images=count,
        seed=syn.seed,
        image_size=syn.image_size,
        captions_per_image=syn.captions_per_image,
    )
