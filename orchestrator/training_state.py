"""What a resumable checkpoint holds, and how a resume continues where it stopped -- also mid-epoch.

Layout of a checkpoint folder (format 2): ``model.pt`` holds the weights once (with the model name and the
embedded config, all ``itr eval --checkpoint`` needs); ``state.pt`` holds the rest a resume needs (loss
parameters, optimiser, scheduler, counters, RNG states, the sampler position), but not the weights. A folder of
the old layout (format 1: the weights in both files) still loads: :func:`load_training_state` takes the weights
from ``state.pt`` when they are there.

Step checkpoints (``train.checkpoint_every_steps``, and a SIGTERM mid-epoch) record the position as
``{"epoch": e, "step": s}``: ``s`` steps of epoch ``e`` are done. A resume skips those batches in the sampler
(:class:`ResumableBatches`, nothing is loaded for them), restores the python / numpy / torch (CPU and CUDA) RNG
states once the epoch's loader iterator exists, and restores the epoch's metric sums, so the next step -- and the
epoch's logged means -- are those of an uninterrupted run. With several DDP ranks (Ray Train), each rank's own
RNG states and sums go into the same folder as ``rank_RRRR.pt`` (:func:`save_rank_state`; rank 0's are in
``state.pt``), and each rank resumes from its own (:func:`for_rank`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, atomic_save, load_file
from orchestrator.errors import UserError
from orchestrator.interrupts import Terminated, sigterm_between_steps

log = logging.getLogger(__name__)

#: ``state.pt``'s ``format``: 2 = the weights only in ``model.pt``; absent = the old layout (weights in both).
FORMAT = 2


def capture_rng() -> dict[str, Any]:
    """The python, numpy, torch CPU and (when present) CUDA RNG states, in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured (CUDA only when both sides have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer,
    scheduler,
    epoch: int,
    global_step: int,
    best: float | None,
    cfg,
    initial: dict[str, float] | None = None,
    position: tuple[int, int] | None = None,
    sums=None,
) -> None:
    """Write ``directory/state.pt`` (everything but the weights), then ``directory/model.pt`` (the weights).

    ``epoch``: the last complete epoch (-1 before the first); ``position``: ``(epoch, steps done)`` for a step
    checkpoint, with ``sums`` the epoch's :class:`~orchestrator.distributed.MetricSums` so far."""
    state = {
        "format": FORMAT,
        "loss": loss_fn.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "best": best,
        "initial": dict(initial or {}),  # init/val/...: the last report repeats them, also after a resume
        "torch_rng": torch.get_rng_state(),
        "rng": capture_rng(),
        "config_hash": cfg.config_hash(),
        "position": None if position is None else {"epoch": int(position[0]), "step": int(position[1])},
        "sums": None if sums is None else _sums_state(sums),
    }
    atomic_save(state, directory / TRAINING_STATE_FILE)
    weights = {
        "model": model.state_dict(),
        "model_name": cfg.model.name,
        "config_yaml": cfg.to_yaml(),
        "epoch": epoch if position is None else None,
    }
    if position is not None:
        weights["position"] = state["position"]
    atomic_save(weights, directory / MODEL_FILE)


