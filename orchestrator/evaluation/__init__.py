"""Retrieval evaluation: Recall@K, median/mean rank, RSUM and the COCO 1K fold protocol.

See :mod:`orchestrator.evaluation.recall` for the definitions (1-based ranks, optimistic ties).
"""
from orchestrator.evaluation.recall import fold_metrics, ranks, recall_from_ranks, retrieval_metrics

__all__ = ["fold_metrics", "ranks", "recall_from_ranks", "retrieval_metrics"]
