"""Checkpoints (issue 14, item 5): the weights written once per epoch, step checkpoints that resume mid-epoch.

- A checkpoint folder holds the weights once (``model.pt``); ``state.pt`` holds the rest a resume needs. The best
  folder, once it is not the latest, keeps only its weights and config. ``itr eval --checkpoint`` reads the new
  layout and the old one (the weights in both files), and a run resumes from an old-layout folder too.
- A SIGTERM mid-epoch (inside ``sigterm_as_interrupt``, as ``itr train`` runs) saves a step checkpoint at the next
  step boundary; the resume continues at the next step with the same loss as an uninterrupted run, and ends with
  the same epoch metrics and weights. ``train.checkpoint_every_steps`` writes them on a schedule too.

The loop runs in-process with a real signal (``os.kill`` of this process from a log handler at a chosen step).
"""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, atomic_save, load_file
from orchestrator.config import validate_config
from orchestrator.interrupts import Terminated, sigterm_as_interrupt
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree
from tests.test_bad_input import run_cli

STEPS = 6


class StepLosses(logging.Handler):
    """Collects (epoch, step, loss) from the loop's per-step log line; ``on_step(epoch, step)`` runs after each."""

    def __init__(self, on_step=None) -> None:
        super().__init__(logging.INFO)
        self.losses: dict[tuple[int, int], float] = {}
        self.on_step = on_step

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("epoch %d step %d/%d loss"):
            return
        epoch, step, _, loss = record.args
        self.losses[(epoch, step)] = float(loss)
        if self.on_step is not None:
            self.on_step(epoch, step)


