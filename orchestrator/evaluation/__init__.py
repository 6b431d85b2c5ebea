"""Retrieval evaluation: recall protocols (COCO 5K / 1K folds / Flickr30K 1K), ECCV Caption via the reference
package, graded relevance (NDCG, Kendall's tau), uni-modal image retrieval and STS, and report figures.

See :mod:`orchestrator.evaluation.recall` for the recall definitions (1-based ranks, ties counted against the model),
:mod:`.eccv`, :mod:`.graded`, :mod:`.unimodal` and :mod:`.reports`; :mod:`.suite` runs them for ``itr eval``.
``eccv_metrics`` needs the ``eccv-caption`` package (imported when called).
"""

from orchestrator.evaluation.eccv import eccv_metrics
from orchestrator.evaluation.graded import graded_metrics, kendall_tau_b_rows, ndcg_rows
from orchestrator.evaluation.recall import fold_metrics, ranks, recall_from_ranks, retrieval_metrics
from orchestrator.evaluation.unimodal import image_retrieval_recall, spearman, sts_spearman

__all__ = [
    "eccv_metrics",
    "fold_metrics",
    "graded_metrics",
    "image_retrieval_recall",
    "kendall_tau_b_rows",
    "ndcg_rows",
    "ranks",
    "recall_from_ranks",
    "retrieval_metrics",
    "spearman",
    "sts_spearman",
]
