"""The ``train`` and ``scaling`` sections: optimisation, checkpoints, and where the loop runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from orchestrator.config.base import (
    FieldError,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Section,
    StorageLocation,
)
from orchestrator.spec_files import is_name

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
        None,
        description="also checkpoint every N steps (sampler position + RNG states: a resume continues "
        "mid-epoch); a SIGTERM mid-epoch always saves one; unset: epoch checkpoints only",
    )
    best_metric: str = "val/rsum"
    best_mode: Literal["max", "min"] = "max"
    output_dir: StorageLocation = Field(
        Path("runs"),
        validate_default=True,
        description="a local folder, or (Ray backend only) an object-storage URI: s3://bucket/runs, gs://...",
    )
    resume: StrictBool = Field(True, description="with run_key: a rerun continues the run in its folder")
    run_key: str | None = Field(
        None,
        description="a stable name for this experiment: its run folder is <output_dir>/<run_key> (Ray: "
        "<output_dir>/ray/<run_key>) and the next attempt of the same command resumes it from "
        "its latest checkpoint, in the same MLflow run; unset: a new folder every run",
    )
    log_every_steps: PositiveInt = 50
    max_steps_per_epoch: PositiveInt | None = Field(None, description="cap on steps per epoch (smoke runs)")
    accum_steps: Annotated[StrictInt, Field(ge=1)] = Field(
        1,
        description="gradient accumulation with feature caching: each step's loss sees batch_size x "
        "accum_steps pairs (sampler guarantees included) with the activation memory of batch_size; "
        "exact for every family (dropout replayed), refused with train-mode BatchNorm",
    )
    compile: StrictBool = Field(False, description="torch.compile the (DDP-wrapped) model for training")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend (aot_eager: no code generation, for CPU tests)"
    )
    tf32: StrictBool = Field(
        False,
        description="TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (faster, ~1e-3 relative error); "
        "off: the paper recipes trained in pure fp32",
    )
    cudnn_benchmark: StrictBool = Field(
        False,
        description="let cuDNN pick the fastest convolution algorithms (fixed input shapes; not bitwise deterministic)",
    )

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
            raise ValueError(
                f"{v!r} is not a folder name: 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _lrs(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"{self.min_lr} is larger than lr {self.lr}")
        return self


class ScalingConfig(Section):
    """Where the loop runs: Ray Train workers (DDP) or in-process."""

    backend: Literal["ray", "local"] = "ray"
    num_workers: PositiveInt = 1
    use_gpu: StrictBool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    max_failures: NonNegInt = Field(
        2,
        description="restarts of the worker group from the latest checkpoint after a worker dies (a non-finite "
        "loss or bad input fails at once)",
    )
    gather_global_batch: StrictBool = Field(
        False,
        description="losses see the batch of all ranks (all-gather with gradients: every gradient after DDP "
        "averaging equals one process's on the concatenated batch)",
    )
    local_loss: StrictBool = Field(
        False,
        description="with gather_global_batch: each rank computes the loss only for its own query rows, "
        "both directions; same gradients, 1/num_workers of the loss work",
    )

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_choice(cls, v: Any) -> Any:
        """One message for the union (not one per member, under ``use_gpu.bool``)."""
        if not (isinstance(v, bool) or v == "auto"):
            raise ValueError(f"must be true, false or auto (got {v!r})")
        return v
