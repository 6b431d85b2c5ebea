"""The ``teachers`` section: the offline teacher encoders (soft labels, caption relevance) and where they run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from orchestrator.config.base import AbsolutePath, PositiveInt, Section


class TeachersConfig(Section):
    """Offline teacher encoders for soft labels (CUSA's CSA/USA) and caption relevance (Listwise RSC, BCLS).

    A spec names the encoder: ``packaged:all-MiniLM-L6-v2``, ``packaged:all-mpnet-base-v2``,
    ``sentence-transformers:<name-or-path>`` (text); ``packaged:efficientnet-lite0``, ``timm:<name>[@<weights file>]``,
    ``open_clip:<name>@<weights file>``, ``file:<features.npz keyed by image id>`` (image; ``itr convert-features``
    turns a pickled .npy into one);
    ``synthetic:attributes`` (either; the synthetic dataset's exact attributes).
    """

    image: str | None = None
    text: str | None = None
    cache_dir: AbsolutePath = Field(Path(".itr_cache/teachers"), validate_default=True)
    batch_size: PositiveInt = 64
    backend: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="where extraction runs: ray = a Ray Data actor pool, one model per actor (one GPU each "
        "where the cluster has GPUs); local = this process; auto = the Ray cluster's GPUs when "
        "connected to one that has them, else this machine (orchestrator.teachers.placement)",
    )
    num_actors: PositiveInt | None = Field(None, description="ray: actors; unset = one per GPU (per node without)")
