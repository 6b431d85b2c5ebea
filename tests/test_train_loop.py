"""The plain training loop: learning, checkpoints, resume, best-by-val, eval CLI on its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import validate_config
from orchestrator.session import LocalSession
from orchestrator.train_loop import cosine_with_warmup, param_groups, train_loop
from tests.conftest import tiny_tree


def session_for(cfg, tmp_path, name):
    return LocalSession(tmp_path / name, best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)


def test_resume_gives_same_next_epoch_as_uninterrupted(tmp_path):
    cfg = validate_config(tiny_tree(tmp_path, train={"epochs": 2}))
    full = session_for(cfg, tmp_path, "full")
    train_loop(cfg, full)

    # interrupt a second run right after its first checkpoint, then resume it in a fresh session
    cut = session_for(cfg, tmp_path, "cut")

    class Interrupt(Exception):
        pass

    orig = cut.report

    def report_then_die(metrics, ckpt, epoch):
        orig(metrics, ckpt, epoch)
        raise Interrupt

    cut.report = report_then_die
    with pytest.raises(Interrupt):
        train_loop(cfg, cut)
    assert cut.latest_checkpoint().name == "epoch_0000"
    resumed = session_for(cfg, tmp_path, "cut")
    train_loop(cfg, resumed)
    assert len(resumed.history) == 1 and resumed.history[0]["epoch"] == 1.0
    a, b = full.history[1], resumed.history[0]
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)
    assert a["val/rsum"] == pytest.approx(b["val/rsum"], abs=1e-6)


def test_training_learns_and_keeps_best_and_latest(tmp_path):
    tree = tiny_tree(tmp_path, train={"epochs": 4, "max_steps_per_epoch": None, "batch_size": 32})
    cfg = validate_config(tree)
    session = session_for(cfg, tmp_path, "learn")
    train_loop(cfg, session)
    rsum = [h["val/rsum"] for h in session.history]
    losses = [h["train/loss"] for h in session.history]
    assert losses[-1] < losses[0]
    assert max(rsum[1:]) > rsum[0]
    best = session.best_checkpoint()
    assert best is not None and session.latest_checkpoint().name == "epoch_0003"
    assert best.name == f"epoch_{int(np.argmax(rsum)):04d}"
    kept = sorted(p.name for p in (tmp_path / "learn" / "checkpoints").glob("epoch_*"))
    assert kept == sorted({best.name, "epoch_0003"})


def test_param_groups_no_decay_for_biases_norms_and_scalars():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_parameter("tau", torch.nn.Parameter(torch.tensor(0.05)))
    decay, no_decay = param_groups([model], 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_cosine_schedule_warmup_then_cosine_to_min():
    cfg = validate_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4}}).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = cosine_with_warmup(opt, cfg, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # step 9 is halfway through the 10 cosine steps: (1 + 0.1) / 2
    assert lrs[9] == pytest.approx(0.55)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_eval_cli_exports_embeddings(tmp_path, capsys):
    cfg = validate_config(tiny_tree(tmp_path, train={"epochs": 1}))
    session = session_for(cfg, tmp_path, "ev")
    train_loop(cfg, session)
    ckpt = session.latest_checkpoint()
    out = tmp_path / "emb.npz"
    js = tmp_path / "m.json"
    assert (
        main(["eval", "--checkpoint", str(ckpt), "--split", "val", "--export-embeddings", str(out), "--json", str(js)])
        == 0
    )
    data = np.load(out)
    assert set(data.files) == {"image_emb", "text_emb", "image_ids", "text_image_ids"}
    assert data["image_emb"].shape[0] == 40 and data["text_emb"].shape[0] == len(data["text_image_ids"])
    assert np.allclose(np.linalg.norm(data["image_emb"], axis=1), 1, atol=1e-5)
    metrics = json.loads(js.read_text())["metrics"]
    assert metrics["rsum"] == pytest.approx(session.history[-1]["val/rsum"], abs=1e-4)


def test_eval_cli_wrong_architecture_checkpoint_exits_2(tmp_path, capsys):
    cfg = validate_config(tiny_tree(tmp_path, train={"epochs": 1}))
    session = session_for(cfg, tmp_path, "arch")
    train_loop(cfg, session)
    ckpt = session.latest_checkpoint() / "model.pt"
    code = main(["eval", "--checkpoint", str(ckpt), "--set", "model.name=itr-small-vit"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "does not fit model 'itr-small-vit'" in err[0]


def test_eval_cli_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
