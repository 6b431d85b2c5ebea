"""The training procedure, top to bottom. A plain function: call it without Ray (``LocalSession``) or inside a
Ray Train worker (``orchestrator.run``); everything cluster-specific comes through the ``Session``.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.accumulation import feature_cache
from orchestrator.checkpoint import QUERY_RANKS_FILE
from orchestrator.config import ExperimentConfig, TrainConfig
from orchestrator.epoch import (
    EpochRunner,
    NonFiniteLossError,  # noqa: F401  (re-exported: callers catch it from here)
    RunCounters,
)
from orchestrator.evaluation.embed import autocast_context, encode_split
from orchestrator.evaluation.recall import ranks, recall_from_ranks
from orchestrator.losses import build_loss
from orchestrator.models.locked_towers import wrap_locked_towers
from orchestrator.models.student import HEAD_OUTPUTS, build_student, forward_embeddings, unwrap
from orchestrator.models.tower_cache import cached_sides
from orchestrator.results.query_ranks import QueryRanks
from orchestrator.session import LocalSession, Session, is_better
from orchestrator.soft_labels import BatchInputs
from orchestrator.speed import compile_for_training, set_backend_flags
from orchestrator.train_data import TrainData, load_train_data, train_batches
from orchestrator.training_state import for_rank, load_training_state, mid_epoch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with the papers' rule (timm ``add_weight_decay``): 1-D params and biases get no decay.

    0-D parameters (temperatures) get no decay either.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step schedule: linear warm-up to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_teacher_features(cfg: ExperimentConfig, index, progress: bool = False):
    """Teacher features of ``index`` from the content-addressed cache (extracted here if the driver did not)."""
    from orchestrator.teachers import extract_split

    return extract_split(cfg.teachers, index, progress=progress, backend="local")


@dataclass
class _Resume:
    """Where a resumed run continues: the first epoch to run and, for a step checkpoint, the epoch it stopped in
    with its steps done, RNG states and metric sums."""

    start_epoch: int = 0
    counters: RunCounters = field(default_factory=RunCounters)
    mid_epoch: tuple[int, int] | None = None  # (epoch, steps done) of a step checkpoint
    state: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def _resume(session: Session, model: nn.Module, loss_fn: nn.Module, optimizer, scheduler) -> _Resume:
    """The session's latest checkpoint loaded into the model, loss, optimiser and schedule (none: a fresh start)."""
    resume_from = session.latest_checkpoint()
    if resume_from is None:
        return _Resume()
    state = load_training_state(resume_from, model, loss_fn, optimizer, scheduler)
    state = for_rank(state, resume_from, session.rank)  # a step checkpoint: this rank's RNG states and sums
    counters = RunCounters(state["global_step"], state["best"], dict(state.get("initial") or {}))
    at = mid_epoch(state)
    log.info(
        "resumed from %s (epoch %d done%s)",
        resume_from,
        state["epoch"],
        f", then {at[1]} steps of epoch {at[0]}" if at else "",
    )
    return _Resume(state["epoch"] + 1, counters, at, state, resumed=True)


def _runner(cfg: ExperimentConfig, session: Session) -> tuple[EpochRunner, TrainData, _Resume]:
    """Data, student, loss family, loader, optimiser and schedule built (and resumed) for ``session``."""
    device = session.device
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    cached = cached_sides(student.model, cfg.model.cache_locked_towers)
    data = load_train_data(cfg, session, student, cached, device)
    model = student.model.to(device)
    loss_fn = build_loss(cfg).to(device)
    model_outputs = HEAD_OUTPUTS[cfg.resolved_heads]
    needs_teacher = bool(loss_fn.requires - model_outputs - {"relevance"})
    features = load_teacher_features(cfg, data.train_index) if needs_teacher else None
    batch_inputs = BatchInputs(data.train_index, features, loss_fn.requires - model_outputs)
    loss_fn.check_inputs(batch_inputs.available | model_outputs)
    gather = cfg.scaling.gather_global_batch and session.world_size > 1
    loader, sampler = train_batches(cfg, data, session, student, batch_inputs, gather=gather, device=device)
    steps_per_epoch = len(sampler)
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    betas = (cfg.train.betas[0], cfg.train.betas[1])
    optimizer = torch.optim.AdamW(param_groups([model, loss_fn], cfg.train.weight_decay), lr=cfg.train.lr, betas=betas)
    scheduler = cosine_with_warmup(optimizer, cfg.train, steps_per_epoch * cfg.train.epochs)
    resume = _resume(session, model, loss_fn, optimizer, scheduler)
    train_model = session.prepare_model(
        wrap_locked_towers(model, image_from_features="image" in cached, text_from_features="text" in cached)
    )
    train_model = compile_for_training(train_model, cfg.train)  # after the DDP wrap (torch's advice)
    # train.accum_steps > 1: the batch's features cached without grad, the model's gradients by re-forwards
    accumulation = feature_cache(
        train_model,
        forward_embeddings,
        cfg.train.accum_steps,
        device=device,
        autocast=lambda: autocast_context(device, cfg.model.precision),
    )
    runner = EpochRunner(
        cfg, session, device, model, train_model, loss_fn, optimizer, scheduler, loader, sampler,
        data.train_images, accumulation, steps_per_epoch, gather, resume.counters,
    )  # fmt: skip
    return runner, data, resume


