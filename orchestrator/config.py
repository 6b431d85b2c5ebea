"""Validated experiment configuration: pydantic v2 models, YAML loading, ``--set a.b=c`` overrides.

Every section forbids unknown keys. Defaults are the papers' defaults where a paper gives one (CUSA's
AdamW/cosine recipe, VSE++'s margin); ``configs/*.yaml`` set values for the tiny models.
Relative paths are resolved against the current working directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar, Union

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo

from orchestrator.errors import UserError
from orchestrator.spec_files import StrictModel, first_error, is_name, read_spec_file
from orchestrator.yaml_io import YamlSyntaxError, parse_yaml

# ints and bools are strict (``epochs: yes`` is not 1, ``lock_image: 1`` is not True); floats accept numeric
# strings (YAML reads ``1e-4`` as one) and ints
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class FieldError(ValueError):
    """A cross-field validation error that knows which dotted field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Section(StrictModel):
    """Base of the config sections: strict (:class:`~orchestrator.spec_files.StrictModel`), and an assignment is
    validated like a file's value."""

    model_config = ConfigDict(validate_assignment=True)


def _absolute(value: Path) -> Path:
    """A path against the current folder (the config convention), so Ray workers with another cwd agree."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


#: a path field made absolute at validation (need not exist yet)
AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


def _storage(value: Any) -> Any:
    """A ``scheme://...`` URI kept as the string (object storage: ``orchestrator.storage``), else a local path."""
    if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return value.rstrip("/") if value.partition("?")[0].count("/") > 2 else value
    return _absolute(value) if isinstance(value, (str, Path)) else value


#: a local folder (made absolute) or an object-storage URI such as ``s3://bucket/runs`` (kept as a string)
StorageLocation = Annotated[Union[Path, str], BeforeValidator(_storage)]


def _existing_path(value: Path | None, what: str) -> Path | None:
    if value is None:
        return None
    path = _absolute(value)
    if not path.exists():
        raise ValueError(f"{what} does not exist: {path}")
    return path


# ----------------------------------------------------------------------------------------------- data
class SyntheticData(Section):
    """The built-in generated dataset of coloured shapes (no download)."""

    num_train_images: PositiveInt = 2000
    num_val_images: PositiveInt = 300
    num_test_images: PositiveInt = 300
    seed: NonNegInt = 0
    image_size: Annotated[StrictInt, Field(ge=16, le=512)] = 64
    captions_per_image: tuple[PositiveInt, PositiveInt] = (2, 5)

    @model_validator(mode="after")
    def _range(self) -> "SyntheticData":
        lo, hi = self.captions_per_image
        if lo > hi:
            raise FieldError("captions_per_image", "the minimum is larger than the maximum")
        return self


