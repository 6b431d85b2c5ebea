"""The metric catalogue: every metric name a config (and a recipe's evaluation) will report, so that a metric
something relies on -- ``train.best_metric``, a search space's ``metric``, a recipe's reference rows -- is checked
before anything trains.

Where the names come from (nothing here is a list to extend by hand):

* ``train/*``: ``train/loss`` and the loop's bookkeeping, each term the loss family declares it returns
  (``methods.families.LossFamily.logged_terms``) and each temperature it owns (``LossFamily.temperatures``);
* ``val/*``: the retrieval metrics of the configured evaluation (``eval.ks``) when ``eval.splits`` has val;
* ``init/val/*``: the same, of the untrained model, when ``train.eval_at_start`` is on;
* ``best/<train.best_metric>``: the best value so far of the selection metric;
* ``<split>/...``, ``<split>/folds/...``, ``<split>/<eccv metric>/<i2t|t2i>``: a recipe's ``evaluate`` entries.

Core layer: no Ray, no MLflow; torch only through the loss family (``train_metrics``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from orchestrator.errors import UserError

if TYPE_CHECKING:  # config imports this module; the types are only for annotations
    from orchestrator.config import EvalConfig, ExperimentConfig

#: keys the training loop reports every epoch whatever the loss (besides its terms and temperatures)
LOOP_METRICS = (
    "train/loss",
    "train/lr",
    "train/epoch_time_s",
    "train/pairs_per_s",
    "train/data_wait_fraction",
    "train/skipped_images",
    "train/steps",
    "epoch",
)
#: the loop's wall-clock metrics: they differ between two runs that are otherwise identical
TIMING_METRICS = ("train/epoch_time_s", "train/pairs_per_s", "train/data_wait_fraction")
#: ECCV Caption / CxC / COCO 1K+5K metrics of ``evaluation.eccv.eccv_metrics`` (each as ``<name>/<i2t|t2i>``)
ECCV_METRICS = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision") + tuple(
    f"{p}_r{k}" for p in ("coco_1k", "coco_5k", "cxc") for k in (1, 5, 10)
)

_train_cache: dict[str, tuple[str, ...]] = {}


def recall_metrics(ks: Iterable[int]) -> list[str]:
    """The keys of ``evaluation.recall.recall_from_ranks`` for these K (unprefixed: ``i2t_r1``, ``rsum``, ...)."""
    ks = [int(k) for k in ks]
    return (
        [f"i2t_r{k}" for k in ks]
        + [f"t2i_r{k}" for k in ks]
        + ["rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"]
    )


def validation_metrics(eval_cfg: EvalConfig) -> list[str]:
    """``val/*`` reported by every run of this evaluation section (at least at the last epoch); [] without val."""
    return [f"val/{m}" for m in recall_metrics(eval_cfg.ks)] if "val" in eval_cfg.splits else []


def train_metrics(cfg: ExperimentConfig) -> list[str]:
    """``train/*`` (and ``epoch``) of ``cfg``: the loop's own keys, the loss family's terms and temperatures.

    Builds the loss module (cheap: no data, no model); the result is cached by the loss section."""
    key = json.dumps([cfg.loss.model_dump(mode="json"), cfg.relevance_source], sort_keys=True)
    if key not in _train_cache:
        from methods.families import LossFamily  # torch: only when a train/ metric is asked about
        from orchestrator.losses import build_loss

        loss_fn = build_loss(cfg)
        if not isinstance(loss_fn, LossFamily):  # the registry holds any nn.Module; the terms are LossFamily's
            raise TypeError(f"loss family {cfg.loss.family!r} is a {type(loss_fn).__name__}, not a LossFamily")
        terms = [f"train/{t}" for t in loss_fn.logged_terms()]
        temps = [f"train/temperature/{name.replace('.value', '')}" for name in loss_fn.temperatures()]
        _train_cache[key] = tuple(dict.fromkeys([*LOOP_METRICS, *terms, *temps]))
    return list(_train_cache[key])


def reported_metrics(cfg: ExperimentConfig, *, train: bool = True) -> set[str]:
    """Every key the training loop of ``cfg`` reports (the union over its epochs; the last epoch's report holds
    them all). ``train=False`` leaves out ``train/*`` (and ``epoch``), which need the loss module (torch)."""
    val = validation_metrics(cfg.eval)
    names = set(val)
    if val and cfg.train.eval_at_start:
        names |= {f"init/{m}" for m in val}
    if cfg.train.best_metric in val:
        names.add(f"best/{cfg.train.best_metric}")
    if train:
        names |= set(train_metrics(cfg))
    return names


def evaluation_metrics(split: str, ks: Iterable[int], *, folds: int | None = None, eccv: bool = False) -> set[str]:
    """The keys a recipe's ``evaluate`` entry adds: ``itr eval``'s metrics
    (``reproduce.evaluate_recipe_checkpoint``)."""
    recall = recall_metrics(ks)
    names = {f"{split}/{m}" for m in recall}
    if folds:
        names |= {f"{split}/folds/{m}" for m in recall}
    if eccv:
        names |= {f"{split}/{m}/{d}" for m in ECCV_METRICS for d in ("i2t", "t2i")}
    return names


def closest(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names of ``names`` most like ``name`` (difflib), best first."""
    return difflib.get_close_matches(name, sorted(set(names)), n=n, cutoff=0.0)


def unreported(
    name: str, names: Iterable[str], *, what: str = "this config", cfg: ExperimentConfig | None = None
) -> str:
    """The message for a metric ``name`` that is not among ``names``: the closest valid ones, and the setting
    of ``cfg`` that leaves it out where that is the reason."""
    names = set(names)
    why = ""
    if cfg is not None and name.startswith(("val/", "init/val/", "best/val/")) and "val" not in cfg.eval.splits:
        why = " (eval.splits has no val)"
    elif cfg is not None and name.startswith("init/") and not cfg.train.eval_at_start:
        why = " (train.eval_at_start is false)"
    hint = f"; closest: {', '.join(closest(name, names))}" if names else ""
    return f"{name!r} is not reported by {what}{why}{hint}"


def require(
    name: str, names: Iterable[str], *, path: str | None = None, field: str | None = None, what: str = "this config"
) -> None:
    """A ``UserError`` naming ``path``/``field`` and the closest valid names unless ``name`` is in ``names``."""
    names = set(names)
    if name not in names:
        raise UserError(unreported(name, names, what=what), path=path, field=field)
