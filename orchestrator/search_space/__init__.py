"""Search-space files (``search_spaces/*.yaml``): read, validate against the experiment config, turn into Tune.

A space file::

    name: smoke                        # optional; default: the file's stem. Names the sweep folder.
    base: ../configs/tiny.yaml         # a config path (absolute, or relative to the space file, the cwd or
                                       # the repo root, first that exists) or an inline mapping
    overrides: [train.epochs=2]        # optional dotted overrides of the base (list of a.b=c, or a mapping)
    space:                             # dotted config path -> one distribution
      loss.family: {grid: [infonce, triplet]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.warmup_steps: {randint: [0, 20]}      # both bounds inclusive
      loss.margin: {uniform: [0.1, 0.3]}
      train.batch_size: {choice: [32, 64]}
    seeds: [0, 1]                      # optional: every trial once per seed (a grid over train.seed)
    num_samples: 1                     # Tune's: the grid is repeated, random distributions re-sampled
    metric: val/rsum                   # a val/ retrieval metric (recall.py's names) or train/loss
    mode: max                          # default: min for loss/medr/meanr, max otherwise
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2, max_t: 3}   # or {type: fifo}
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}        # per trial (per Train worker when a trial needs several workers/GPUs)
    max_failures: 0                    # Tune retries of a failed trial (from its last checkpoint)

Everything is checked before a trial starts: unknown keys, unknown dotted paths, a distribution of the wrong kind
for the field's type (``uniform`` on an integer field: :mod:`orchestrator.space_checks`), a value the field rejects
(each grid value, both bounds and an interior sample of each range, substituted into the base config), every
combination of grid values and range bounds against the cross-field rules (refused beyond
``space_checks.MAX_COMBINATIONS``), ASHA's ``grace_period`` against the trials' epochs when ``max_t`` is unset, and
a metric some trial does not report (:mod:`orchestrator.metrics_catalogue`). Errors are ``UserError``s naming the
space file and the line of the offending key. YAML is read with the safe loader only.

Modules: ``spec`` (the file's structure: distributions, scheduler, resources), ``loading`` (``load_space``, the
checks, ``SearchSpace``); every public name is importable from ``orchestrator.search_space``.
"""

from orchestrator.search_space.loading import (
    PATH_FIELDS,
    REPO_ROOT,
    SearchSpace,
    default_mode,
    get_dotted,
    load_space,
    plain,
    trial_config,
    trial_tree,
)
from orchestrator.search_space.spec import (
    DIST_KINDS,
    AshaScheduler,
    Distribution,
    FifoScheduler,
    Resources,
    SchedulerSpec,
    SpaceSpec,
)

__all__ = [
    "PATH_FIELDS",
    "REPO_ROOT",
    "SearchSpace",
    "default_mode",
    "get_dotted",
    "load_space",
    "plain",
    "trial_config",
    "trial_tree",
    "DIST_KINDS",
    "AshaScheduler",
    "Distribution",
    "FifoScheduler",
    "Resources",
    "SchedulerSpec",
    "SpaceSpec",
]
