"""Recipe files (``recipes/*.yaml``): one or more runs (an experiment or a sweep) plus their reference table.

A recipe::

    name: cusa-vitb32-coco            # optional; default: the file's stem. Tags the MLflow runs (repro/recipe).
    description: ...
    provenance: {measured_at: ..., commit: ...}   # optional, free text: where a measured reference came from
    inputs:                           # paths the user supplies (data, weights); every one is checked up front
      coco_images:
        field: data.root              # the config field it fills
        env: ITR_COCO_IMAGES          # an environment variable that supplies it (or --input coco_images=PATH)
        default: /data/coco/images    # optional; relative paths are relative to the recipe file
        kind: dir                     # dir | file | any
        template: "{path}"            # e.g. "file:{path}" for a precomputed-features teacher
        runs: [cusa]                  # optional: only these runs need it (default: all)
        help: the COCO 2014 images folder
    notify: [json://hooks.internal:8080/itr]   # optional: apprise URLs told of a regression and the recovery
                                      # after one (orchestrator/notify.py; a URL with a token: $ITR_NOTIFY_URLS)
    runs:                             # run name -> exactly one of config (an experiment) / space (a sweep)
      cusa:
        config: ../configs/x.yaml     # a path (relative to the recipe, the cwd or the repo root) or a mapping
        overrides: [loss.alpha=0.1]
        evaluate: [test]              # splits scored on the best checkpoint -> test/... metrics; or
                                      # [{split: test, eccv: true, folds: 5}] -> test/eccv_r1/i2t, test/folds/rsum
        reference:
          test/rsum: {value: 429.7, tolerance: 3.0, source: "CUSA App. Table 8, row ViT-B/32 +CUSA, COCO 5K"}
          test/i2t_r1: {relative_to: baseline, tolerance: 0, source: ...}   # another run's measured value
          eccv/i2t_map_at_r: {value: 29.6, tolerance: 1, source: ..., enforce: false}  # shown, never judged

A reference row passes when the measured value is no worse than the reference by more than ``tolerance``
(``direction: higher`` -- the default for recalls and RSUM; ``lower`` for ranks and losses; ``both`` = within
±tolerance). Everything is validated before a run starts: errors are ``UserError``s naming the file, the line
and the key. YAML is read with the safe loader only.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config import (
    ExperimentConfig,
    TrackingConfig,
    apply_overrides,
    parse_override,
    read_yaml,
    validate_config,
)
from orchestrator.errors import UserError
from orchestrator.metrics_catalogue import evaluation_metrics, reported_metrics, unreported
from orchestrator.recipe_spec import EvaluateSpec, RecipeSpec, ReferenceSpec, RunSpec
from orchestrator.search_space import SearchSpace, default_mode, load_space
from orchestrator.spec_files import first_error, read_spec_file

REPO_ROOT = Path(__file__).resolve().parent.parent
#: tag keys on the MLflow runs a reproduction touches
TAG_RECIPE, TAG_RUN, TAG_STATUS = "repro/recipe", "repro/run", "repro/status"


# ---------------------------------------------------------------------------------------- loaded form
@dataclass
class Reference:
    """A reference row, resolved: ``direction`` filled in from the metric's name when the recipe left it out."""

    run: str
    metric: str
    value: float | None
    relative_to: str | None
    tolerance: float
    direction: str
    source: str
    enforce: bool


@dataclass
class RecipeRun:
    """One run of a recipe, validated: ``config`` for an experiment, ``space`` for a sweep."""

    name: str
    config: ExperimentConfig | None
    space: SearchSpace | None
    evaluate: list[EvaluateSpec]
    references: list[Reference]
    line: str  # "file:line" of the run's key, for messages

    @property
    def kind(self) -> str:
        return "sweep" if self.space is not None else "experiment"

    @property
    def tracking_config(self) -> TrackingConfig:
        if self.space is not None:
            return self.space.base_config.tracking
        if self.config is None:  # load_recipe gives every run exactly one of the two
            raise ValueError(f"recipe run {self.name!r} has neither a config nor a search space")
        return self.config.tracking


@dataclass
class Recipe:
    path: Path
    spec: RecipeSpec
    runs: list[RecipeRun]  # in execution order (a relative_to run before its user)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> resolved value (template applied)

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    @property
    def references(self) -> list[Reference]:
        return [r for run in self.runs for r in run.references]


# --------------------------------------------------------------------------------------------- loading
def _find_file(ref: str, recipe: Path) -> Path | None:
    p = Path(ref).expanduser()
    for c in [p] if p.is_absolute() else [recipe.parent / p, Path.cwd() / p, REPO_ROOT / p]:
        if c.is_file():
            return c.resolve()
    return None


