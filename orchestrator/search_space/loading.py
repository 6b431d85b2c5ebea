"""Loading a search-space file: ``load_space`` reads it, validates it against the experiment config (every check
listed in :mod:`orchestrator.search_space`) and gives the ``SearchSpace`` ready for Tune."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config import (
    ExperimentConfig,
    apply_overrides,
    parse_override,
    read_yaml,
    set_dotted,
    validate_config,
)
from orchestrator.errors import UserError
from orchestrator.metrics_catalogue import reported_metrics, unreported, validation_metrics
from orchestrator.search_space.spec import DIST_KINDS, AshaScheduler, Distribution, SpaceSpec
from orchestrator.space_checks import MAX_COMBINATIONS, count_combinations, joint_points, type_mismatch
from orchestrator.spec_files import SpecFile, first_error, located, read_spec_file
from orchestrator.yaml_io import LineMap

REPO_ROOT = Path(__file__).resolve().parents[2]
#: config fields holding paths that must not depend on a worker's cwd
PATH_FIELDS = (
    "data.root",
    "data.annotations",
    "model.pretrained",
    "teachers.cache_dir",
    "train.output_dir",
    "tracking.artifact_dir",
)


# -------------------------------------------------------------------------------------------- helpers
def get_dotted(tree: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python scalars."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def trial_tree(base_tree: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config mapping with a trial's dotted values set."""
    tree = copy.deepcopy(base_tree)
    for dotted, value in params.items():
        set_dotted(tree, dotted, plain(value))
    return tree


def trial_config(base_tree: dict[str, Any], params: dict[str, Any], source: str = "<trial>") -> ExperimentConfig:
    return validate_config(trial_tree(base_tree, params), source=source)


def _metrics_key(cfg: ExperimentConfig) -> str:
    """What decides the metrics a trial reports (its evaluation, its loss), as a hashable key."""
    return json.dumps(
        [
            cfg.eval.model_dump(mode="json"),
            cfg.train.eval_at_start,
            cfg.train.best_metric,
            cfg.loss.model_dump(mode="json"),
            cfg.relevance_source,
        ],
        sort_keys=True,
    )


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def default_mode(metric: str) -> str:
    return "min" if any(s in metric for s in ("loss", "medr", "meanr")) else "max"


