"""The schema of a recipe file (``recipes/*.yaml``; the format is described in ``orchestrator.recipe``).

Pydantic models of the file as written: its inputs, runs, reference rows and notify URLs. ``load_recipe``
validates a file against ``RecipeSpec``, then resolves it into a ``Recipe``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.spec_files import StrictModel, is_name


class InputSpec(StrictModel):
    """A path the user supplies: ``--input NAME=PATH``, else ``$env``, else ``default``."""

    field: str
    help: str
    env: str | None = None
    default: str | None = None
    kind: Literal["dir", "file", "any"] = "any"
    template: str = "{path}"
    runs: list[str] | None = None

    @field_validator("template")
    @classmethod
    def _has_path(cls, v: str) -> str:
        if "{path}" not in v:
            raise ValueError("the template must contain {path}")
        return v


class ReferenceSpec(StrictModel):
    """One row of the reference table: a published (or measured) value, or another run's measured value."""

    value: Annotated[float, Field(allow_inf_nan=False)] | None = None
    relative_to: str | None = None
    tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    direction: Literal["higher", "lower", "both"] | None = None
    source: str
    enforce: bool = True

    @model_validator(mode="after")
    def _one_reference(self) -> ReferenceSpec:
        if (self.value is None) == (self.relative_to is None):
            raise ValueError("give exactly one of value / relative_to")
        return self


class EvaluateSpec(StrictModel):
    """A split scored on the run's best checkpoint after training: recall always, ``eccv`` (ECCV Caption, CxC,
    COCO 1K/5K on the COCO 5K test images) and ``folds`` (averaged over N image folds) when asked."""

    split: Literal["val", "test"]
    eccv: bool = False
    folds: Annotated[int, Field(ge=2)] | None = None


class RunSpec(StrictModel):
    config: str | dict[str, Any] | None = None
    space: str | None = None
    overrides: list[str] = []
    evaluate: list[EvaluateSpec] = []
    description: str | None = None
    reference: dict[str, ReferenceSpec] = {}

    @field_validator("evaluate", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        """A split name (``evaluate: [test]``) is short for ``{split: test}``."""
        return [{"split": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_kind(self) -> RunSpec:
        if (self.config is None) == (self.space is None):
            raise ValueError("give exactly one of config (an experiment) / space (a sweep)")
        if self.space is not None and self.evaluate:
            raise ValueError("evaluate applies to experiments (a sweep reports its trials' val metrics)")
        return self


class RecipeSpec(StrictModel):
    name: str | None = None
    description: str
    provenance: dict[str, str] | None = None
    inputs: dict[str, InputSpec] = {}
    runs: dict[str, RunSpec]
    notify: list[str] = []  # apprise URLs told of a regression / recovery (orchestrator.notify)

    @field_validator("notify")
    @classmethod
    def _notify(cls, v: list[str]) -> list[str]:
        if not v:
            return v
        from orchestrator.notify import url_problem  # imports apprise, only for a recipe that notifies

        for i, url in enumerate(v, 1):
            problem = url_problem(url)
            if problem:
                raise ValueError(f"entry {i}: {problem}")  # never the URL itself: it holds tokens
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not is_name(v):
            raise ValueError("use letters, digits, '_', '-' and '.'")
        return v

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: dict[str, RunSpec]) -> dict[str, RunSpec]:
        if not v:
            raise ValueError("give at least one run")
        if not any(ref.enforce for run in v.values() for ref in run.reference.values()):
            raise ValueError("no run has an enforced reference row: nothing to compare")
        for key in v:
            if not is_name(key):
                raise ValueError(f"run name {key!r}: use letters, digits, '_', '-' and '.'")
        return v