class DataConfig(Section):
    """Where the image–caption pairs come from.

    ``format``: ``auto`` picks ``synthetic`` when ``root`` is unset, ``captions_json`` when ``root`` holds
    ``<split>.json`` files (the coco-mini / ALBEF layout), ``karpathy`` when ``annotations`` is set, ``webdataset``
    when ``shards`` is set (training pairs streamed from tar shards, ``orchestrator.data.shards``; the eval splits
    still come from ``root`` / ``annotations``, map-style).
    """

    format: Literal["auto", "synthetic", "captions_json", "karpathy", "webdataset"] = "auto"
    root: Path | None = Field(None, description="captions_json: the folder with <split>.json; karpathy: image root")
    annotations: Path | None = Field(None, description="karpathy: dataset_coco.json / dataset_flickr30k.json")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    synthetic: SyntheticData = SyntheticData()
    shards: str | list[str] | None = Field(
        None, description="webdataset: the training shards, a brace pattern (path/train-{000000..000099}.tar) or a "
                          "list of them; {key}.jpg + {key}.json/.txt per sample (img2dataset / open_clip layout)")
    train_samples: PositiveInt | None = Field(
        None, description="webdataset: samples per epoch (declared); unset: the shards' sizes.json, or counted once "
                          "and recorded there")
    shuffle_buffer: NonNegInt = Field(
        1000, description="webdataset: samples each loader worker buffers to shuffle its shards' stream (encoded "
                          "bytes; 0 or 1: stored order)")
    clean_captions: StrictBool = Field(
        True, description="CUSA's pre_caption: lower-case, punctuation to spaces, 64 words")
    verify_images: Literal["none", "exists", "header", "full"] = "header"
    manifest_dir: AbsolutePath | None = Field(
        None, description="where the verified-image manifests live (header/full checks done once, files unchanged "
                          "since are not parsed again); default $XDG_CACHE_HOME/itr/manifests (~/.cache/itr/manifests)")
    max_train_images: PositiveInt | None = Field(None, description="use only the first N training images")
    image_cache: Literal["decoded", "tensor_ram", "none"] = Field(
        "decoded", description="decoded: each image decoded and resized once ever into a uint8 memory-mapped cache "
                               "(data.image_cache_dir) that every epoch, loader worker and run shares, normalised "
                               "on the device; tensor_ram: float32 tensors kept in each process's RAM (up to 2 GiB, "
                               "the old behaviour); none: decode every image every time")
    image_cache_dir: AbsolutePath | None = Field(
        None, description="where the decoded-image cache lives (content-addressed, shared by every run that reads "
                          "it; node-local disk or shared storage); default $XDG_CACHE_HOME/itr/images "
                          "(~/.cache/itr/images)")
    image_cache_workers: PositiveInt | Literal["auto"] = Field(
        "auto", description="processes that decode images into the cache on the driver (itr train, itr prepare); "
                            "auto = every CPU")
    loader_workers: NonNegInt | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes per training process; auto = its CPUs minus one "
                            "(scaling.cpus_per_worker on Ray, the machine's available CPUs locally)")
    prefetch_factor: PositiveInt = Field(2, description="batches each loader worker keeps in flight")
    augment: Literal["none", "open_clip"] = Field(
        "none", description="training augmentation: none (the eval transform; images decoded once into the cache), "
                            "open_clip (its train transform: random resized crop; decoded in the loader workers "
                            "every epoch)")
    augment_scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.9, 1.0), description="augment open_clip: the random resized crop's area range (open_clip's default)")
    bad_images: Literal["fail", "skip"] = Field(
        "fail", description="an image that cannot be decoded during training: fail (exit 2, naming it), or skip "
                            "(replace the pair by another caption's, count it: train/skipped_images)")
    leakage: Literal["warn", "error"] = Field(
        "warn", description="an image (same id or file) or caption id of the train split also in val/test: log a "
                            "WARNING, or refuse the data (exit 2)")
    allow_outside_root: bool = Field(
        False, description="accept image paths that leave the dataset root (absolute, or '..' after lexical "
                           "normalisation); symlinks inside the root are not followed by this check")

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: Path | None) -> Path | None:
        return _existing_path(v, "folder")

    @field_validator("annotations")
    @classmethod
    def _annotations_exist(cls, v: Path | None) -> Path | None:
        return _existing_path(v, "file")

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.shards is not None:
            return "webdataset"
        if self.annotations is not None:
            return "karpathy"
        if self.root is not None:
            return "captions_json"
        return "synthetic"

    @property
    def split_format(self) -> str:
        """The format of the map-style splits: the eval splits of ``webdataset`` are ``karpathy`` (annotations set)
        or ``captions_json``; other formats are their own."""
        fmt = self.resolved_format
        if fmt != "webdataset":
            return fmt
        return "karpathy" if self.annotations is not None else "captions_json"

    @field_validator("shards", mode="before")
    @classmethod
    def _shard_patterns(cls, v: Any) -> Any:
        """Relative patterns made absolute against the current folder (braces kept); none may be empty."""
        if v is None:
            return None
        items = [v] if isinstance(v, (str, Path)) else v
        if not isinstance(items, list) or not items or not all(isinstance(p, (str, Path)) and str(p).strip()
                                                              for p in items):
            raise ValueError("must be a shard path pattern or a non-empty list of them")
        absolute = [str(Path.cwd() / Path(p).expanduser()) for p in items]  # an absolute one stays as it is
        return absolute[0] if isinstance(v, (str, Path)) else absolute

    @model_validator(mode="after")
    def _format_inputs(self) -> "DataConfig":
        fmt = self.resolved_format
        if fmt == "webdataset" and self.shards is None:
            raise FieldError("shards", "format webdataset needs data.shards (a pattern like train-{000000..000009}.tar)")
        if fmt != "webdataset":
            for name in ("shards", "train_samples"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"is read by format webdataset only (the format here is {fmt})")
        if fmt == "webdataset" and self.max_train_images is not None:
            raise FieldError("max_train_images", "not with format webdataset (declare data.train_samples: the "
                                                 "epoch length)")
        if fmt == "captions_json" and self.root is None:
            raise FieldError("root", "format captions_json needs a folder with <split>.json")
        if fmt == "karpathy" and (self.annotations is None or self.root is None):
            missing = "annotations" if self.annotations is None else "root"
            raise FieldError(missing, "format karpathy needs data.annotations (dataset_*.json) and data.root (images)")
        lo, hi = self.augment_scale
        if not lo <= hi <= 1.0:
            raise FieldError("augment_scale", f"needs 0 < low <= high <= 1 (the crop's share of the image area), "
                                              f"got [{lo:g}, {hi:g}]")
        return self


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    """The student: an open_clip model by name (built-in or one of the project's JSON configs)."""

    name: str = "ViT-B-32"
    pretrained: Path | None = Field(None, description="a local open_clip checkpoint; none = random init")
    lock_image: StrictBool = Field(False, description="freeze the image tower (LiT; open_clip lock_image_tower)")
    lock_text: StrictBool = Field(False, description="freeze the text tower (open_clip lock_text_tower)")
    cache_locked_towers: StrictBool = Field(
        True, description="compute a locked tower's frozen outputs once per split (cached under "
                          "teachers.cache_dir) so an epoch runs only the trainable projection")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    heads: Literal["auto", "none", "cross", "cross_uni"] = Field(
        "auto", description="CUSA's LN+Linear projectors: auto = cross_uni for cusa (cross if beta = 0), else none"
    )
    grad_checkpointing: StrictBool = Field(
        False, description="recompute the towers' activations in the backward (open_clip set_grad_checkpointing): "
                           "less activation memory, about 30% more compute, the same values")

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_string(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in {"", "none", "null"} else v

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, v: Path | None) -> Path | None:
        return _existing_path(v, "file")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from orchestrator.models.registry import known_model_names

        names = known_model_names()
        if v not in names:
            close = [n for n in names if v.lower().replace("_", "-") in n.lower()][:5]
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise ValueError(f"unknown open_clip model {v!r}{hint}")
        return v


