"""Datasets: one in-memory index (``DatasetIndex``) for the synthetic, captions_json and karpathy formats."""

from orchestrator.data.index import DatasetIndex

__all__ = ["DatasetIndex"]