def load_training_state(path: Path, model: nn.Module, loss_fn: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Load the checkpoint folder ``path`` (either layout) into the given objects; returns ``state.pt``'s dict.

    The torch CPU RNG is restored here; the full RNG set of a step checkpoint is restored by :func:`run_steps`
    once the epoch's loader iterator exists (creating one draws from the torch RNG)."""
    state = load_file(path / TRAINING_STATE_FILE)
    source = path / TRAINING_STATE_FILE
    try:
        if "model" in state:  # the old layout: the weights in state.pt too
            weights = state["model"]
        else:
            source = path / MODEL_FILE
            weights = load_file(source)["model"]
        model.load_state_dict(weights)
        source = path / TRAINING_STATE_FILE
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint does not fit this experiment: {first}", path=str(source)) from None
    torch.set_rng_state(state["torch_rng"])
    return state


def mid_epoch(state: dict[str, Any]) -> tuple[int, int] | None:
    """``(epoch, steps done)`` of a step checkpoint's state, ``None`` for an epoch checkpoint."""
    position = state.get("position")
    if not position:
        return None
    return int(position["epoch"]), int(position["step"])


def rank_file(rank: int) -> str:
    """The file of rank ``rank``'s own part of a step checkpoint (ranks > 0)."""
    return f"rank_{rank:04d}.pt"


def save_rank_state(directory: Path, rank: int, sums) -> None:
    """Write rank ``rank``'s own part of a step checkpoint: its RNG states and the epoch's
    :class:`~orchestrator.distributed.MetricSums` so far (they differ by rank: seeds, and each rank's batches)."""
    atomic_save({"rank": int(rank), "rng": capture_rng(), "sums": _sums_state(sums)}, directory / rank_file(rank))


def for_rank(state: dict[str, Any], directory: Path, rank: int) -> dict[str, Any]:
    """``state`` (``state.pt``: rank 0's) with rank ``rank``'s own RNG states and sums when it is a step checkpoint;
    a folder without that rank's file (another world size) leaves rank 0's, with a warning."""
    if rank == 0 or mid_epoch(state) is None:
        return state
    path = Path(directory) / rank_file(rank)
    if not path.is_file():
        log.warning(
            "%s has no %s: rank %d resumes with rank 0's RNG states and epoch sums", directory, rank_file(rank), rank
        )
        return state
    own = load_file(path)
    return {**state, "rng": own["rng"], "sums": own["sums"]}


def _sums_state(sums) -> dict[str, Any]:
    total = None if sums.total is None else sums.total.detach().cpu()
    return {"names": list(sums.names), "total": total, "steps": int(sums.steps)}


def restore_sums(sums, saved: dict[str, Any] | None) -> None:
    """Continue the epoch's :class:`~orchestrator.distributed.MetricSums` from a step checkpoint's."""
    if not saved or saved.get("total") is None:
        return
    sums.names = list(saved["names"])
    sums.total = saved["total"].to(device=sums.device, dtype=torch.float64)
    sums.steps = int(saved["steps"])


class ResumableBatches:
    """A batch sampler over ``sampler`` whose next epoch can start ``skip`` batches in (set by :func:`run_steps`):
    the skipped batches are never loaded. ``set_epoch`` and ``len`` are the wrapped sampler's."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.sampler)
        for _ in range(self.skip):
            next(batches, None)
        return batches

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def run_steps(
    loader: Iterable,
    *,
    start: int,
    stop: int,
    save: Callable[[int], None],
    every: int | None,
    global_step: Callable[[], int],
    rng: dict[str, Any] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(step, batch)`` for steps ``start`` .. ``stop - 1`` of an epoch, with the step checkpoints around them.

    - ``start > 0`` (a resume mid-epoch): the sampler skips ``start`` batches (``loader.batch_sampler`` is a
      :class:`ResumableBatches`), and ``rng`` (the checkpoint's) is restored once the loader iterator exists.
    - Every ``every`` global steps (``global_step()``, read after the step), ``save(steps done)`` -- not after
      the epoch's last step, which the epoch checkpoint covers.
    - A SIGTERM (inside ``sigterm_as_interrupt``) is held while a step runs; at the next step boundary the
      position is saved (when a step ran since the last checkpoint) and :class:`Terminated` is raised.
    """
    with sigterm_between_steps() as sigterm:
        batch_sampler = getattr(loader, "batch_sampler", None)
        resumable = batch_sampler if isinstance(batch_sampler, ResumableBatches) else None
        if start and resumable is None:
            raise TypeError("resuming mid-epoch needs a loader over ResumableBatches")
        if start and resumable is not None:
            resumable.skip = start
        try:
            batches = iter(loader)
        finally:
            if start and resumable is not None:
                resumable.skip = 0
        if rng is not None:
            restore_rng(rng)
        step = start
        while step < stop and not sigterm.received:
            batch = next(batches, None)
            if batch is None or sigterm.received:
                break
            yield step, batch
            step += 1
            if every and global_step() % every == 0 and step < stop and not sigterm.received:
                save(step)
        if sigterm.received:
            if step > start:
                save(step)
            log.warning(
                "SIGTERM: stopped after step %d of the epoch%s",
                step,
                " (step checkpoint saved)" if step > start else "",
            )
            raise Terminated("SIGTERM")