# ----------------------------------------------------------------------------------------------- loss
class TemperatureConfig(Section):
    """A learnable (or fixed) softmax temperature, clamped to [min, max] before every forward pass."""

    init: PositiveFloat
    min: PositiveFloat
    max: PositiveFloat
    learnable: StrictBool = True

    @model_validator(mode="after")
    def _bounds(self) -> "TemperatureConfig":
        if not self.min <= self.init <= self.max:
            raise FieldError("init", f"{self.init} is outside [min, max] = [{self.min}, {self.max}]")
        return self


class LossSection(Section):
    """Base of the ``loss`` sections, one per ``methods`` loss family, chosen by ``loss.family``.

    Each field is the keyword argument of the same name of the family's constructor: the family is built by
    ``methods.build(section.family, **section.family_kwargs(experiment))``. The one hook for values that depend
    on the rest of the experiment (``relevance: auto``) is :meth:`resolved_kwargs`.

    A family registered later brings its own section: a subclass whose ``family`` is ``Literal["<name>"] =
    "<name>"`` (the name ``methods.register`` gave the family), decorated with :func:`register_loss_section`;
    ``loss.family: <name>`` then selects it (``ExperimentConfig`` is rebuilt with the section in its union).
    """

    family: str = Field(description="the registered loss family (methods.build name)")
    multi_positive: StrictBool = Field(True, description="treat other captions of the same image as positives")

    @property
    def supports_multi_positive(self) -> bool:
        """Whether a batch may hold several captions of one image (``train.batch_sampler: random``)."""
        return self.multi_positive

    def family_kwargs(self, experiment: "ExperimentConfig") -> dict[str, Any]:
        """The family constructor's keyword arguments: every field but ``family`` by its name (a nested section,
        such as a temperature, as a mapping of its fields), then :meth:`resolved_kwargs`."""
        kwargs = self.model_dump(exclude={"family"})
        kwargs.update(self.resolved_kwargs(experiment))
        return kwargs

    def resolved_kwargs(self, experiment: "ExperimentConfig") -> dict[str, Any]:
        """Hook: the arguments whose value depends on the rest of ``experiment`` (none by default)."""
        return {}


