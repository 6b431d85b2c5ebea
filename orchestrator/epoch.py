"""One training epoch: the steps (forward, gathered loss, backward, loss-parameter sync, clip, AdamW, schedule),
the step checkpoints between them, and the epoch's rank-averaged train metrics.

:class:`EpochRunner` holds what every epoch of a run shares (built once by ``train_loop``); its
:meth:`~EpochRunner.train_one_epoch` is the epoch body. The run's counters that a checkpoint resumes (global step,
best score, the untrained model's metrics) live in :class:`RunCounters`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from methods import EmbeddingBatch
from methods.families import LossFamily
from orchestrator.config import ExperimentConfig
from orchestrator.data.loader import images_on_device
from orchestrator.data.pipeline import BadImages, BatchFailure, StepClock, gather_row_inputs
from orchestrator.distributed import MetricSums, average_gradients, gather_no_grad, global_batch
from orchestrator.evaluation.embed import autocast_context
from orchestrator.models.student import forward_embeddings
from orchestrator.session import Session
from orchestrator.training_state import restore_sums, run_steps, save_checkpoint, save_rank_state

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: the run stops at once, naming the step and the offending terms."""

    def __init__(self, epoch: int, step: int, terms: list[str]) -> None:
        self.epoch, self.step, self.terms = epoch, step, terms
        super().__init__(f"non-finite loss at epoch {epoch}, step {step} (terms: {', '.join(terms)})")

    def __reduce__(self):  # picklable with its fields: Ray and Tune ship it between processes
        return (type(self), (self.epoch, self.step, self.terms))


@dataclass
class RunCounters:
    """What a checkpoint carries across epochs: ``global_step``, the ``best`` selection score so far, and the
    untrained model's ``initial`` metrics (``init/val/*``)."""

    global_step: int = 0
    best: float | None = None
    initial: dict[str, float] = field(default_factory=dict)


