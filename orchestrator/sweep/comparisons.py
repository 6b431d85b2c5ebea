"""A sweep's settings compared with its baseline (``baseline:`` in the space file) by a paired bootstrap over the
evaluation's images (``orchestrator.results.paired_bootstrap``), from the per-query ranks every trial's final
evaluation stores.

Each trial's final checkpoint holds ``query_ranks.npz``; when the trial completes, :func:`log_query_ranks` copies it
to the trial's child run as ``eval/query_ranks.npz``. At the sweep's end :func:`paired_rows` reads them back from
MLflow. The baseline fixes some varied parameters; every other setting is compared with the baseline setting that
agrees with it on the parameters the baseline leaves free (so ``baseline: {loss.family: infonce}`` on a
family x lr space compares each family with infonce at the same lr).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.checkpoint import QUERY_RANKS_FILE
from orchestrator.results.paired_bootstrap import paired_bootstrap
from orchestrator.results.query_ranks import QueryRanks
from orchestrator.results.settings import DEFAULT_SEED_KEY, Setting, group_settings
from orchestrator.sweep.settings_table import SeedView

log = logging.getLogger(__name__)

#: The child run's artifact holding its final evaluation's per-query ranks.
RANKS_ARTIFACT = f"eval/{QUERY_RANKS_FILE}"
RESAMPLES = 1000


def log_query_ranks(target: tracking.TrackingTarget, run_id: str, checkpoint: Any) -> bool:
    """Copy ``query_ranks.npz`` of a Tune ``checkpoint`` (its storage's filesystem: local or object storage) to the
    run as :data:`RANKS_ARTIFACT`; False when the checkpoint holds none (no val split, or no checkpoint)."""
    if checkpoint is None:
        return False
    from pyarrow import fs as pafs

    src = f"{str(checkpoint.path).rstrip('/')}/{QUERY_RANKS_FILE}"
    if checkpoint.filesystem.get_file_info(src).type != pafs.FileType.File:
        return False
    with tempfile.TemporaryDirectory(prefix="itr-ranks-") as tmp:
        local = Path(tmp) / QUERY_RANKS_FILE
        with checkpoint.filesystem.open_input_stream(src) as fin, open(local, "wb") as fout:
            fout.write(fin.read())
        tracking.send(target, run_id, tracking.artifact_op(local, "eval"))
    return True


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _key(values: Mapping[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _pairs(settings: Sequence[Setting], baseline: Mapping[str, Any]) -> list[tuple[Setting, Setting]]:
    """(baseline setting, candidate setting) for every setting that is not a baseline one and has a match."""
    fixed = dict(baseline)

    def is_baseline(s: Setting) -> bool:
        return all(_key({k: s.params.get(k)}) == _key({k: v}) for k, v in fixed.items())

    def free(s: Setting) -> str:
        return _key({k: v for k, v in s.params.items() if k not in fixed})

    bases = {free(s): s for s in settings if is_baseline(s)}
    return [(bases[free(s)], s) for s in settings if not is_baseline(s) and free(s) in bases]


def _ranks_by_seed(target: tracking.TrackingTarget, setting: Setting, tmp: Path) -> dict[Any, QueryRanks]:
    out: dict[Any, QueryRanks] = {}
    for seed, rec in zip(setting.seeds, setting.records):
        run_id = rec.trial.run_id
        if run_id is None:
            continue
        path = tracking.download_artifact(target, run_id, RANKS_ARTIFACT, tmp / run_id)
        if path is not None:
            out[seed] = QueryRanks.read(path)
    return out


def paired_rows(
    target: tracking.TrackingTarget,
    records: Sequence[Any],
    varied: Sequence[str],
    baseline: Mapping[str, Any],
    *,
    seed_key: str = DEFAULT_SEED_KEY,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per candidate setting: its varied values, the baseline's, the matched seeds, and for RSUM and each
    direction's R@K: baseline, candidate, delta, its 95% interval and the two-sided bootstrap p-value."""
    settings = group_settings([SeedView(r, dict(r.params), {}) for r in records], varied, seed_key)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="itr-paired-") as tmp_name:
        tmp = Path(tmp_name)
        for base, cand in _pairs(settings, baseline):
            a, b = _ranks_by_seed(target, base, tmp), _ranks_by_seed(target, cand, tmp)
            row: dict[str, Any] = {"setting": cand.label, "baseline": base.label}
            if not set(a) & set(b):
                row["note"] = "no matched seeds with stored per-query ranks"
                rows.append(row)
                continue
            result = paired_bootstrap(a, b, resamples=resamples, seed=seed)
            row["seeds"] = " ".join(str(s) for s in sorted(result.seeds, key=_seed_order))
            for name, d in result.metrics.items():
                row[f"{name} baseline"], row[f"{name} candidate"] = d.baseline, d.candidate
                row[f"{name} delta"] = d.delta
                row[f"{name} ci95"] = f"{d.ci_low:.2f}..{d.ci_high:.2f}"
                row[f"{name} p"] = d.p_value
            rows.append(row)
    return rows


__all__ = ["RANKS_ARTIFACT", "RESAMPLES", "log_query_ranks", "paired_rows"]