#: loss.family -> its section, in registration order (the union's order: error messages list the tags so)
_LOSS_SECTIONS: dict[str, type[LossSection]] = {}
#: called after each registration (ExperimentConfig rebuilds its ``loss`` field)
_ON_REGISTER: list[Callable[[], None]] = []
S = TypeVar("S", bound=type[LossSection])


def register_loss_section(section: S) -> S:
    """Make ``section`` the ``loss`` section of the family named by its ``family`` default."""
    name = section.model_fields["family"].default
    if not isinstance(name, str) or not name:
        raise ValueError(f"{section.__name__}.family needs its family name as the default (Literal[name] = name)")
    if name in _LOSS_SECTIONS:
        raise ValueError(f"loss section {name!r} registered twice")
    _LOSS_SECTIONS[name] = section
    for rebuild in _ON_REGISTER:
        rebuild()
    return section


def loss_families() -> tuple[str, ...]:
    """The ``loss.family`` names a config may select."""
    return tuple(_LOSS_SECTIONS)


def loss_section_union() -> Any:
    """The type of ``ExperimentConfig.loss``: the registered sections, discriminated by ``family``."""
    return Annotated[Union[tuple(_LOSS_SECTIONS.values())], Field(discriminator="family")]


@register_loss_section
class InfoNCELoss(LossSection):
    """Multi-positive InfoNCE (CUSA's L_itr): positives are every caption of the same image."""

    family: Literal["infonce"] = "infonce"
    temperature: TemperatureConfig = TemperatureConfig(init=0.05, min=0.01, max=0.10)
    reduction: Literal["sum", "class_mean"] = Field(
        "sum", description="sum: textbook cross-entropy; class_mean: the released CUSA form (divided by B)"
    )


@register_loss_section
class TripletLoss(LossSection):
    """Bidirectional triplet ranking loss (VSE++ hardest negative, Triplet-SN or SelHN mining)."""

    family: Literal["triplet"] = "triplet"
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "hardest"
    soft_negative_tau: PositiveFloat = Field(0.05, description="Triplet-SN softmax temperature (reconstruction)")
    selhn_eps: PositiveFloat = Field(0.01, description="SelHN switch gap (RVSEPP's default epsilon)")


RelevanceSource = Literal["auto", "exact", "teacher"]
_RELEVANCE_DOC = ("exact: the dataset's own graded relevance (synthetic data); teacher: RSC from the text "
                  "teacher's caption embeddings; auto: exact when the data has it and no text teacher is set")
UnitInterval = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class RelevanceLossSection(LossSection):
    """Base of the sections of families that score graded relevance R (Listwise ITR, BCLS)."""

    relevance: RelevanceSource = Field("auto", description=_RELEVANCE_DOC)

    def relevance_source(self, experiment: "ExperimentConfig") -> str:
        """``exact`` or ``teacher``: ``auto`` is exact for synthetic data without a text teacher."""
        if self.relevance != "auto":
            return self.relevance
        if experiment.data.resolved_format == "synthetic" and experiment.teachers.text is None:
            return "exact"
        return "teacher"

    def resolved_kwargs(self, experiment: "ExperimentConfig") -> dict[str, Any]:
        return {"relevance": self.relevance_source(experiment)}