def _parse_assignments(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for text in items:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UserError(f"{text!r} is not of the form NAME=VALUE", path=what)
        out[name.strip()] = value.strip()
    return out


def resolve_inputs(spec: RecipeSpec, path: Path, given: dict[str, str], runs: set[str], where) -> dict[str, str]:
    """Each needed input's value (template applied); a missing one is a UserError naming the path it looked for."""
    for name in given:
        if name not in spec.inputs:
            known = ", ".join(spec.inputs) or "none"
            raise UserError(f"--input {name}: the recipe has no such input (inputs: {known})", path=str(path))
    out = {}
    for name, inp in spec.inputs.items():
        if inp.runs is not None and not runs & set(inp.runs):
            continue
        how = " or ".join(filter(None, [f"set {inp.env}" if inp.env else None, f"pass --input {name}=PATH"]))
        env_value = os.environ.get(inp.env) if inp.env else None
        raw, base = (
            (given[name], Path.cwd())
            if name in given
            else (env_value, Path.cwd())
            if env_value
            else (inp.default, path.parent)
        )  # a default is relative to the recipe file
        if not raw:
            raise UserError(f"not supplied: {inp.help}; {how}", path=where("inputs", name), field=f"inputs.{name}")
        p = Path(raw).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        ok = {"dir": p.is_dir(), "file": p.is_file(), "any": p.exists()}[inp.kind]
        if not ok:
            what = {"dir": "folder", "file": "file", "any": "path"}[inp.kind]
            raise UserError(
                f"{what} {p} does not exist ({inp.help}); {how}", path=where("inputs", name), field=f"inputs.{name}"
            )
        out[name] = inp.template.format(path=str(p))
    return out


def _override(dotted: str, value: Any) -> str:
    return f"{dotted}={json.dumps(value)}"


def _experiment_config(run: RunSpec, name: str, recipe: Path, overrides: list[str], where) -> ExperimentConfig:
    if isinstance(run.config, dict):
        tree, source = copy.deepcopy(run.config), f"{recipe} (runs.{name}.config)"
    else:
        found = _find_file(str(run.config), recipe)
        if found is None:
            raise UserError(
                f"config file {run.config!r} not found (relative to the recipe, the current folder or the repo root)",
                path=where("runs", name, "config"),
                field=f"runs.{name}.config",
            )
        tree, source = read_yaml(found), str(found)
    try:
        tree = apply_overrides(tree, overrides)
        return validate_config(tree, source=source)
    except UserError as err:
        raise UserError(
            f"{err.field + ': ' if err.field else ''}{err.detail}", path=where("runs", name), field=f"runs.{name}"
        ) from None


def _allowed_metrics(
    cfg: ExperimentConfig | None, evaluate: list[EvaluateSpec], space: SearchSpace | None, train: bool = True
) -> set[str]:
    """What ``reproduce`` measures for a run (``metrics_catalogue``; ``train=False``: without ``train/*``).

    An experiment: its last report, which holds every metric of the run (init/... included), plus its
    ``evaluate`` entries. A sweep: ``best/<metric>``, and with tracking the best trial's metrics from MLflow."""
    if space is not None:
        allowed = {f"best/{space.metric}"}
        if space.base_config.tracking.enabled:
            allowed |= space.reported_by_every_trial(train=train)
        return allowed
    assert cfg is not None
    allowed = reported_metrics(cfg, train=train)
    for e in evaluate:
        allowed |= evaluation_metrics(e.split, cfg.eval.ks, folds=e.folds, eccv=e.eccv)
    return allowed


def _unmeasured(
    metric: str, cfg: ExperimentConfig | None, evaluate: list[EvaluateSpec], space: SearchSpace | None
) -> str | None:
    """Why ``reproduce`` will not measure ``metric`` for this run (the closest names it will), or None."""
    if metric in _allowed_metrics(cfg, evaluate, space, train=metric.startswith("train/")):
        return None
    base = cfg if cfg is not None else space.base_config  # type: ignore[union-attr]
    untracked = space is not None and not base.tracking.enabled
    why = " (a sweep without tracking reports only best/<metric>)" if untracked else ""
    return unreported(metric, _allowed_metrics(cfg, evaluate, space), what="this run", cfg=base) + why


#: (config, evaluate, space) of a loaded run: what ``_unmeasured`` needs to tell whether a metric is measured
Measures = tuple[ExperimentConfig | None, list[EvaluateSpec], SearchSpace | None]


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, inputs: list[str] | None = None, runs: list[str] | None = None
) -> Recipe:
    """Read and fully validate a recipe (inputs present, every run's config valid, every metric reportable).

    ``overrides``: ``a.b=c`` applied to every run; ``inputs``: ``NAME=PATH``; ``runs``: run only these (and the
    runs their ``relative_to`` references need)."""
    path = Path(path)
    spec_file = read_spec_file(path, what="recipe file")
    where = spec_file.where

    try:
        spec = RecipeSpec.model_validate(spec_file.tree)
    except ValidationError as err:
        first = first_error(err)
        raise spec_file.fail(first.counted(first.message), first.loc, field=first.dotted or None) from None

    order = _selected_runs(spec, path, runs, where)
    # --- inputs, then each run's config (recipe config -> inputs -> run overrides -> --set -> repro tags)
    given = _parse_assignments(list(inputs or []), "--input")
    values = resolve_inputs(spec, path, given, set(order), where)
    cli = list(overrides or [])
    for text in cli:
        parse_override(text)
    loaded: list[RecipeRun] = []
    measures: dict[str, Measures] = {}
    for name in order:
        fills = [
            _override(spec.inputs[i].field, v)
            for i, v in values.items()
            if (only := spec.inputs[i].runs) is None or name in only
        ]
        loaded.append(_load_run(spec, name, path, fills, cli, measures, where))
    return Recipe(path=path.resolve(), spec=spec, runs=loaded, inputs=values)


