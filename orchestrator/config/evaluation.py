"""The ``eval`` section: the splits scored after each epoch, and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from orchestrator.config.base import PositiveInt, Section


class EvalConfig(Section):
    splits: list[Literal["val", "test"]] = ["val"]
    batch_size: PositiveInt = 256
    chunk_size: PositiveInt = 1024
    ks: tuple[PositiveInt, ...] = (1, 5, 10)
    reports: StrictBool = Field(
        True, description="log report figures (recall curves, t-SNE, case study) at the end of a run"
    )
    relevance_aggregation: Literal["max", "mean"] = Field(
        "max", description="itr eval --graded: caption-caption relevance aggregated over an image's captions"
    )