def train(cfg, folder, on_step=None) -> tuple[LocalSession, dict[tuple[int, int], float]]:
    """``train_loop`` in ``folder`` as ``itr train`` runs it (SIGTERM raises there), collecting per-step losses."""
    session = LocalSession(folder, best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    handler = StepLosses(on_step)
    logger = logging.getLogger("orchestrator.epoch")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with sigterm_as_interrupt():
            train_loop(cfg, session)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return session, handler.losses


def config(tmp_path, **train):
    return validate_config(
        tiny_tree(tmp_path, train={"epochs": 2, "max_steps_per_epoch": STEPS, "log_every_steps": 1, **train})
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its session (history, checkpoints) and per-step losses."""
    tmp = tmp_path_factory.mktemp("reference")
    return train(config(tmp), tmp / "run")


def _weights(folder):
    return load_file(folder / MODEL_FILE)["model"]


def _assert_same_run(resumed: LocalSession, ref: LocalSession, *, epochs: list[int]) -> None:
    by_epoch = {int(h["epoch"]): h for h in ref.history}
    assert [int(h["epoch"]) for h in resumed.history] == epochs
    for h in resumed.history:
        want = by_epoch[int(h["epoch"])]
        for key in ("train/loss", "val/rsum", "init/val/rsum"):
            if key in want:
                assert h[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    mine, theirs = _weights(resumed.latest_checkpoint()), _weights(ref.latest_checkpoint())
    assert all(torch.allclose(mine[k], theirs[k], rtol=1e-6, atol=1e-7) for k in theirs)


def test_a_sigterm_mid_epoch_saves_a_step_checkpoint_and_the_resume_continues_with_the_same_loss(tmp_path, reference):
    """SIGTERM during step 3 of epoch 0: the step ends, ``step_0000_00000003`` is saved (no epoch folder yet), the
    loop raises ``Terminated``. The resume skips the 3 done batches and its next step's loss is the uninterrupted
    run's step-4 loss; the epoch-0 means (sums carried over), the init/val metrics (not recomputed on a half-trained
    model) and the final weights match too. Before: a SIGTERM lost the epoch, and a resume started it over."""
    ref_session, ref_losses = reference
    cfg = config(tmp_path)

    def sigterm_at_step_3(epoch, step):
        if (epoch, step) == (0, 3):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(cfg, tmp_path / "run", sigterm_at_step_3)
    cut = LocalSession(tmp_path / "run")
    latest = cut.latest_checkpoint()
    assert latest is not None and latest.name == "step_0000_00000003"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000_00000003"]
    state = load_file(latest / TRAINING_STATE_FILE)
    assert state["position"] == {"epoch": 0, "step": 3} and state["global_step"] == 3 and "model" not in state

    resumed, losses = train(cfg, tmp_path / "run")
    assert min(losses) == (0, 4)  # steps 1-3 were not run again
    assert losses[(0, 4)] == pytest.approx(ref_losses[(0, 4)], rel=1e-6)
    assert all(losses[k] == pytest.approx(ref_losses[k], rel=1e-6) for k in losses)
    _assert_same_run(resumed, ref_session, epochs=[0, 1])
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # superseded by the epoch checkpoints


def test_checkpoint_every_steps_resumes_from_the_last_one_after_a_crash(tmp_path, reference):
    """``checkpoint_every_steps: 4`` and a crash (not a signal) in step 5 of epoch 1 (global step 11): the resume
    starts from ``step_0001_00000002`` (global step 8) and ends as the uninterrupted run."""
    ref_session, ref_losses = reference
    cfg = config(tmp_path, checkpoint_every_steps=4)

    class Crash(Exception):
        pass

    def crash_at(epoch, step):
        if (epoch, step) == (1, 5):
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", crash_at)
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*_*"))
    assert "step_0001_00000002" in folders and not [f for f in folders if f.startswith("step_0000")]
    resumed, losses = train(cfg, tmp_path / "run")
    assert min(losses) == (1, 3)
    assert all(losses[k] == pytest.approx(ref_losses[k], rel=1e-6) for k in losses)
    _assert_same_run(resumed, ref_session, epochs=[1])


def test_weights_are_written_once_and_the_best_keeps_no_optimiser_state(reference):
    """Every kept folder holds the weights in ``model.pt`` only; the latest has the optimiser state, a best that
    is not the latest has no ``state.pt``. Before: ``state.pt`` repeated the weights in every folder."""
    session, _ = reference
    latest = session.latest_checkpoint()
    state = load_file(latest / TRAINING_STATE_FILE)
    assert "model" not in state and state["optimizer"]["state"] and state["format"] == 2
    assert set(load_file(latest / MODEL_FILE)["model"]) == set(_weights(latest))


def test_the_best_folder_drops_its_training_state_once_a_later_epoch_is_latest(tmp_path):
    """Epoch 0 scores best, epoch 1 is the latest: epoch 0 keeps ``model.pt`` only (what ``itr eval`` reads),
    epoch 1 keeps both files; a resume starts from epoch 1, and a newer step checkpoint wins over it."""
    session = LocalSession(tmp_path / "run")
    for epoch, score in ((0, 10.0), (1, 5.0)):
        src = tmp_path / f"src{epoch}"
        atomic_save({"epoch": epoch}, src / TRAINING_STATE_FILE)
        atomic_save({"epoch": epoch}, src / MODEL_FILE)
        session.report({"val/rsum": score}, src, epoch)
    best, latest = session.best_checkpoint(), session.latest_checkpoint()
    assert (best.name, latest.name) == ("epoch_0000", "epoch_0001")
    assert sorted(os.listdir(best)) == [MODEL_FILE] and sorted(os.listdir(latest)) == [MODEL_FILE, TRAINING_STATE_FILE]
    session.save_step(tmp_path / "src1", 2, 3)
    assert session.latest_checkpoint().name == "step_0002_00000003"


def test_eval_reads_the_old_layout_and_a_run_resumes_from_it(tmp_path, reference):
    """An old-layout folder (as ``a503107``'s ``_save_checkpoint`` wrote it: the weights in ``state.pt`` and
    ``model.pt``, no RNG set, no position): ``itr eval --checkpoint`` on it prints the same recall as on the new
    layout of the same weights, and a run resumes from it."""
    session, _ = reference
    new = session.latest_checkpoint()
    state, weights = load_file(new / TRAINING_STATE_FILE), load_file(new / MODEL_FILE)
    old = tmp_path / "run" / "checkpoints" / "epoch_0000"
    atomic_save(
        {
            "model": weights["model"],
            "loss": state["loss"],
            "optimizer": state["optimizer"],
            "scheduler": state["scheduler"],
            "epoch": 0,
            "global_step": STEPS,
            "best": state["best"],
            "torch_rng": state["torch_rng"],
            "config_hash": state["config_hash"],
        },
        old / TRAINING_STATE_FILE,
    )
    atomic_save(
        {
            "model": weights["model"],
            "model_name": weights["model_name"],
            "config_yaml": weights["config_yaml"],
            "epoch": 0,
        },
        old / MODEL_FILE,
    )
    outputs = []
    for folder in (old, new):
        rc, lines, out = run_cli(["eval", "--checkpoint", str(folder), "--split", "val"], tmp_path)
        assert rc == 0, lines
        outputs.append(out.replace(str(folder), "<ckpt>"))
    assert outputs[0] == outputs[1] and "rsum" in outputs[0].lower()

    cfg = config(tmp_path, epochs=2)
    resumed, losses = train(cfg, tmp_path / "run")
    assert [int(h["epoch"]) for h in resumed.history] == [1] and min(losses) == (1, 1)


def test_checkpoint_bytes_script_counts_the_weights_once_after_and_twice_before():
    """``benchmarks/checkpoint_bytes.py``'s ``measure`` on a 1000x1000 linear layer (4.004 MB of fp32 weights,
    AdamW moments 2x that): before, the folder holds the weights twice; after, once (``model.pt`` only), and a
    best folder holds the weights alone."""
    import importlib.util
    from pathlib import Path

    from orchestrator.config import ExperimentConfig

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint_bytes.py"
    spec = importlib.util.spec_from_file_location("checkpoint_bytes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = module.measure(torch.nn.Linear(1000, 1000), ExperimentConfig())
    weights = 4 * (1000 * 1000 + 1000)
    before, after = sizes["before"], sizes["after"]
    assert weights < after["model.pt"] < weights + 64_000  # + the embedded config
    assert 2 * weights < after["state.pt"] < 2 * weights + 64_000  # the two AdamW moments, no weights
    assert 3 * weights < before["state.pt"] < 3 * weights + 64_000
    # the weights less what the new state adds: the full RNG set (python, numpy, torch: ~15 KB)
    assert before["per epoch"] - after["per epoch"] == pytest.approx(weights, abs=32_000)
    assert after["best folder"] == after["model.pt"] and before["best folder"] == before["per epoch"]


def test_run_steps_resumed_mid_epoch_gives_the_remaining_batches_and_rng_draws_of_an_uninterrupted_epoch():
    """``run_steps`` over a ``DataLoader`` on ``ResumableBatches``: cut after 4 of 10 steps (the RNG set captured
    there, as a step checkpoint does), then resumed with the RNGs scrambled: the same batches 5-10 and the same
    torch / python / numpy draws in each step as the uninterrupted epoch. The RNG set is restored after the loader
    iterator exists: creating one draws from the torch RNG, so restoring it before would shift every draw."""
    import random

    import numpy as np
    from torch.utils.data import DataLoader

    from orchestrator.data.sampler import CaptionBatchSampler
    from orchestrator.training_state import ResumableBatches, capture_rng, restore_rng, run_steps

    sampler = CaptionBatchSampler(np.arange(40) % 20, 2, seed=1)
    loader = DataLoader(list(range(40)), batch_sampler=ResumableBatches(sampler))

    def epoch(start, rng=None):
        steps = run_steps(
            loader, start=start, stop=10, save=lambda done: None, every=None, global_step=lambda: 0, rng=rng
        )
        draws = []
        for step, batch in steps:
            draws.append((step, batch.tolist(), torch.rand(1).item(), random.random(), float(np.random.rand())))
        return draws

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    full = epoch(0)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    cut: dict = {}
    n = 0
    steps = run_steps(
        loader, start=0, stop=10, save=lambda done: cut.setdefault(done, capture_rng()), every=4, global_step=lambda: n
    )
    for _step, _batch in steps:
        torch.rand(1), random.random(), np.random.rand()
        n += 1
        if n == 4:
            next(steps, None)  # the boundary after step 4 (its save), then stop as a crash would
            break
    assert list(cut) == [4]
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    resumed = epoch(4, rng=cut[4])
    assert [d[:2] for d in resumed] == [d[:2] for d in full[4:]]  # steps and batches
    assert resumed == full[4:]  # and every draw
    restore_rng(cut[4])  # restored before the iterator exists: its seed draw shifts the torch draws
    assert [d[2] for d in epoch(4)] != [d[2] for d in full[4:]]