LossKernel = Literal["auto", "torch", "triton"]
_KERNEL_DOC = ("O(B³) loss implementation: auto = fused Triton kernels on CUDA float32/16 (methods/kernels.py), "
               "else the blocked torch form; torch / triton force one")


@register_loss_section
class ListwiseLoss(RelevanceLossSection):
    """Listwise ITR: (1 − λ)·triplet + λ·Smooth-NDCG over the in-batch list, relevance from RSC (spec B)."""

    family: Literal["listwise"] = "listwise"
    weight: UnitInterval = Field(0.5, description="λ (sndcg_weight); missing from the released code: sweep it")
    tau: PositiveFloat = Field(0.01, description="sigmoid temperature of the smooth rank")
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "hardest"
    t2i_relevance: Literal["transpose", "as_released"] = Field(
        "transpose", description="as_released: the released code's untransposed t2i relevance and i2t IDCG"
    )
    rescale: StrictBool = Field(True, description="RSC's (1 + cos) / 2")
    chunk_size: PositiveInt | None = None
    kernel: LossKernel = Field("auto", description=_KERNEL_DOC)


@register_loss_section
class BCLSLoss(RelevanceLossSection):
    """BCLS: Triplet-SN + λ·Kendall ranking loss on continuous pseudo labels, with SW-HS sampling (spec A).

    Triplet-SN and SW-HS are reconstructions (spec A.8): ``soft_negative_tau`` -> 0 is VSE++; ``window`` None
    and ``hard_k`` None is the full (released ITM_CLS) Kendall loss.
    """

    family: Literal["bcls"] = "bcls"
    margin: PositiveFloat = 0.2
    mining: Literal["hardest", "soft_negative", "selhn"] = "soft_negative"
    soft_negative_tau: PositiveFloat = 0.05
    kendall_weight: NonNegFloat = Field(1.0, description="λ; the released ITM_CLS sums with weight 1")
    gap: NonNegFloat = Field(0.3, description="pairs count only when their labels differ by more than this")
    surrogate: Literal["hinge", "tanh", "sigmoid"] = "hinge"
    surrogate_temperature: PositiveFloat = 0.1
    window: PositiveInt | None = Field(16, description="SW-HS sliding window (None = all pairs)")
    hard_k: PositiveInt | None = Field(None, description="SW-HS: keep the k most violated pairs per query")
    t2i_relevance: Literal["transpose", "as_released"] = "transpose"
    rescale: StrictBool = Field(False, description="ITM_CLS uses the raw max-cosine (no (1 + cos) / 2)")
    chunk_size: PositiveInt | None = None
    kernel: LossKernel = Field("auto", description=_KERNEL_DOC + " (all-pairs Kendall only: window None, no hard_k)")


@register_loss_section
class CUSALoss(LossSection):
    """CUSA: InfoNCE + α·CSA + β·USA (spec C.2), temperatures and clamps of the released configs.

    ``reduction`` defaults to the released ``class_mean`` InfoNCE (divided by B) because the published α = 0.1
    and β = 0.5 are relative to it (spec C.7-1); ``sum`` is the textbook form (then scale α, β by 1/B).
    """

    family: Literal["cusa"] = "cusa"
    temperature: TemperatureConfig = TemperatureConfig(init=0.05, min=0.01, max=0.10)
    reduction: Literal["sum", "class_mean"] = "class_mean"
    alpha: NonNegFloat = Field(0.1, description="CSA weight")
    beta: NonNegFloat = Field(0.5, description="USA weight")
    csa_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=0.99)
    usa_image_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=1.00)
    usa_text_temperature: TemperatureConfig = TemperatureConfig(init=0.45, min=0.10, max=1.00)
    teacher_temperature: PositiveFloat = Field(1.0, description="τ_s, fixed")
    csa_mode: Literal["each", "add", "dot"] = "each"


#: the built-in sections' union (``ExperimentConfig.model_fields["loss"]`` holds the current one)
LossConfig = loss_section_union()


