"""The training procedure, top to bottom. A plain function: call it without Ray (``LocalSession``) or inside a
Ray Train worker (``orchestrator.run``); everything cluster-specific comes through the ``Session``.
"""
from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from methods import EmbeddingBatch
from orchestrator.accumulation import feature_cache
from orchestrator.config import ExperimentConfig, TrainConfig
from orchestrator.data.leakage import check_leakage
from orchestrator.data.image_cache import image_input
from orchestrator.data.loader import FeatureRows, TextInput, images_on_device
from orchestrator.data.pipeline import (AugmentedImages, BadImages, BatchFailure, StepClock, TrainPairs,
                                        WithGlobalIds, build_train_loader, gather_row_inputs,
                                        resolve_loader_workers, train_transform)
from orchestrator.data.sampler import CaptionBatchSampler
from orchestrator.data.shard_loader import shard_train_loader
from orchestrator.data.shards import open_shards
from orchestrator.data.splits import load_split
from orchestrator.distributed import MetricSums, average_gradients, gather_no_grad, global_batch
from orchestrator.errors import UserError
from orchestrator.evaluation.embed import autocast_context, encode_split, evaluate_embeddings, warn_small_split
from orchestrator.losses import build_loss
from orchestrator.models.locked_towers import wrap_locked_towers
from orchestrator.models.student import HEAD_OUTPUTS, build_student, forward_embeddings, unwrap
from orchestrator.models.tower_cache import cached_sides, experiment_tower_features
from orchestrator.soft_labels import BatchInputs
from orchestrator.speed import compile_for_training, set_backend_flags
from orchestrator.session import LocalSession, Session
from orchestrator.training_state import (ResumableBatches, for_rank, load_training_state, mid_epoch, restore_sums,
                                         run_steps, save_checkpoint, save_rank_state)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: the run stops at once, naming the step and the offending terms."""

    def __init__(self, epoch: int, step: int, terms: list[str]) -> None:
        self.epoch, self.step, self.terms = epoch, step, terms
        super().__init__(f"non-finite loss at epoch {epoch}, step {step} (terms: {', '.join(terms)})")

    def __reduce__(self):  # picklable with its fields: Ray and Tune ship it between processes
        return (type(self), (self.epoch, self.step, self.terms))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with the papers' rule (timm ``add_weight_decay``): 1-D params and biases get no decay.

    0-D parameters (temperatures) get no decay either.
    """
    decay, no_decay = [], []
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
    device = session.device
    set_backend_flags(cfg.train)  # TF32 (off unless train.tf32) and cudnn.benchmark
    seed_everything(cfg.train.seed + session.rank)

    # --- data
    streaming = cfg.data.resolved_format == "webdataset"  # train pairs streamed from tar shards; eval map-style
    train_index = open_shards(cfg.data) if streaming else load_split(cfg.data, "train")
    val_index = load_split(cfg.data, "val") if "val" in cfg.eval.splits else None
    if session.rank == 0 and not streaming:  # train vs val/test: a WARNING, or UserError with data.leakage: error
        check_leakage(cfg.data, {"train": train_index, **({"val": val_index} if val_index is not None else {})})
    if session.rank == 0 and val_index is not None:  # a WARNING (once) for a val split too small to rank models
        warn_small_split(val_index.num_images, "val split", cfg.eval.ks)
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    cached = cached_sides(student.model, cfg.model.cache_locked_towers)

    def model_inputs(index, augmented: bool = False):
        """(image input, text input) of a split: pixels (``data.image_cache``: uint8 rows of the decoded-image cache,
        normalised on the device)/tokens, or a locked tower's cached outputs; ``augmented``: no cache (see below)."""
        feats = experiment_tower_features(cfg, student, index, cached, device=device.type) if cached else None
        if "image" in cached:
            images = FeatureRows(feats.image)
        else:
            images = None if augmented else image_input(cfg, index, student.preprocess)
        text = TextInput(features=feats.text) if "text" in cached else TextInput(tokenizer=student.tokenizer)
        return images, text

    train_images, train_text = (None, None) if streaming else model_inputs(train_index,
                                                                          augmented=cfg.data.augment != "none")
    if cfg.data.augment != "none" and not streaming:  # decoded and augmented in the loader workers, every epoch
        if "image" in cached:
            raise UserError("a locked image tower with cached features sees no pixels to augment (set "
                            "model.cache_locked_towers: false, or data.augment: none)", field="data.augment")
        train_images = AugmentedImages(train_index, train_transform(student.model, cfg.data.augment_scale))
    val_images, val_text = model_inputs(val_index) if val_index is not None else (None, None)
    if streaming:  # this rank's shards, decoded (and augmented) in its loader workers every epoch
        augment = cfg.data.augment != "none"
        loader, sampler = shard_train_loader(
            cfg, train_index, rank=session.rank, world_size=session.world_size, pin_memory=device.type == "cuda",
            tokenizer=student.tokenizer,
            preprocess=train_transform(student.model, cfg.data.augment_scale) if augment else student.preprocess)
    else:
        try:
            sampler = CaptionBatchSampler(  # with accum_steps K: batches of B·K (the guarantees hold over all of it)
                train_index.caption_image, cfg.train.batch_size * cfg.train.accum_steps, seed=cfg.train.seed,
                unique_images=cfg.train.batch_sampler == "unique_images", rank=session.rank,
                world_size=session.world_size,
            )
        except ValueError as err:
            accum = f" (train.batch_size x train.accum_steps {cfg.train.accum_steps})" \
                if cfg.train.accum_steps > 1 else ""
            raise UserError(f"{err}{accum}", path=train_index.source or train_index.name,
                            field="train.batch_size") from None
    steps_per_epoch = len(sampler)
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    # --- model, loss, optimiser
    model = student.model.to(device)
    loss_fn = build_loss(cfg).to(device)
    model_outputs = HEAD_OUTPUTS[cfg.resolved_heads]
    needs_teacher = bool(loss_fn.requires - model_outputs - {"relevance"})
    features = load_teacher_features(cfg, train_index) if needs_teacher else None
    batch_inputs = BatchInputs(train_index, features, loss_fn.requires - model_outputs)
    loss_fn.check_inputs(batch_inputs.available | model_outputs)
    gather = cfg.scaling.gather_global_batch and session.world_size > 1
    # whole batches (pixels, tokens, soft-label inputs) built in the loader workers and pinned for the copy; over
    # ResumableBatches: a resume mid-epoch (a step checkpoint) skips the batches done without loading them
    if not streaming:
        pairs = TrainPairs(train_index, train_images, train_text, batch_inputs if batch_inputs.need else None,
                           need=batch_inputs.need, gather=gather, bad_images=cfg.data.bad_images, seed=cfg.train.seed)
        workers = resolve_loader_workers(cfg.data.loader_workers, backend=cfg.scaling.backend,
                                         cpus_per_worker=cfg.scaling.cpus_per_worker)
        loader = build_train_loader(pairs, ResumableBatches(WithGlobalIds(sampler)), workers=workers,
                                    pin_memory=device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor)
    pairs_per_step = cfg.train.batch_size * cfg.train.accum_steps * session.world_size
    skipped = BadImages()
    optimizer = torch.optim.AdamW(param_groups([model, loss_fn], cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas))
    scheduler = cosine_with_warmup(optimizer, cfg.train, steps_per_epoch * cfg.train.epochs)

    start_epoch, global_step, best = 0, 0, None
    initial: dict[str, float] = {}
    resume_from, resumed_at, resumed_state = session.latest_checkpoint(), None, None
    if resume_from is not None:
        resumed_state = load_training_state(resume_from, model, loss_fn, optimizer, scheduler)
        resumed_state = for_rank(resumed_state, resume_from, session.rank)  # a step checkpoint: this rank's RNG, sums
        start_epoch, global_step = resumed_state["epoch"] + 1, resumed_state["global_step"]
        best, initial = resumed_state["best"], dict(resumed_state.get("initial") or {})
        resumed_at = mid_epoch(resumed_state)  # (epoch, steps done) of a step checkpoint
        log.info("resumed from %s (epoch %d done%s)", resume_from, resumed_state["epoch"],
                 f", then {resumed_at[1]} steps of epoch {resumed_at[0]}" if resumed_at else "")
    train_model = session.prepare_model(wrap_locked_towers(model, image_from_features="image" in cached,
                                                           text_from_features="text" in cached))
    train_model = compile_for_training(train_model, cfg.train)  # after the DDP wrap (torch's advice)
    # the loss family's learnable parameters are outside DDP: their gradients are averaged here (see below)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    # train.accum_steps > 1: the batch's features cached without grad, the model's gradients by re-forwards
    accumulation = feature_cache(train_model, forward_embeddings, cfg.train.accum_steps, device=device,
                                 autocast=lambda: autocast_context(device, cfg.model.precision))

    def validate() -> dict[str, float]:
        # a model gone NaN/Inf raises NonFiniteEmbeddingsError here: the run fails, it never records RSUM 600
        emb = encode_split(unwrap(train_model), val_index, val_images, val_text, device=device,
                           batch_size=cfg.eval.batch_size, precision=cfg.model.precision, split="val")
        return evaluate_embeddings(emb, ks=cfg.eval.ks, chunk_size=cfg.eval.chunk_size, device=device)

    if val_index is not None and session.rank == 0 and resume_from is None and cfg.train.eval_at_start:
        initial = {f"init/val/{k}": v for k, v in validate().items()}
        log.info("untrained model: val rsum %.2f", initial["init/val/rsum"])

    save_step = getattr(session, "save_step", None)  # step checkpoints: only sessions that keep them
    if save_step is None and cfg.train.checkpoint_every_steps:
        log.warning("train.checkpoint_every_steps: this backend keeps epoch checkpoints only")

    def step_checkpoint(done: int) -> None:
        """Checkpoint ``done`` steps into ``epoch`` (sampler position, RNG states, the epoch's metric sums)."""
        if save_step is None:
            return
        with tempfile.TemporaryDirectory(prefix="itr-ckpt-") as tmp:
            if session.rank == 0:
                save_checkpoint(Path(tmp), model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch - 1, global_step=global_step, best=best, cfg=cfg, initial=initial,
                                position=(epoch, done), sums=sums)
            else:  # its own RNG states and sums, into the same checkpoint folder as rank 0's files
                save_rank_state(Path(tmp), session.rank, sums)
            save_step(Path(tmp), epoch, done)  # every rank, at the same step (Ray Train: all ranks report)
        clock.resume()  # checkpoint time is not time waiting for data

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        train_model.train()
        sums = MetricSums(device)  # on the device; averaged over steps and ranks once per epoch
        clock, skipped_before = StepClock(), skipped.count  # host time: waiting for batches vs the steps
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step", leave=False,
                   disable=not getattr(session, "progress", False) or session.rank != 0)
        first, rng = 0, None
        if resumed_at is not None and resumed_at[0] == epoch:  # continue a step checkpoint's epoch
            first, rng = resumed_at[1], resumed_state.get("rng")
            restore_sums(sums, resumed_state.get("sums"))
        for step, batch in run_steps(loader, start=first, stop=steps_per_epoch, save=step_checkpoint,
                                     every=cfg.train.checkpoint_every_steps, global_step=lambda: global_step, rng=rng):
            clock.arrived()
            if isinstance(batch, BatchFailure):  # bad input met in a loader worker: one line naming the file
                raise batch.error()
            skipped.add(batch.skipped)  # unreadable images replaced in the worker (data.bad_images: skip)
            batch = batch.to(device)  # pinned: the copy overlaps (soft-label inputs included)
            batch.images = images_on_device(train_images, batch.images)  # cache rows: uint8 -> normalised float
            with autocast_context(device, cfg.model.precision):
                if accumulation is None:
                    emb = forward_embeddings(train_model, batch.images, batch.tokens)
                else:  # leaves that require grad: the loss's backward below fills their gradients
                    emb = accumulation.embed(train_model, batch.images, batch.tokens)
            # gathered with gradients (scale 1 after DDP averaging); with local_loss, this rank's query rows
            emb, image_ids, caption_ids, rows = global_batch(emb, batch.image_index, batch.caption_index,
                                                             gather=gather, local_loss=cfg.scaling.local_loss)
            # row-wise inputs were built for this rank's rows: gathered like the ids (a collective, no host sync)
            extras = gather_row_inputs(batch.extras, gather_no_grad) if gather else batch.extras
            out = loss_fn(EmbeddingBatch(image_ids=image_ids, **emb, **extras, query_rows=rows))
            if not torch.isfinite(out.total):
                bad = [k for k, v in out.terms.items() if not torch.isfinite(v)] or ["total"]
                raise NonFiniteLossError(epoch, step, bad)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            if accumulation is not None:  # re-forward each micro-batch with its slice of the feature gradients
                accumulation.backward()
            # Loss parameters are not in the DDP module (a temperature of a 0-weighted term gets no gradient,
            # which DDP would reject without find_unused_parameters): one all-reduce averages theirs.
            average_gradients(loss_params)
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            global_step += 1
            sums.add({"train/loss": out.total, **{f"train/{name}": v for name, v in out.terms.items()}})
            bar.update(1)
            if global_step % cfg.train.log_every_steps == 0:  # this rank's loss; a host sync on log steps only
                local = float(out.total.detach())
                bar.set_postfix(loss=f"{local:.4f}", refresh=False)
                log.info("epoch %d step %d/%d loss %.4f", epoch, step + 1, steps_per_epoch, local)
            clock.done()
        bar.close()
        # one all-reduce: the step means and the temperatures, both averaged over ranks (identical ranks log
        # rank 0's checkpointed values; ranks that drifted apart would not)
        temperatures = {f"train/temperature/{name.replace('.value', '')}": torch.tensor(v, dtype=torch.float64)
                        for name, v in loss_fn.temperatures().items()}
        pipeline = {"train/data_wait_fraction": clock.data_wait_fraction,  # per rank; averaged over ranks
                    "train/pairs_per_s": clock.pairs_per_s(pairs_per_step),
                    "train/skipped_images": float(skipped.count - skipped_before)}
        metrics = sums.means(snapshot={**temperatures, **{k: torch.tensor(v, dtype=torch.float64)
                                                          for k, v in pipeline.items()}})
        metrics["train/skipped_images"] = round(metrics["train/skipped_images"] * session.world_size)  # a total
        metrics["train/lr"] = scheduler.get_last_lr()[0]
        metrics["train/epoch_time_s"] = time.perf_counter() - t0
        metrics["train/steps"] = float(global_step)
        metrics["epoch"] = float(epoch)

        last = epoch + 1 == cfg.train.epochs
        if val_index is not None and session.rank == 0 and ((epoch + 1) % cfg.train.eval_every == 0 or last):
            metrics.update({f"val/{k}": v for k, v in validate().items()})
        if epoch == 0 or last:  # the last report holds every metric of the run (what a recipe measures)
            metrics.update(initial)
        score = metrics.get(cfg.train.best_metric)
        if score is not None and (best is None or (score > best if cfg.train.best_mode == "max" else score < best)):
            best = score
        if best is not None:
            metrics[f"best/{cfg.train.best_metric}"] = best
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

        with tempfile.TemporaryDirectory(prefix="itr-ckpt-") as tmp:
            ckpt_dir = None
            if session.rank == 0:
                ckpt_dir = Path(tmp)
                save_checkpoint(ckpt_dir, model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch, global_step=global_step, best=best, cfg=cfg, initial=initial)
            session.report(metrics, ckpt_dir, epoch)
    return metrics
