"""Checkpoint bytes per epoch, before and after the weights were written once (issue 14, item 5).

Builds ``open_clip.create_model(<model>)`` (random init), takes one AdamW step on zero gradients so the optimiser
holds its moments (as after any training step), then writes one epoch's checkpoint folder both ways into a temp
folder and prints a table of file sizes:

- before (commit a503107): ``state.pt`` = weights + loss + optimiser + scheduler + counters, ``model.pt`` =
  weights + config: the weights twice;
- after (``orchestrator.training_state.save_checkpoint``): ``state.pt`` without the weights, ``model.pt`` as
  before; a best folder that is no longer the latest keeps ``model.pt`` only.

    python benchmarks/checkpoint_bytes.py [--model ViT-B-32]

Needs about 3x the checkpoint size of free disk in the temp folder (files are removed as they are measured).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, atomic_save  # noqa: E402
from orchestrator.config import ExperimentConfig  # noqa: E402
from orchestrator.losses import build_loss  # noqa: E402
from orchestrator.train_loop import cosine_with_warmup, param_groups  # noqa: E402
from orchestrator.training_state import save_checkpoint  # noqa: E402


def measure(model: nn.Module, cfg: ExperimentConfig) -> dict[str, dict[str, int]]:
    """``{"before": {...}, "after": {...}}``: bytes of ``state.pt``, ``model.pt`` and a kept best folder."""
    loss_fn = build_loss(cfg)
    optimizer = torch.optim.AdamW(param_groups([model, loss_fn], cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = cosine_with_warmup(optimizer, cfg.train, 100)
    for p in list(model.parameters()) + list(loss_fn.parameters()):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="itr-ckpt-bytes-") as tmp:
        old = Path(tmp) / "before"
        atomic_save(
            {
                "model": model.state_dict(),
                "loss": loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": 0,
                "global_step": 1,
                "best": None,
                "torch_rng": torch.get_rng_state(),
                "config_hash": cfg.config_hash(),
            },
            old / TRAINING_STATE_FILE,
        )
        atomic_save(
            {"model": model.state_dict(), "model_name": cfg.model.name, "config_yaml": cfg.to_yaml(), "epoch": 0},
            old / MODEL_FILE,
        )
        out["before"] = _sizes(old, best_keeps_state=True)
        for f in old.iterdir():
            f.unlink()
        new = Path(tmp) / "after"
        save_checkpoint(
            new,
            model=model,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=0,
            global_step=1,
            best=None,
            cfg=cfg,
        )
        out["after"] = _sizes(new, best_keeps_state=False)
    return out


def _sizes(folder: Path, *, best_keeps_state: bool) -> dict[str, int]:
    state, weights = (folder / TRAINING_STATE_FILE).stat().st_size, (folder / MODEL_FILE).stat().st_size
    return {
        "state.pt": state,
        "model.pt": weights,
        "per epoch": state + weights,
        "best folder": state + weights if best_keeps_state else weights,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip model name (random init)")
    args = parser.parse_args(argv)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = measure(model, ExperimentConfig())
    print(f"{args.model}: {n_params / 1e6:.1f} M parameters (fp32 weights {4 * n_params / 1e9:.3f} GB)")
    print(f"{'layout':<8} {'state.pt':>10} {'model.pt':>10} {'per epoch':>10} {'best folder':>12}  (GB)")
    for layout, row in sizes.items():
        print(
            f"{layout:<8} "
            + " ".join(
                f"{row[k] / 1e9:>{w}.3f}"
                for k, w in (("state.pt", 10), ("model.pt", 10), ("per epoch", 10), ("best folder", 12))
            )
        )
    saved = 1 - sizes["after"]["per epoch"] / sizes["before"]["per epoch"]
    print(f"per epoch: {saved:.0%} fewer bytes written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