def _selected_runs(spec: RecipeSpec, path: Path, runs: list[str] | None, where: Callable[..., str]) -> list[str]:
    """Which runs, in execution order: the selected ones (``--run``; default all) plus what their relative_to
    rows need. An unknown run name, or a relative_to that names no other run, is a UserError."""
    for name in runs or []:
        if name not in spec.runs:
            raise UserError(f"--run {name}: no such run (runs: {', '.join(spec.runs)})", path=str(path))
    for name, run in spec.runs.items():
        for metric, ref in run.reference.items():
            if ref.relative_to is not None and (ref.relative_to not in spec.runs or ref.relative_to == name):
                raise UserError(
                    f"relative_to {ref.relative_to!r} is not another run of this recipe",
                    path=where("runs", name, "reference", metric),
                    field=f"runs.{name}.reference.{metric}",
                )
    return _execution_order(spec, set(runs or spec.runs))


def _load_run(
    spec: RecipeSpec,
    name: str,
    path: Path,
    fills: list[str],
    cli: list[str],
    measures: dict[str, Measures],
    where: Callable[..., str],
) -> RecipeRun:
    """Run ``name`` validated: its config (or space) with ``fills`` (the inputs), its own overrides, ``cli``
    (``--set``) and the repro tags applied, and its reference rows resolved. Records what it measures in
    ``measures`` (its relative_to runs come earlier in the execution order, so they are there already)."""
    run = spec.runs[name]
    for text in run.overrides:
        try:
            parse_override(text)
        except UserError as err:
            raise UserError(err.detail, path=where("runs", name, "overrides"), field=f"runs.{name}.overrides") from None
    recipe_name = spec.name or path.stem
    tags = [_override(f"tracking.tags.{TAG_RECIPE}", recipe_name), _override(f"tracking.tags.{TAG_RUN}", name)]
    all_overrides = fills + list(run.overrides) + cli + tags
    config, space = None, None
    if run.space is not None:
        found = _find_file(run.space, path)
        if found is None:
            raise UserError(
                f"search space {run.space!r} not found", path=where("runs", name, "space"), field=f"runs.{name}.space"
            )
        space = load_space(found, all_overrides)
    else:
        config = _experiment_config(run, name, path, all_overrides, where)
    measures[name] = (config, list(run.evaluate), space)
    references = [_reference(name, metric, ref, measures, where) for metric, ref in run.reference.items()]
    return RecipeRun(
        name=name,
        config=config,
        space=space,
        evaluate=list(run.evaluate),
        references=references,
        line=where("runs", name),
    )


def _reference(
    name: str, metric: str, ref: ReferenceSpec, measures: dict[str, Measures], where: Callable[..., str]
) -> Reference:
    """A reference row of run ``name``, resolved; an enforced row whose metric the run (or the run it is
    relative_to) does not measure is a UserError."""
    for who in [name] + ([ref.relative_to] if ref.relative_to and ref.enforce else []):
        problem = _unmeasured(metric, *measures[who]) if ref.enforce else None
        if problem:
            what = "" if who == name else f" (the run it is relative_to, {who})"
            raise UserError(
                f"{problem}{what} (or mark the row enforce: false)",
                path=where("runs", name, "reference", metric),
                field=f"runs.{name}.reference",
            )
    return Reference(
        run=name,
        metric=metric,
        value=ref.value,
        relative_to=ref.relative_to,
        tolerance=ref.tolerance,
        direction=ref.direction or ("higher" if default_mode(metric) == "max" else "lower"),
        source=ref.source,
        enforce=ref.enforce,
    )


def _execution_order(spec: RecipeSpec, selected: set[str]) -> list[str]:
    """The selected runs and their relative_to dependencies, each after the runs it compares with."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise UserError(f"runs.{name}: relative_to references form a cycle")
        visiting.add(name)
        for ref in spec.runs[name].reference.values():
            if ref.relative_to is not None:
                visit(ref.relative_to)
        order.append(name)

    for name in spec.runs:
        if name in selected:
            visit(name)
    return order