# ------------------------------------------------------------------------------------------- teachers
class TeachersConfig(Section):
    """Offline teacher encoders for soft labels (CUSA's CSA/USA) and caption relevance (Listwise RSC, BCLS).

    A spec names the encoder: ``packaged:all-MiniLM-L6-v2``, ``packaged:all-mpnet-base-v2``,
    ``sentence-transformers:<name-or-path>`` (text); ``packaged:efficientnet-lite0``, ``timm:<name>[@<weights file>]``,
    ``open_clip:<name>@<weights file>``, ``file:<features.npz keyed by image id>`` (image; ``itr convert-features``
    turns a pickled .npy into one);
    ``synthetic:attributes`` (either; the synthetic dataset's exact attributes).
    """

    image: str | None = None
    text: str | None = None
    cache_dir: AbsolutePath = Field(Path(".itr_cache/teachers"), validate_default=True)
    batch_size: PositiveInt = 64
    backend: Literal["auto", "local", "ray"] = Field(
        "auto", description="where extraction runs: ray = a Ray Data actor pool, one model per actor (one GPU each "
                            "where the cluster has GPUs); local = this process; auto = the Ray cluster's GPUs when "
                            "connected to one that has them, else this machine (orchestrator.teachers.placement)")
    num_actors: PositiveInt | None = Field(None, description="ray: actors; unset = one per GPU (per node without)")


# ---------------------------------------------------------------------------------------------- train
#: The longest ``train.run_key``: one folder name (``spec_files.NAME_PATTERN``: no ``/``, no ``..``, not hidden).
RUN_KEY_MAX_LENGTH = 100


class TrainConfig(Section):
    """Optimisation. Defaults: CUSA's recipe (AdamW lr 1e-5, wd 1e-4, cosine to 1e-6, batch 128, seed 23)."""

    epochs: PositiveInt = 30
    batch_size: Annotated[StrictInt, Field(ge=2)] = 128
    lr: PositiveFloat = 1e-5
    min_lr: NonNegFloat = 1e-6
    weight_decay: NonNegFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    warmup_steps: NonNegInt = 0
    grad_clip: PositiveFloat | None = None
    seed: NonNegInt = 23
    batch_sampler: Literal["unique_images", "random"] = Field(
        "unique_images", description="unique_images: never two captions of one image in a batch"
    )
    eval_every: PositiveInt = 1
    eval_at_start: StrictBool = Field(True, description="evaluate the untrained model first (logged as init/val/...)")
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="also checkpoint every N steps (sampler position + RNG states: a resume continues "
                          "mid-epoch); a SIGTERM mid-epoch always saves one; unset: epoch checkpoints only")
    best_metric: str = "val/rsum"
    best_mode: Literal["max", "min"] = "max"
    output_dir: StorageLocation = Field(
        Path("runs"), validate_default=True,
        description="a local folder, or (Ray backend only) an object-storage URI: s3://bucket/runs, gs://...")
    resume: StrictBool = Field(True, description="with run_key: a rerun continues the run in its folder")
    run_key: str | None = Field(
        None, description="a stable name for this experiment: its run folder is <output_dir>/<run_key> (Ray: "
                          "<output_dir>/ray/<run_key>) and the next attempt of the same command resumes it from "
                          "its latest checkpoint, in the same MLflow run; unset: a new folder every run")
    log_every_steps: PositiveInt = 50
    max_steps_per_epoch: PositiveInt | None = Field(None, description="cap on steps per epoch (smoke runs)")
    accum_steps: Annotated[StrictInt, Field(ge=1)] = Field(
        1, description="gradient accumulation with feature caching: each step's loss sees batch_size x "
                       "accum_steps pairs (sampler guarantees included) with the activation memory of batch_size; "
                       "exact for every family (dropout replayed), refused with train-mode BatchNorm")
    compile: StrictBool = Field(False, description="torch.compile the (DDP-wrapped) model for training")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend (aot_eager: no code generation, for CPU tests)")
    tf32: StrictBool = Field(
        False, description="TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (faster, ~1e-3 relative error); "
                           "off: the paper recipes trained in pure fp32")
    cudnn_benchmark: StrictBool = Field(
        False, description="let cuDNN pick the fastest convolution algorithms (fixed input shapes; not bitwise "
                           "deterministic)")

    @field_validator("best_metric")
    @classmethod
    def _val_metric(cls, v: str) -> str:
        if not v.startswith("val/"):
            raise ValueError("the best checkpoint is selected on a val/ metric (never test)")
        return v

    @field_validator("run_key")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and not is_name(v, RUN_KEY_MAX_LENGTH):
            raise ValueError(f"{v!r} is not a folder name: 1-100 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")
        return v

    @model_validator(mode="after")
    def _lrs(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"{self.min_lr} is larger than lr {self.lr}")
        return self


