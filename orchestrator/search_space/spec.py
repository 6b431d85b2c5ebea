"""The structure of a search-space file (``search_spaces/*.yaml``, :mod:`orchestrator.search_space`): the
distributions, the scheduler, the per-trial resources, and the file's top-level keys (``SpaceSpec``). The checks
against the experiment config are in :mod:`orchestrator.search_space.loading` and :mod:`orchestrator.space_checks`."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from orchestrator.spec_files import StrictModel, is_name

DIST_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_SAMPLE_FRACTIONS = (0.0, 0.37, 1.0)


class Distribution(StrictModel):
    """Exactly one of grid / choice / uniform / loguniform / randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIST_KINDS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice"):
            if not value:
                raise ValueError(f"{kind} needs at least one value")
        else:
            lo, hi = value
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{kind} bounds must be finite")
            if kind == "randint" and lo > hi:
                raise ValueError(f"randint [{lo}, {hi}]: the lower bound is larger than the upper one")
            if kind != "randint" and not lo < hi:
                raise ValueError(f"{kind} [{lo}, {hi}]: the lower bound must be below the upper one")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    @property
    def categorical(self) -> bool:
        return self.kind in ("grid", "choice")

    def sample_values(self) -> list[Any]:
        """The values a trial may get (grid/choice) or representative samples (bounds and an interior point)."""
        kind, args = self.kind, self.args
        if kind in ("grid", "choice"):
            return list(args)
        lo, hi = args
        if kind == "randint":
            return sorted({lo, hi})
        if kind == "uniform":
            return [lo + f * (hi - lo) for f in _SAMPLE_FRACTIONS]
        return [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in _SAMPLE_FRACTIONS]

    def to_tune(self):
        from ray import tune

        kind, args = self.kind, self.args
        if kind == "grid":
            return tune.grid_search(list(args))
        if kind == "choice":
            return tune.choice(list(args))
        if kind == "uniform":
            return tune.uniform(*args)
        if kind == "loguniform":
            return tune.loguniform(*args)
        return tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive; ours is inclusive

    def describe(self) -> str:
        return f"{self.kind}: {json.dumps(self.args)}"


class FifoScheduler(StrictModel):
    type: Literal["fifo"] = "fifo"


class AshaScheduler(StrictModel):
    """Asynchronous successive halving on ``training_iteration`` (one report per epoch)."""

    type: Literal["asha"]
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_t: Annotated[int, Field(ge=1)] | None = Field(None, description="default: the trials' train.epochs")

    @model_validator(mode="after")
    def _grace(self) -> AshaScheduler:
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} is larger than max_t {self.max_t}")
        return self


SchedulerSpec = Annotated[FifoScheduler | AshaScheduler, Field(discriminator="type")]


class Resources(StrictModel):
    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0


class SpaceSpec(StrictModel):
    name: str | None = None
    description: str | None = None
    base: str | dict[str, Any]
    overrides: list[str] | dict[str, Any] = []
    space: dict[str, Distribution]
    metric: str = "val/rsum"
    mode: Literal["max", "min"] | None = None
    scheduler: SchedulerSpec = FifoScheduler()
    num_samples: Annotated[int, Field(ge=1)] = 1
    seeds: list[Annotated[int, Field(ge=0)]] | None = None
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    resources: Resources = Resources()
    max_failures: Annotated[int, Field(ge=0)] = 0
    #: the setting every other one is compared with (paired bootstrap over the evaluation's images, matched
    #: seeds pooled): a value of each varied parameter it fixes, e.g. ``{loss.family: infonce}``
    baseline: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not is_name(v):
            raise ValueError("use letters, digits, '_', '-' and '.' (it names a folder)")
        return v

    @field_validator("space")
    @classmethod
    def _non_empty(cls, v: dict[str, Distribution]) -> dict[str, Distribution]:
        if not v:
            raise ValueError("give at least one dotted config path to vary")
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
                raise ValueError(f"{key!r} is not a dotted config path (section.field)")
        return v

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        space = info.data.get("space")
        if v is None or space is None:  # no baseline, or the space's own error is reported
            return v
        if not v:
            raise ValueError("give the baseline's value of at least one varied parameter")
        for key, value in v.items():
            if key == "train.seed":
                raise ValueError("train.seed is not part of a setting (a setting's seeds are pooled)")
            if key not in space:
                raise ValueError(f"{key!r} is not varied by this space (it varies {', '.join(space)})")
            dist = space[key]
            allowed = dist.sample_values()
            if dist.categorical and json.dumps(value, sort_keys=True) not in {
                json.dumps(a, sort_keys=True) for a in allowed
            }:
                raise ValueError(f"{key}: {value!r} is not one of the space's values {allowed}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("give at least one seed (or leave seeds out)")
            if len(set(v)) != len(v):
                raise ValueError("seeds repeat")
        return v
