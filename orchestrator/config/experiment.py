"""The whole experiment: ``ExperimentConfig`` (the sections and the rules across them), and loading one from a
mapping or a YAML file with ``--set`` overrides (errors are ``UserError``s naming the file and the dotted field)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from orchestrator.config import loss as loss_sections
from orchestrator.config.base import FieldError, Section
from orchestrator.config.data import DataConfig
from orchestrator.config.evaluation import EvalConfig
from orchestrator.config.loss import (
    CUSALoss,
    InfoNCELoss,
    LossConfig,
    RelevanceLossSection,
    loss_families,
    loss_section_union,
    on_registration,
)
from orchestrator.config.model import ModelConfig
from orchestrator.config.overrides import apply_overrides, flatten, parse_override
from orchestrator.config.teachers import TeachersConfig
from orchestrator.config.tracking import TrackingConfig
from orchestrator.config.train import ScalingConfig, TrainConfig
from orchestrator.errors import UserError
from orchestrator.spec_files import first_error, read_spec_file


class ExperimentConfig(Section):
    """One experiment: its sections, and the rules across them (a loss's inputs, the sampler, streamed data)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = InfoNCELoss()  # over every registered section: rebuilt when one is registered later
    # built per config, not once at import: their relative path defaults resolve against the cwd of the moment
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = ScalingConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _best_metric_reported(self) -> ExperimentConfig:
        """The best checkpoint is chosen on a metric the evaluation reports (else the pick would be arbitrary)."""
        from orchestrator.metrics_catalogue import unreported, validation_metrics

        val = validation_metrics(self.eval)
        if self.train.best_metric not in val:
            raise FieldError(
                "train.best_metric", unreported(self.train.best_metric, val, what="the evaluation", cfg=self)
            )
        return self

    @model_validator(mode="after")
    def _sampler_fits_loss(self) -> ExperimentConfig:
        if self.train.batch_sampler == "random" and not self.loss.supports_multi_positive:
            raise FieldError(
                "train.batch_sampler",
                f"random puts several captions of one image in a batch, but loss {self.loss.family!r} has "
                "multi_positive=false",
            )
        return self

    @model_validator(mode="after")
    def _local_loss_supported(self) -> ExperimentConfig:
        """``scaling.local_loss`` needs the gathered batch and a family whose terms are means over query rows."""
        if not self.scaling.local_loss:
            return self
        if not self.scaling.gather_global_batch:
            raise FieldError(
                "scaling.local_loss",
                "needs scaling.gather_global_batch: true (without the gathered "
                "batch every rank computes only its own rows already)",
            )
        if self.loss.family not in loss_sections.LOCAL_LOSS_FAMILIES:
            raise FieldError(
                "scaling.local_loss",
                f"not supported by loss family {self.loss.family!r}; "
                f"supported: {', '.join(loss_sections.LOCAL_LOSS_FAMILIES)}",
            )
        return self

    @model_validator(mode="after")
    def _loss_inputs_available(self) -> ExperimentConfig:
        loss = self.loss
        if isinstance(loss, CUSALoss):
            for side in ("image", "text"):
                if getattr(self.teachers, side) is None and (loss.alpha > 0 or loss.beta > 0):
                    raise FieldError(f"teachers.{side}", "loss family cusa needs a teacher encoder spec here")
            if loss.beta > 0 and self.model.heads in {"none", "cross"}:
                raise FieldError("model.heads", "cusa with beta > 0 needs the uni-modal heads (cross_uni or auto)")
        if isinstance(loss, RelevanceLossSection):
            source = self.relevance_source
            if source == "exact" and self.data.resolved_format != "synthetic":
                raise FieldError(
                    "loss.relevance",
                    f"exact relevance needs data that knows it (synthetic), not "
                    f"{self.data.resolved_format}; set a text teacher (teachers.text)",
                )
            if source == "teacher" and self.teachers.text is None:
                raise FieldError(
                    "teachers.text", f"loss family {loss.family} with teacher relevance needs a text teacher"
                )
        return self

    @model_validator(mode="after")
    def _streamed_training(self) -> ExperimentConfig:
        """What a webdataset train split cannot give: per-item features (teachers, cached locked towers), several
        captions of one image per batch, and eval splits without ``data.root``."""
        if self.data.resolved_format != "webdataset":
            return self
        if self.uses_teachers:
            raise FieldError(
                "loss.family",
                f"{self.loss.family} needs teacher features (or teacher relevance) of "
                "every training item, which streamed shards do not have (webdataset trains infonce, "
                "triplet, cusa with alpha = beta = 0)",
            )
        if self.model.cache_locked_towers and (self.model.lock_image or self.model.lock_text):
            raise FieldError(
                "model.cache_locked_towers",
                "a locked tower's outputs cannot be cached for streamed "
                "shards; set it false (the locked tower then runs each step)",
            )
        if self.train.batch_sampler != "unique_images":
            raise FieldError("train.batch_sampler", "webdataset batches hold one caption per image (unique_images)")
        if self.data.bad_images != "fail":
            raise FieldError(
                "data.bad_images",
                "webdataset stops at an image that does not decode, naming the shard "
                "(fail); skip is for the map formats",
            )
        if self.eval.splits and self.data.root is None:
            raise FieldError(
                "data.root",
                f"the eval splits ({', '.join(self.eval.splits)}) come from data.root "
                "(captions_json) or data.annotations + data.root (karpathy); webdataset streams only "
                "the train split",
            )
        return self

    @property
    def relevance_source(self) -> str | None:
        """``exact`` or ``teacher`` for the families that use a relevance matrix, else None."""
        return self.loss.relevance_source(self) if isinstance(self.loss, RelevanceLossSection) else None

    @property
    def uses_teachers(self) -> bool:
        """Whether training needs teacher features (CUSA's soft labels, or teacher relevance for RSC)."""
        if isinstance(self.loss, CUSALoss):
            return self.loss.alpha > 0 or self.loss.beta > 0
        return self.relevance_source == "teacher"

    @property
    def resolved_heads(self) -> str:
        if self.model.heads != "auto":
            return self.model.heads
        if isinstance(self.loss, CUSALoss):
            return "cross_uni" if self.loss.beta > 0 else "cross"
        return "none"

    def config_hash(self) -> str:
        """sha256 (16 hex) of the resolved config, canonical JSON."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """The resolved config as dotted ``section.key`` -> string (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _rebuild_loss_field() -> None:
    """``ExperimentConfig.loss`` over every registered section (one registered after this module was loaded)."""
    default = ExperimentConfig.model_fields["loss"].default
    ExperimentConfig.__pydantic_fields__["loss"] = FieldInfo.from_annotated_attribute(loss_section_union(), default)
    ExperimentConfig.model_rebuild(force=True)


on_registration(_rebuild_loss_field)


# ------------------------------------------------------------------------------------------- loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (:func:`orchestrator.spec_files.read_spec_file`); UserError naming the file (and
    line) otherwise."""
    return read_spec_file(path, what="config file").tree


def format_validation_error(err: ValidationError) -> tuple[str, str]:
    """(dotted field, message) of the first error of ``err`` (``loss.infonce.x`` named ``loss.x``; a
    ``FieldError`` names its own field; a short scalar input shown), with a count of the others."""
    first = first_error(err, union_tags={"loss": loss_families()}, missing=None)
    field = first.dotted or "(top level)"
    if isinstance(first.cause, FieldError):
        prefix, named = first.dotted, first.cause.field
        field = f"{prefix}.{named}" if prefix and not named.startswith(prefix) else named
    msg = first.message
    if (
        first.type not in {"extra_forbidden", "missing"}
        and first.has_input
        and not isinstance(first.input, (dict, list))
    ):
        shown = repr(first.input)
        if len(shown) < 60:
            msg = f"{msg} (got {shown})"
    return field, first.counted(msg)


def validate_config(tree: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """``ExperimentConfig`` from a mapping; a bad value raises ``UserError`` naming the source and field."""
    _reject_nan(tree, source, "")
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        field, msg = format_validation_error(err)
        raise UserError(msg, path=source, field=field) from None


def _reject_nan(tree: Any, source: str, prefix: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _reject_nan(value, source, f"{prefix}{key}.")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise UserError(f"must be a finite number (got {tree})", path=source, field=prefix.rstrip("."))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    source = str(path) if path is not None else "<defaults>"
    try:
        return validate_config(tree, source=source)
    except UserError as err:
        overridden = {".".join(parse_override(o)[0]) for o in overrides or []}
        if err.field and any(err.field == k or err.field.startswith(k + ".") for k in overridden):
            raise UserError(f"{err.detail} (from --set)", path=err.path, field=err.field) from None
        raise