#: Loss families that compute only a rank's query rows (``methods`` ``supports_local_loss``).
LOCAL_LOSS_FAMILIES = ("infonce", "cusa", "triplet", "listwise", "bcls")


class ScalingConfig(Section):
    """Where the loop runs: Ray Train workers (DDP) or in-process."""

    backend: Literal["ray", "local"] = "ray"
    num_workers: PositiveInt = 1
    use_gpu: StrictBool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: NonNegInt = Field(
        2, description="restarts of the worker group from the latest checkpoint after a worker dies (a non-finite "
                       "loss or bad input fails at once)")
    gather_global_batch: StrictBool = Field(
        False, description="losses see the batch of all ranks (all-gather with gradients: every gradient after DDP "
                           "averaging equals one process's on the concatenated batch)")
    local_loss: StrictBool = Field(
        False, description="with gather_global_batch: each rank computes the loss only for its own query rows, "
                           "both directions; same gradients, 1/num_workers of the loss work")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_choice(cls, v: Any) -> Any:
        """One message for the union (not one per member, under ``use_gpu.bool``)."""
        if not (isinstance(v, bool) or v == "auto"):
            raise ValueError(f"must be true, false or auto (got {v!r})")
        return v


class EvalConfig(Section):
    splits: list[Literal["val", "test"]] = ["val"]
    batch_size: PositiveInt = 256
    chunk_size: PositiveInt = 1024
    ks: tuple[PositiveInt, ...] = (1, 5, 10)
    reports: StrictBool = Field(
        True, description="log report figures (recall curves, t-SNE, case study) at the end of a run")
    relevance_aggregation: Literal["max", "mean"] = Field(
        "max", description="itr eval --graded: caption-caption relevance aggregated over an image's captions")


class TrackingConfig(Section):
    enabled: StrictBool = True
    system_metrics: StrictBool = Field(
        True, description="MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory where "
                          "there is one) of each node that trains, as system/... metrics of the run")
    system_metrics_interval_s: PositiveFloat = Field(10.0, description="seconds between system-metric samples")
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    artifact_dir: AbsolutePath | None = Field(None, description="artifact folder for a local store; default: mlartifacts beside the SQLite file")
    experiment: str = "itr"
    run_name: str | None = None
    tags: dict[str, str] = {}