Validator = Callable[[], tuple[dict[str, float], QueryRanks]]


def _validator(cfg: ExperimentConfig, runner: EpochRunner, data: TrainData) -> Validator | None:
    """Retrieval metrics of the current model on val and the per-query ranks they come from (``None``: no val
    split)."""
    val_index, val_text = data.val_index, data.val_text
    if val_index is None:
        return None
    if val_text is None:
        raise ValueError("the val split was loaded without its caption input")

    def validate() -> tuple[dict[str, float], QueryRanks]:
        # a model gone NaN/Inf raises NonFiniteEmbeddingsError here: the run fails, it never records RSUM 600
        emb = encode_split(
            unwrap(runner.train_model),
            val_index,
            data.val_images,
            val_text,
            device=runner.device,
            batch_size=cfg.eval.batch_size,
            precision=cfg.model.precision,
            split="val",
        )
        i2t, t2i = ranks(
            emb.image_emb.to(runner.device), emb.text_emb.to(runner.device), emb.text_image, cfg.eval.chunk_size
        )
        per_query = QueryRanks.create(i2t, t2i, emb.text_image, np.asarray(emb.image_ids, dtype=str), cfg.eval.ks)
        return recall_from_ranks(i2t, t2i, tuple(cfg.eval.ks)), per_query

    return validate


def _epoch_metrics(
    cfg: ExperimentConfig,
    runner: EpochRunner,
    resume: _Resume,
    epoch: int,
    validate: Validator | None,
) -> tuple[dict[str, float], QueryRanks | None]:
    """One epoch trained (or a step checkpoint's epoch finished), then val where due (with its per-query ranks),
    the run's initial metrics on the first and last report, and the best score so far."""
    counters = runner.counters
    if resume.mid_epoch is not None and resume.mid_epoch[0] == epoch:  # continue a step checkpoint's epoch
        metrics = runner.train_one_epoch(
            epoch, first=resume.mid_epoch[1], rng=resume.state.get("rng"), sums_state=resume.state.get("sums")
        )
    else:
        metrics = runner.train_one_epoch(epoch)
    last = epoch + 1 == cfg.train.epochs
    per_query = None
    if validate is not None and runner.session.rank == 0 and ((epoch + 1) % cfg.train.eval_every == 0 or last):
        val, per_query = validate()
        metrics.update({f"val/{k}": v for k, v in val.items()})
    if epoch == 0 or last:  # the last report holds every metric of the run (what a recipe measures)
        metrics.update(counters.initial)
    score = metrics.get(cfg.train.best_metric)
    if score is not None and is_better(score, counters.best, cfg.train.best_mode):
        counters.best = score
    if counters.best is not None:
        metrics[f"best/{cfg.train.best_metric}"] = counters.best
    log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics, per_query


def train_loop(config: ExperimentConfig | dict[str, Any], session: Session | None = None) -> dict[str, float]:
    """Train the configured student with the configured loss; returns the last reported metrics.

    Per epoch: the rank's batches (no two captions of one image unless the loss takes multi-positives),
    forward in bf16 autocast on GPU, loss family -> backward -> clip -> AdamW -> per-step cosine; then, every
    ``eval_every`` epochs and at the end, retrieval metrics on val (rank 0), then a checkpoint + report.
    Resumes from the session's latest checkpoint when there is one.
    """
    cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.model_validate(config)
    if session is None:
        run_dir = Path(cfg.train.output_dir) / (cfg.tracking.run_name or f"local-{cfg.config_hash()}")
        session = LocalSession(run_dir, best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    set_backend_flags(cfg.train)  # TF32 (off unless train.tf32) and cudnn.benchmark
    seed_everything(cfg.train.seed + session.rank)
    runner, data, resume = _runner(cfg, session)
    validate = _validator(cfg, runner, data)
    if validate is not None and session.rank == 0 and not resume.resumed and cfg.train.eval_at_start:
        runner.counters.initial = {f"init/val/{k}": v for k, v in validate()[0].items()}
        log.info("untrained model: val rsum %.2f", runner.counters.initial["init/val/rsum"])

    metrics: dict[str, float] = {}
    for epoch in range(resume.start_epoch, cfg.train.epochs):
        metrics, per_query = _epoch_metrics(cfg, runner, resume, epoch, validate)
        with tempfile.TemporaryDirectory(prefix="itr-ckpt-") as tmp:
            ckpt_dir = None
            if session.rank == 0:
                ckpt_dir = Path(tmp)
                runner.save_checkpoint(ckpt_dir, epoch=epoch)
                if per_query is not None:  # what a paired bootstrap between two settings resamples
                    per_query.write(ckpt_dir / QUERY_RANKS_FILE)
            session.report(metrics, ckpt_dir, epoch)
    return metrics
