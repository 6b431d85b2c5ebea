"""Seed-aware results: settings (trials grouped by every varied value except the seed) with mean, std, 95%
t-interval and n over seeds, the reproduce verdict on that interval, per-query ranks of a final evaluation, and the
paired bootstrap over evaluation images that compares a setting with a baseline.

Pure numpy / scipy (no Ray, MLflow or torch): :mod:`.settings`, :mod:`.query_ranks`, :mod:`.paired_bootstrap`.
"""

from orchestrator.results.paired_bootstrap import MetricDelta, PairedBootstrap, metric_names, paired_bootstrap
from orchestrator.results.query_ranks import QueryRanks
from orchestrator.results.settings import (
    DEFAULT_SEED_KEY,
    SeedRecord,
    SeedStats,
    Setting,
    Verdict,
    group_settings,
    rank_settings,
    seed_stats,
    verdict,
)

__all__ = [
    "DEFAULT_SEED_KEY",
    "MetricDelta",
    "PairedBootstrap",
    "QueryRanks",
    "SeedRecord",
    "SeedStats",
    "Setting",
    "Verdict",
    "group_settings",
    "metric_names",
    "paired_bootstrap",
    "rank_settings",
    "seed_stats",
    "verdict",
]