class ExperimentConfig(Section):
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
    def _best_metric_reported(self) -> "ExperimentConfig":
        """The best checkpoint is chosen on a metric the evaluation reports (else the pick would be arbitrary)."""
        from orchestrator.metrics_catalogue import unreported, validation_metrics

        val = validation_metrics(self.eval)
        if self.train.best_metric not in val:
            raise FieldError("train.best_metric", unreported(self.train.best_metric, val, what="the evaluation",
                                                             cfg=self))
        return self

    @model_validator(mode="after")
    def _sampler_fits_loss(self) -> "ExperimentConfig":
        if self.train.batch_sampler == "random" and not self.loss.supports_multi_positive:
            raise FieldError(
                "train.batch_sampler",
                f"random puts several captions of one image in a batch, but loss {self.loss.family!r} has "
                "multi_positive=false",
            )
        return self

    @model_validator(mode="after")
    def _local_loss_supported(self) -> "ExperimentConfig":
        """``scaling.local_loss`` needs the gathered batch and a family whose terms are means over query rows."""
        if not self.scaling.local_loss:
            return self
        if not self.scaling.gather_global_batch:
            raise FieldError("scaling.local_loss", "needs scaling.gather_global_batch: true (without the gathered "
                                                   "batch every rank computes only its own rows already)")
        if self.loss.family not in LOCAL_LOSS_FAMILIES:
            raise FieldError("scaling.local_loss", f"not supported by loss family {self.loss.family!r}; "
                             f"supported: {', '.join(LOCAL_LOSS_FAMILIES)}")
        return self

    @model_validator(mode="after")
    def _loss_inputs_available(self) -> "ExperimentConfig":
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
                raise FieldError("loss.relevance", f"exact relevance needs data that knows it (synthetic), not "
                                 f"{self.data.resolved_format}; set a text teacher (teachers.text)")
            if source == "teacher" and self.teachers.text is None:
                raise FieldError("teachers.text", f"loss family {loss.family} with teacher relevance needs a text teacher")
        return self

    @model_validator(mode="after")
    def _streamed_training(self) -> "ExperimentConfig":
        """What a webdataset train split cannot give: per-item features (teachers, cached locked towers), several
        captions of one image per batch, and eval splits without ``data.root``."""
        if self.data.resolved_format != "webdataset":
            return self
        if self.uses_teachers:
            raise FieldError("loss.family", f"{self.loss.family} needs teacher features (or teacher relevance) of "
                             "every training item, which streamed shards do not have (webdataset trains infonce, "
                             "triplet, cusa with alpha = beta = 0)")
        if self.model.cache_locked_towers and (self.model.lock_image or self.model.lock_text):
            raise FieldError("model.cache_locked_towers", "a locked tower's outputs cannot be cached for streamed "
                             "shards; set it false (the locked tower then runs each step)")
        if self.train.batch_sampler != "unique_images":
            raise FieldError("train.batch_sampler", "webdataset batches hold one caption per image (unique_images)")
        if self.data.bad_images != "fail":
            raise FieldError("data.bad_images", "webdataset stops at an image that does not decode, naming the shard "
                             "(fail); skip is for the map formats")
        if self.eval.splits and self.data.root is None:
            raise FieldError("data.root", f"the eval splits ({', '.join(self.eval.splits)}) come from data.root "
                             "(captions_json) or data.annotations + data.root (karpathy); webdataset streams only "
                             "the train split")
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


_ON_REGISTER.append(_rebuild_loss_field)


# ------------------------------------------------------------------------------------------- loading
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value); the value is parsed as YAML (``2`` -> int, ``null`` -> None)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form a.b=value", path="--set")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise UserError(f"override {text!r} has an empty key", path="--set")
    try:
        value = parse_yaml(raw, "--set").tree if raw.strip() else ""
    except YamlSyntaxError:
        value = raw  # not YAML at all: the text itself
    except UserError as err:  # YAML, but rejected (a tag, a duplicate key, an alias bomb)
        raise UserError(f"{err.detail} (from --set)", path="--set", field=".".join(parts)) from None
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``tree`` with each ``a.b=c`` applied (creating sections as needed)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(tree, ".".join(parts), value)
    return tree


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b]... = value`` for ``dotted`` = ``a.b...``, creating (or replacing non-dict) sections."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (:func:`orchestrator.spec_files.read_spec_file`); UserError naming the file (and
    line) otherwise."""
    return read_spec_file(path, what="config file").tree


def format_validation_error(err: ValidationError) -> tuple[str, str]:
    """(dotted field, message) of the first error of ``err`` (``loss.infonce.x`` named ``loss.x``; a
    ``FieldError`` names its own field; a short scalar input shown), with a count of the others."""
    first = first_error(err, union_tags={"loss": tuple(_LOSS_SECTIONS)}, missing=None)
    field = first.dotted or "(top level)"
    if isinstance(first.cause, FieldError):
        prefix, named = first.dotted, first.cause.field
        field = f"{prefix}.{named}" if prefix and not named.startswith(prefix) else named
    msg = first.message
    if first.type not in {"extra_forbidden", "missing"} and first.has_input and \
            not isinstance(first.input, (dict, list)):
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