@dataclass
class EpochRunner:
    """Everything the epochs of one run share. ``model`` is the plain module (what checkpoints hold),
    ``train_model`` the DDP-wrapped / compiled one the steps run; ``loader`` yields this rank's batches over
    ``sampler``; ``accumulation`` is the feature cache of ``train.accum_steps`` > 1 (else None)."""

    cfg: ExperimentConfig
    session: Session
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    loss_fn: LossFamily
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    sampler: Any
    train_images: Any
    accumulation: Any
    steps_per_epoch: int
    gather: bool
    counters: RunCounters
    skipped: BadImages = field(default_factory=BadImages)

    def __post_init__(self) -> None:
        # the loss family's learnable parameters are outside DDP: their gradients are averaged in ``_step``
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.pairs_per_step = self.cfg.train.batch_size * self.cfg.train.accum_steps * self.session.world_size
        if not self.session.saves_steps and self.cfg.train.checkpoint_every_steps:
            log.warning("train.checkpoint_every_steps: this backend keeps epoch checkpoints only")

    def train_one_epoch(
        self, epoch: int, *, first: int = 0, rng: dict[str, Any] | None = None, sums_state: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Steps ``first`` .. ``steps_per_epoch - 1`` of ``epoch`` (``first`` > 0: a step checkpoint's epoch, with
        its RNG states ``rng`` and metric sums ``sums_state``); returns the epoch's train metrics, averaged over
        steps and ranks (one all-reduce)."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        self.train_model.train()
        sums = MetricSums(self.device)  # on the device; averaged over steps and ranks once per epoch
        restore_sums(sums, sums_state)
        clock, skipped_before = StepClock(), self.skipped.count  # host time: waiting for batches vs the steps
        t0 = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            unit="step",
            leave=False,
            disable=not self.session.progress or self.session.rank != 0,
        )

        def checkpoint(done: int) -> None:
            self._step_checkpoint(epoch, done, sums)
            clock.resume()  # checkpoint time is not time waiting for data

        for step, batch in run_steps(
            self.loader,
            start=first,
            stop=self.steps_per_epoch,
            save=checkpoint,
            every=cfg.train.checkpoint_every_steps,
            global_step=lambda: self.counters.global_step,
            rng=rng,
        ):
            clock.arrived()
            out = self._step(epoch, step, batch)
            sums.add({"train/loss": out.total, **{f"train/{name}": v for name, v in out.terms.items()}})
            bar.update(1)
            if self.counters.global_step % cfg.train.log_every_steps == 0:  # a host sync on log steps only
                local = float(out.total.detach())  # this rank's loss
                bar.set_postfix(loss=f"{local:.4f}", refresh=False)
                log.info("epoch %d step %d/%d loss %.4f", epoch, step + 1, self.steps_per_epoch, local)
            clock.done()
        bar.close()
        return self._epoch_metrics(epoch, sums, clock, skipped_before, t0)

    def _step(self, epoch: int, step: int, batch) -> Any:
        """One optimiser step on ``batch``; returns the loss family's output."""
        cfg, device = self.cfg, self.device
        if isinstance(batch, BatchFailure):  # bad input met in a loader worker: one line naming the file
            raise batch.error()
        self.skipped.add(batch.skipped)  # unreadable images replaced in the worker (data.bad_images: skip)
        batch = batch.to(device)  # pinned: the copy overlaps (soft-label inputs included)
        batch.images = images_on_device(self.train_images, batch.images)  # cache rows: uint8 -> normalised float
        with autocast_context(device, cfg.model.precision):
            if self.accumulation is None:
                emb = forward_embeddings(self.train_model, batch.images, batch.tokens)
            else:  # leaves that require grad: the loss's backward below fills their gradients
                emb = self.accumulation.embed(self.train_model, batch.images, batch.tokens)
        # gathered with gradients (scale 1 after DDP averaging); with local_loss, this rank's query rows
        emb, image_ids, _, rows = global_batch(
            emb, batch.image_index, batch.caption_index, gather=self.gather, local_loss=cfg.scaling.local_loss
        )
        # row-wise inputs were built for this rank's rows: gathered like the ids (a collective, no host sync)
        extras = gather_row_inputs(batch.extras, gather_no_grad) if self.gather else batch.extras
        tensors: dict[str, Any] = {**emb, **extras}  # EmbeddingBatch fields: the model's outputs, the batch's extras
        out = self.loss_fn(EmbeddingBatch(image_ids=image_ids, query_rows=rows, **tensors))
        if not torch.isfinite(out.total):  # the step's one host sync
            bad = [k for k, v in out.terms.items() if not torch.isfinite(v)] or ["total"]
            raise NonFiniteLossError(epoch, step, bad)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.accumulation is not None:  # re-forward each micro-batch with its slice of the feature gradients
            self.accumulation.backward()
        # Loss parameters are not in the DDP module (a temperature of a 0-weighted term gets no gradient, which
        # DDP would reject without find_unused_parameters): one all-reduce averages theirs.
        average_gradients(self.loss_params)
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.train.grad_clip
            )
        self.optimizer.step()
        self.scheduler.step()
        self.counters.global_step += 1
        return out

    def _step_checkpoint(self, epoch: int, done: int, sums: MetricSums) -> None:
        """Checkpoint ``done`` steps into ``epoch`` (sampler position, RNG states, the epoch's metric sums)."""
        if not self.session.saves_steps:
            return
        rank = self.session.rank
        with tempfile.TemporaryDirectory(prefix="itr-ckpt-") as tmp:
            if rank == 0:
                self.save_checkpoint(Path(tmp), epoch=epoch - 1, position=(epoch, done), sums=sums)
            else:  # its own RNG states and sums, into the same checkpoint folder as rank 0's files
                save_rank_state(Path(tmp), rank, sums)
            self.session.save_step(Path(tmp), epoch, done)  # every rank, at the same step (Ray Train: all ranks report)

    def save_checkpoint(
        self, directory: Path, *, epoch: int, position: tuple[int, int] | None = None, sums: MetricSums | None = None
    ) -> None:
        """The run's checkpoint into ``directory``: ``epoch`` the last complete one (see ``save_checkpoint``)."""
        c = self.counters
        save_checkpoint(
            directory,
            model=self.model,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=epoch,
            global_step=c.global_step,
            best=c.best,
            cfg=self.cfg,
            initial=c.initial,
            position=position,
            sums=sums,
        )

    def _epoch_metrics(
        self, epoch: int, sums: MetricSums, clock: StepClock, skipped_before: int, t0: float
    ) -> dict[str, float]:
        """The epoch's train metrics. One all-reduce: the step means, the temperatures and the pipeline figures,
        averaged over ranks (identical ranks log rank 0's checkpointed temperatures; drifted ones would not)."""
        temperatures = {
            f"train/temperature/{name.replace('.value', '')}": v for name, v in self.loss_fn.temperatures().items()
        }
        pipeline = {
            "train/data_wait_fraction": clock.data_wait_fraction,  # per rank; averaged over ranks
            "train/pairs_per_s": clock.pairs_per_s(self.pairs_per_step),
            "train/skipped_images": float(self.skipped.count - skipped_before),
        }
        snapshot = {k: torch.tensor(v, dtype=torch.float64) for k, v in {**temperatures, **pipeline}.items()}
        metrics = sums.means(snapshot=snapshot)
        metrics["train/skipped_images"] = round(metrics["train/skipped_images"] * self.session.world_size)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/epoch_time_s"] = time.perf_counter() - t0
        metrics["train/steps"] = float(self.counters.global_step)
        metrics["epoch"] = float(epoch)
        return metrics