def _absolute_paths(tree: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    """Path fields as the driver's validation resolved them (absolute, against its cwd), so trials anywhere agree."""
    tree = copy.deepcopy(tree)
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            set_dotted(tree, dotted, str(value))
    return tree


# ------------------------------------------------------------------------------------------- loading
@dataclass
class SearchSpace:
    """A validated space file, ready for Tune."""

    path: Path
    spec: SpaceSpec
    text: str
    base_tree: dict[str, Any]  # sparse mapping: base + overrides + --set, path fields absolute
    base_config: ExperimentConfig
    base_source: str
    metric: str
    mode: str
    cli_overrides: list[str] = field(default_factory=list)
    lines: LineMap | None = None
    trial_configs: list[ExperimentConfig] = field(default_factory=list)  # one per distinct set of metrics

    def reported_by_every_trial(self, train: bool = True) -> set[str]:
        """The metrics every trial of the space reports (``metrics_catalogue.reported_metrics``)."""
        configs = self.trial_configs or [self.base_config]
        return set.intersection(*(reported_metrics(cfg, train=train) for cfg in configs))

    def where(self, *key_path: Any) -> str:
        """``file:line`` of a key of the space file (for errors found after loading)."""
        return located(self.path, self.lines, key_path)

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    @property
    def distributions(self) -> dict[str, Distribution]:
        """The space with ``seeds`` as a grid over ``train.seed``."""
        return _distributions(self.spec)

    @property
    def varied(self) -> list[str]:
        return list(self.distributions)

    def param_space(self) -> dict[str, Any]:
        return {k: d.to_tune() for k, d in self.distributions.items()}

    @property
    def num_trials(self) -> int:
        grid = 1
        for d in self.distributions.values():
            if d.kind == "grid":
                grid *= len(d.args)
        return grid * self.spec.num_samples

    def max_epochs(self) -> int:
        dist = self.distributions.get("train.epochs")
        if dist is not None:
            return int(max(dist.sample_values()))
        return self.base_config.train.epochs

    def max_t(self) -> int:
        sched = self.spec.scheduler
        return sched.max_t if isinstance(sched, AshaScheduler) and sched.max_t else self.max_epochs()

    def settings(self) -> dict[str, str]:
        """The search settings as flat MLflow params."""
        sched = self.spec.scheduler.model_dump()
        if isinstance(self.spec.scheduler, AshaScheduler):
            sched["max_t"] = self.max_t()
        out = {
            "sweep.name": self.name,
            "sweep.metric": self.metric,
            "sweep.mode": self.mode,
            "sweep.scheduler": sched.pop("type"),
            "sweep.num_samples": str(self.spec.num_samples),
            "sweep.num_trials": str(self.num_trials),
            "sweep.seeds": json.dumps(self.spec.seeds) if self.spec.seeds else "none",
            "sweep.max_concurrent_trials": str(self.spec.max_concurrent_trials),
            "sweep.resources": json.dumps(self.spec.resources.model_dump()),
            "sweep.max_failures": str(self.spec.max_failures),
            "sweep.base": self.base_source,
        }
        out.update({f"sweep.scheduler.{k}": str(v) for k, v in sched.items()})
        out.update({f"space.{k}": d.describe() for k, d in self.spec.space.items()})
        if self.cli_overrides:
            out["sweep.cli_overrides"] = json.dumps(self.cli_overrides)
        return out

    def fingerprint(self) -> str:
        """A hash of what decides the trials (base, space, settings); a resumed sweep must match it."""
        blob = json.dumps(
            {
                "base": self.base_tree,
                "space": {k: d.model_dump() for k, d in self.distributions.items()},
                "settings": self.settings(),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _find_base_file(ref: str, space_path: Path) -> Path | None:
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [space_path.parent / p, Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _override_items(overrides: list[str] | dict[str, Any]) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(dotted key, a.b=c text, yaml path for its line) for each override of the space file."""
    items: list[tuple[str, str, tuple[Any, ...]]] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            items.append((str(key), f"{key}={json.dumps(value)}", ("overrides", key)))
    else:
        for i, text in enumerate(overrides):
            key = text.split("=", 1)[0].strip()
            items.append((key, text, ("overrides", i)))
    return items


def _blame(field: str | None, keys: list[str]) -> str | None:
    """The swept/overridden key responsible for an error on ``field`` (longest matching prefix either way)."""
    if not field:
        return None
    best = None
    for key in keys:
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None and field.startswith("loss.") and "loss.family" in keys:
        best = "loss.family"
    return best


def load_space(path: str | Path, cli_overrides: list[str] | None = None) -> SearchSpace:
    """Read and fully validate a space file; every error is a UserError naming the file and the key's line."""
    path = Path(path)
    spec_file = read_spec_file(path, what="search space file")
    spec = _space_spec(spec_file)
    cli_overrides = list(cli_overrides or [])
    base_tree, base_source, base_cfg = _base_config(spec, spec_file, path, cli_overrides)
    dists = _distributions(spec)
    _check_each_value(spec, spec_file, dists, base_tree, base_cfg)
    trials = _check_combinations(spec, spec_file, dists, base_tree)
    _check_metric(spec, spec_file, trials)
    mode = spec.mode or default_mode(spec.metric)
    base_tree = _absolute_paths(base_tree, base_cfg)
    return SearchSpace(
        path=path.resolve(),
        spec=spec,
        text=spec_file.text,
        base_tree=base_tree,
        base_config=base_cfg,
        base_source=base_source,
        metric=spec.metric,
        mode=mode,
        cli_overrides=cli_overrides,
        lines=spec_file.lines,
        trial_configs=[cfg for _, cfg in trials.values()],
    )


def _space_spec(spec_file: SpecFile) -> SpaceSpec:
    """The file's own structure (keys, distributions, scheduler), validated."""
    try:
        return SpaceSpec.model_validate(spec_file.tree)
    except ValidationError as err:
        first = first_error(err, union_tags={"scheduler": ("fifo", "asha")})
        loc, msg = first.loc, first.message
        if first.type == "extra_forbidden" and len(loc) == 3 and loc[0] == "space":
            msg += " (a distribution is one of " + ", ".join(DIST_KINDS) + ")"
        raise spec_file.fail(first.counted(f"{first.dotted or '(top level)'}: {msg}"), loc) from None


def _base_config(
    spec: SpaceSpec, spec_file: SpecFile, path: Path, cli_overrides: list[str]
) -> tuple[dict[str, Any], str, ExperimentConfig]:
    """(mapping, source, validated config) of the base: the file's ``base`` + its ``overrides`` + ``--set``; an
    error names the override (or inline base key) responsible."""
    shown, fail = spec_file.shown, spec_file.fail
    if isinstance(spec.base, dict):
        base_tree, base_source = copy.deepcopy(spec.base), f"{shown} (inline base)"
    else:
        base_file = _find_base_file(spec.base, path)
        if base_file is None:
            raise fail(
                f"base: config file {spec.base!r} not found (relative to the space file, the current "
                f"folder or the repo root)",
                ("base",),
            )
        base_tree, base_source = read_yaml(base_file), str(base_file)
    overrides = _override_items(spec.overrides)
    for _key, text_, ypath in overrides:
        try:
            parse_override(text_)
        except UserError as err:
            raise fail(f"overrides: {err.detail}", ypath) from None
        base_tree = apply_overrides(base_tree, [text_])
    cli_keys = {".".join(parse_override(o)[0]) for o in cli_overrides}
    swept = set(spec.space) | ({"train.seed"} if spec.seeds else set())
    for key in sorted(cli_keys & swept):
        raise UserError(f"--set {key}: this field is swept by the space file; change the space instead", path=shown)
    base_tree = apply_overrides(base_tree, cli_overrides)
    if spec.seeds and "train.seed" in spec.space:
        raise fail("seeds: train.seed is also in space; give the seeds in one place", ("seeds",))
    try:
        return base_tree, base_source, validate_config(base_tree, source=base_source)
    except UserError as err:
        culprit = _blame(err.field, [k for k, _, _ in overrides])
        if err.field in cli_keys or _blame(err.field, sorted(cli_keys)):
            raise UserError(f"{err.field}: {err.detail} (from --set)", path=shown) from None
        if culprit is not None:
            ypath = next(p for k, _, p in overrides if k == culprit)
            raise fail(f"overrides: {err.field}: {err.detail}", ypath) from None
        if isinstance(spec.base, dict):
            raise fail(f"base.{err.field}: {err.detail}", ("base", *(err.field or "").split("."))) from None
        raise


def _distributions(spec: SpaceSpec) -> dict[str, Distribution]:
    """The space with ``seeds`` as a grid over ``train.seed``."""
    dists = dict(spec.space)
    if spec.seeds:
        dists["train.seed"] = Distribution(grid=list(spec.seeds))
    return dists


def _key_path(spec: SpaceSpec, key: str) -> tuple[Any, ...]:
    """The file's key path of a varied config field (for the error's line)."""
    return ("seeds",) if key == "train.seed" and spec.seeds else ("space", key)


def _swept_families(dists: dict[str, Distribution]) -> list[Any]:
    return dists["loss.family"].sample_values() if "loss.family" in dists else [None]


def _check_alone(base_tree: dict[str, Any], key: str, value: Any, families: list[Any], shown: str) -> None:
    """``key = value`` valid with at least one swept loss family (a loss field belongs to some families only)."""
    first: UserError | None = None
    for family in families if key.startswith("loss.") and key != "loss.family" else [None]:
        params = {key: value} if family is None else {"loss.family": family, key: value}
        try:
            trial_config(base_tree, params, source=shown)
            return
        except UserError as err:
            first = first or err
    assert first is not None
    raise first


def _check_each_value(
    spec: SpaceSpec,
    spec_file: SpecFile,
    dists: dict[str, Distribution],
    base_tree: dict[str, Any],
    base_cfg: ExperimentConfig,
) -> None:
    """Each distribution alone: its kind against the field's type, each grid value / range sample substituted."""
    fail = spec_file.fail
    families = _swept_families(dists)
    loss_families = families if families != [None] else [base_cfg.loss.family]
    for key, dist in dists.items():
        mismatch = type_mismatch(key, dist.kind, loss_families)
        if mismatch:
            raise fail(f"space.{key}: {mismatch}", _key_path(spec, key))
        for value in dist.sample_values():
            try:
                _check_alone(base_tree, key, value, families, spec_file.shown)
            except UserError as err:
                if err.detail == "unknown key" and err.field == key:
                    family = families if families != [None] else [get_dotted(base_tree, "loss.family", "infonce")]
                    where = (
                        f" (no field of loss family {', '.join(map(str, family))})" if key.startswith("loss.") else ""
                    )
                    raise fail(f"space.{key}: unknown config path{where}", _key_path(spec, key)) from None
                shown_value = f"{value:.4g}" if isinstance(value, float) else repr(value)
                what = f"{dist.kind} {'value' if dist.categorical else 'sample'} {shown_value}"
                where = "" if err.field and (err.field == key or key.startswith(err.field + ".")) else f" ({err.field})"
                raise fail(f"space.{key}: {what} does not fit{where}: {err.detail}", _key_path(spec, key)) from None


def _check_combinations(
    spec: SpaceSpec, spec_file: SpecFile, dists: dict[str, Distribution], base_tree: dict[str, Any]
) -> dict[str, tuple[dict[str, Any], ExperimentConfig]]:
    """Every combination of grid values and range bounds (the corners of the continuous box: exact for the
    cross-field rules, which are monotone in each field -- min_lr <= lr, temperature init in [min, max], ...),
    and ASHA's grace period against each trial's epochs. Returns one (params, config) per distinct set of
    reported metrics."""
    fail = spec_file.fail
    keys = list(dists)
    points = [joint_points(dists[k].kind, dists[k].args) for k in keys]
    total = count_combinations(points)
    if total > MAX_COMBINATIONS:
        raise fail(
            f"space: {total} combinations of grid values and range bounds to validate, more than "
            f"{MAX_COMBINATIONS}; split the sweep into smaller spaces",
            ("space",),
        )
    trials: dict[str, tuple[dict[str, Any], ExperimentConfig]] = {}
    for combo in itertools.product(*points):
        params = dict(zip(keys, combo))
        try:
            cfg = trial_config(base_tree, params, source=spec_file.shown)
        except UserError as err:
            culprit = _blame(err.field, keys)
            shown_combo = ", ".join(f"{k}={v!r}" for k, v in params.items())
            ypath = _key_path(spec, culprit) if culprit else ("space",)
            raise fail(f"space: the combination {shown_combo} is invalid: {err.field}: {err.detail}", ypath) from None
        trials.setdefault(_metrics_key(cfg), (params, cfg))
        sched = spec.scheduler
        if isinstance(sched, AshaScheduler) and sched.max_t is None and sched.grace_period > cfg.train.epochs:
            which = f"the trial {_shown(params)}" if "train.epochs" in params else "the trials"
            raise fail(
                f"scheduler.grace_period: {sched.grace_period} is larger than train.epochs = "
                f"{cfg.train.epochs} of {which} (ASHA's max_t defaults to train.epochs); lower it",
                ("scheduler", "grace_period"),
            )
    return trials


def _check_metric(
    spec: SpaceSpec, spec_file: SpecFile, trials: dict[str, tuple[dict[str, Any], ExperimentConfig]]
) -> None:
    """The metric is reported by every trial, every epoch it is evaluated (init/... only once: not a target)."""
    train = spec.metric.startswith("train/")
    for params, cfg in trials.values():
        names = {m for m in reported_metrics(cfg, train=train) if not m.startswith("init/") and m != "epoch"}
        if spec.metric not in names:
            every = {m for m in reported_metrics(cfg) if not m.startswith("init/") and m != "epoch"}
            what = f"the trial {_shown(params)}" if len(trials) > 1 else "any trial"
            hint = (
                ""
                if validation_metrics(cfg.eval) or not spec.metric.startswith("val/")
                else " (the base config does not evaluate on val: eval.splits)"
            )
            raise spec_file.fail(f"metric: {unreported(spec.metric, every, what=what)}{hint}", ("metric",))
