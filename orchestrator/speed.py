"""Speed knobs of the training step: TF32 / cuDNN flags and ``torch.compile`` (``train.*``).

Each is off by default where it changes numerics against the papers (TF32: the paper recipes trained pure
fp32). Gradient checkpointing (``model.grad_checkpointing``) is set where the model is built
(``orchestrator.models.student.enable_grad_checkpointing``).
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn

from orchestrator.config import TrainConfig

log = logging.getLogger(__name__)


def set_backend_flags(cfg: TrainConfig) -> None:
    """TF32 for matmuls and cuDNN convolutions (``train.tf32``) and ``cudnn.benchmark`` (``train.cudnn_benchmark``).

    Both are set explicitly either way: torch's own default has cuDNN convolutions in TF32, which the papers'
    pure-fp32 recipes did not use. The legacy ``allow_tf32`` flags, not ``fp32_precision``: torch refuses to mix
    the two APIs in one process and other code (and the benchmarks) read the legacy ones. Harmless on the CPU.
    """
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.tf32 or cfg.cudnn_benchmark:
        log.info("speed flags: tf32=%s cudnn.benchmark=%s", cfg.tf32, cfg.cudnn_benchmark)


def compile_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """``torch.compile`` of the training module when ``train.compile`` (else ``model`` itself).

    Called on the DDP-wrapped module, as torch advises (and open_clip does): Dynamo's DDP optimiser then splits
    the graph at DDP's bucket boundaries so the gradient all-reduce still overlaps the backward. The wrapper
    (``OptimizedModule``) shares its parameters with the module; checkpoints save the unwrapped module, whose
    state-dict keys carry no ``_orig_mod.`` prefix (see ``orchestrator.models.student.unwrap``).
    """
    if not cfg.compile:
        return model
    log.info("compiling the model (torch.compile, backend %s)", cfg.compile_backend)
    # cast: torch types compile() as returning a Callable; given an nn.Module it returns an OptimizedModule (one)
    return cast(nn.Module, torch.compile(model, backend=cfg.compile_backend))
