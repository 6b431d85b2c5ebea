"""Validated experiment configuration: pydantic v2 models, YAML loading, ``--set a.b=c`` overrides.

Every section forbids unknown keys. Defaults are the papers' defaults where a paper gives one (CUSA's
AdamW/cosine recipe, VSE++'s margin); ``configs/*.yaml`` set values for the tiny models.
Relative paths are resolved against the current working directory.

One module per job; every public name is importable from ``orchestrator.config``:

* ``base``: the strict ``Section`` base, ``FieldError``, the number and path types;
* one module per section: ``data`` (``data``), ``model`` (``model``), ``loss`` (``loss``: one section per loss
  family, registered by name), ``teachers`` (``teachers``), ``train`` (``train``, ``scaling``), ``evaluation``
  (``eval``), ``tracking`` (``tracking``);
* ``experiment``: ``ExperimentConfig`` (the sections and the rules across them), ``validate_config`` and
  ``load_config``;
* ``overrides``: dotted keys (``--set a.b=c``, the flat MLflow params).

A loss family added later brings its own section: subclass ``LossSection`` with ``family: Literal["<name>"] =
"<name>"`` and its constructor's arguments as fields, and decorate it with ``register_loss_section``
(``orchestrator/config/loss.py``).
"""

from orchestrator.config.base import (
    AbsolutePath,
    FieldError,
    FiniteFloat,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Section,
    StorageLocation,
    absolute_path,
    existing_path,
)
from orchestrator.config.data import DataConfig, NoiseConfig, SyntheticConfig
from orchestrator.config.evaluation import EvalConfig
from orchestrator.config.experiment import (
    ExperimentConfig,
    format_validation_error,
    load_config,
    read_yaml,
    validate_config,
)
from orchestrator.config.loss import (
    LOCAL_LOSS_FAMILIES,
    BCLSLoss,
    CUSALoss,
    InfoNCELoss,
    ListwiseLoss,
    LossConfig,
    LossKernel,
    LossSection,
    RelevanceLossSection,
    RelevanceSource,
    TemperatureConfig,
    TripletLoss,
    UnitInterval,
    loss_families,
    loss_section_union,
    on_registration,
    register_loss_section,
)
from orchestrator.config.model import ModelConfig
from orchestrator.config.overrides import apply_overrides, flatten, parse_override, set_dotted
from orchestrator.config.teachers import TeachersConfig
from orchestrator.config.tracking import TrackingConfig
from orchestrator.config.train import RUN_KEY_MAX_LENGTH, ScalingConfig, TrainConfig

__all__ = [
    "AbsolutePath",
    "FieldError",
    "FiniteFloat",
    "NonNegFloat",
    "NonNegInt",
    "PositiveFloat",
    "PositiveInt",
    "Section",
    "StorageLocation",
    "absolute_path",
    "existing_path",
    "DataConfig",
    "NoiseConfig",
    "SyntheticConfig",
    "EvalConfig",
    "ExperimentConfig",
    "format_validation_error",
    "load_config",
    "read_yaml",
    "validate_config",
    "LOCAL_LOSS_FAMILIES",
    "BCLSLoss",
    "CUSALoss",
    "InfoNCELoss",
    "ListwiseLoss",
    "LossConfig",
    "LossKernel",
    "LossSection",
    "RelevanceLossSection",
    "RelevanceSource",
    "TemperatureConfig",
    "TripletLoss",
    "UnitInterval",
    "loss_families",
    "loss_section_union",
    "on_registration",
    "register_loss_section",
    "ModelConfig",
    "apply_overrides",
    "flatten",
    "parse_override",
    "set_dotted",
    "TeachersConfig",
    "TrackingConfig",
    "RUN_KEY_MAX_LENGTH",
    "ScalingConfig",
    "TrainConfig",
]
