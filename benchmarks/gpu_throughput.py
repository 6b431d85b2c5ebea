"""Training throughput (pairs/s) and peak memory of our step vs a bare open_clip loop, plus a COCO-5K eval.

One call on an H100/H200 measures everything::

    python benchmarks/gpu_throughput.py --device cuda --out gpu_throughput.json

CPU smoke check (tiny sizes; the figures are not performance numbers)::

    python benchmarks/gpu_throughput.py --device cpu --model itr-tiny-vit --batch-sizes 16 --steps 3

Variants, each at every ``--batch-sizes`` B (images (B, 3, H, W) and tokens (B, L) are synthetic and resident on
the device; bf16 autocast on CUDA, fp32 on CPU):

* ``bare``     — open_clip model, ``open_clip.ClipLoss``, backward, AdamW step (the reference, "(a)").
* ``ours/F``   — our per-step work of ``orchestrator.train_loop`` for family F (infonce, cusa, listwise, bcls):
  ``forward_embeddings`` -> ``build_loss(cfg)(EmbeddingBatch)`` -> backward -> grad clip -> AdamW -> cosine
  scheduler step, with random teacher features / relevance in the batch where the family needs them.
* ``accumK/infonce`` — ``ours/infonce`` with ``train.accum_steps`` K (``--accum-steps``, default 4): the same B
  pairs per step as K micro-batches of B/K with feature caching (``orchestrator.accumulation``), i.e. the cost
  of the re-forwards at a fixed loss batch; its peak memory is the point.
* ``compiled/infonce`` — ``ours/infonce`` with ``train.compile`` (``orchestrator.speed.compile_for_training``;
  ``--compile-backend``, default inductor on CUDA, aot_eager on the CPU smoke run). The first warm-up step
  compiles; the timed steps do not.
* ``ray/infonce`` — ``ours/infonce`` inside a one-worker Ray Train ``TorchTrainer`` (skipped with a message when
  Ray cannot start such a worker).

Warm-up steps are excluded; the figure is the median step time over ``--steps`` steps (CUDA synchronised).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_throughput")

FAMILIES = ("infonce", "cusa", "listwise", "bcls")
#: Targets printed next to the figures: ray/ours-infonce vs bare, and each soft-label family vs bare.
TARGET_RAY_INFONCE = 0.95
TARGET_SOFT_LABEL = 0.90
TEACHER_DIM = 384


def experiment_config(family: str, model: str, batch: int) -> Any:
    """A validated ``ExperimentConfig`` for ``family`` (synthetic data, so ``exact`` relevance is allowed)."""
    from orchestrator.config import validate_config

    tree: dict[str, Any] = {
        "data": {"format": "synthetic"},
        "model": {"name": model},
        "loss": {"family": family},
        "train": {"batch_size": max(batch, 2), "lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 10, "grad_clip": 2.0},
        "tracking": {"enabled": False},
    }
    if family == "cusa":
        tree["teachers"] = {"image": "synthetic:attributes", "text": "synthetic:attributes"}
    return validate_config(tree, source=f"<benchmark {family}>")


def synthetic_inputs(model: Any, batch: int, device: Any) -> tuple[Any, Any]:
    """(images (B, 3, H, W) float32, tokens (B, L) int64) on ``device`` for an open_clip ``model``."""
    import torch

    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ctx = int(getattr(model, "context_length", 77))
    vocab = int(getattr(model, "vocab_size", 49408))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g).to(device)
    tokens = torch.randint(1, vocab - 1, (batch, ctx), generator=g)
    tokens[:, -1] = vocab - 1  # an end-of-text token (argmax pooling) on every row
    return images, tokens.to(device)


def time_steps(step: Callable[[], None], device: Any, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, peak GiB allocated on CUDA or NaN) of ``step`` after ``warmup`` calls."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def bare_step(model_name: str, batch: int, device: Any) -> Callable[[], None]:
    """(a): the plain open_clip training step (forward, ClipLoss, backward, AdamW)."""
    import open_clip
    import torch

    from orchestrator.models.registry import register_project_models

    register_project_models()
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True).to(device).train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images, tokens = synthetic_inputs(model, batch, device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def our_step(
    family: str, model_name: str, batch: int, device: Any, accum: int = 1, compile_backend: str | None = None
) -> Callable[[], None]:
    """(b): ``train_loop``'s per-step work for ``family`` on device-resident synthetic inputs (``accum`` > 1:
    as ``accum`` micro-batches with feature caching; ``compile_backend``: ``train.compile`` with that backend)."""
    import torch

    from methods import EmbeddingBatch
    from orchestrator.accumulation import feature_cache
    from orchestrator.evaluation.embed import autocast_context
    from orchestrator.losses import build_loss
    from orchestrator.models.student import HEAD_OUTPUTS, build_student, forward_embeddings
    from orchestrator.speed import compile_for_training
    from orchestrator.train_loop import cosine_with_warmup, param_groups

    torch.manual_seed(0)
    cfg = experiment_config(family, model_name, batch)
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    model = student.model.to(device).train()
    loss_fn = build_loss(cfg).to(device)
    optimizer = torch.optim.AdamW(
        param_groups([model, loss_fn], cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas)
    )
    scheduler = cosine_with_warmup(optimizer, cfg.train, 10_000)
    base = getattr(model, "base", model)  # the open_clip model inside CUSA's HeadedDualEncoder
    images, tokens = synthetic_inputs(base, batch, device)
    image_ids = torch.arange(batch, device=device)
    g = torch.Generator().manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1).to(device)  # noqa: E731
    extras: dict[str, torch.Tensor] = {}
    needs = loss_fn.requires - HEAD_OUTPUTS[cfg.resolved_heads]
    for name in sorted(needs):
        if name in ("teacher_image", "teacher_text", "text_caption_emb"):
            extras[name] = unit(batch, TEACHER_DIM)
        elif name == "caption_group_emb":
            extras[name] = unit(batch, 5, TEACHER_DIM)
        elif name == "caption_group_mask":
            extras[name] = torch.ones(batch, 5, dtype=torch.bool, device=device)
        elif name == "relevance":
            rel = torch.rand(batch, batch, generator=g)
            rel.fill_diagonal_(1.0)
            extras[name] = rel.to(device)
        else:
            raise RuntimeError(f"benchmark does not know how to fake input {name!r} of {family}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if compile_backend is not None:  # as train_loop does it (compile_for_training; no DDP in one process)
        model = compile_for_training(
            model, cfg.train.model_copy(update={"compile": True, "compile_backend": compile_backend})
        )
    cache = feature_cache(
        model, forward_embeddings, accum, device=device, autocast=lambda: autocast_context(device, cfg.model.precision)
    )

    def step() -> None:
        with autocast_context(device, cfg.model.precision):
            emb = forward_embeddings(model, images, tokens) if cache is None else cache.embed(model, images, tokens)
        out = loss_fn(EmbeddingBatch(image_ids=image_ids, **emb, **extras))
        if not torch.isfinite(out.total):  # the loop's per-step NaN check (a host sync, as in train_loop)
            raise RuntimeError(f"non-finite loss in {family}")
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if cache is not None:
            cache.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()

    return step


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: time ``ours/infonce`` and report the figures."""
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    step = our_step("infonce", config["model"], config["batch"], device)
    seconds, peak = time_steps(step, device, config["warmup"], config["steps"])
    # Train V2 keeps a report's metrics in Result.metrics only when it carries a checkpoint: a 1-byte one
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "timed").write_text("1")
        ray.train.report({"seconds": seconds, "peak_gib": peak}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_infonce(model_name: str, batch: int, device: Any, warmup: int, steps: int) -> tuple[float, float] | str:
    """(c): ``ours/infonce`` inside a one-worker TorchTrainer; a string says why it was skipped."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as err:
        return f"ray not importable ({err})"
    gpu = device.type == "cuda"
    try:
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(
                include_dashboard=False,
                log_to_driver=False,
                **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(2, os.cpu_count() or 2)}),
            )
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            return "Ray sees no GPU"
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"model": model_name, "batch": batch, "warmup": warmup, "steps": steps},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"gpu-throughput-{batch}", storage_path=tempfile.mkdtemp(prefix="itr-bench-")),
        )
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - a benchmark reports the reason and goes on
        return f"Ray Train worker failed ({err.__class__.__name__}: {str(err).splitlines()[0][:160]})"
    if not result.metrics or "seconds" not in result.metrics:
        return f"Ray Train worker reported nothing ({result.error!r})"
    return float(result.metrics["seconds"]), float(result.metrics["peak_gib"])


def eval_timing(device: Any, images: int, captions: int, dim: int) -> dict[str, Any]:
    """Seconds of ``retrieval_metrics`` on random (images x captions, D) embeddings (5 captions per image)."""
    import torch

    from orchestrator.evaluation.recall import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(images, dim, generator=g), dim=-1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(captions, dim, generator=g), dim=-1).to(device)
    text_image = torch.arange(captions, device=device) * images // captions
    few = text_image < min(100, images)  # warm-up (kernels, allocator): the first images, their captions
    retrieval_metrics(img[: min(100, images)], txt[few], text_image[few])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    metrics = retrieval_metrics(img, txt, text_image)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "images": images,
        "captions": captions,
        "dim": dim,
        "seconds": time.perf_counter() - t0,
        "rsum": metrics.get("rsum"),
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the result rows."""
    cols = ["variant", "batch", "pairs_per_s", "ratio_to_bare", "peak_gib", "target", "note"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--warmup", type=int, default=None, help="default 5 on CUDA, 1 on CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accum-steps", type=int, default=4, help="K of the accumK/infonce variant")
    p.add_argument(
        "--compile-backend",
        default=None,
        choices=["inductor", "aot_eager", "eager"],
        help="backend of the compiled/infonce variant (default inductor on CUDA, aot_eager on CPU)",
    )
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train variant (c)")
    p.add_argument(
        "--eval-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("IMAGES", "CAPTIONS", "D"),
        help="evaluation timing size (default COCO 5K: 5000 25000 512 on CUDA, 500 2500 64 on CPU)",
    )
    p.add_argument("--out", default="gpu_throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    rows: list[dict[str, Any]] = []

    def measure(
        variant: str,
        batch: int,
        make: Callable[[], Callable[[], None]] | None = None,
        done: tuple[float, float] | str | None = None,
    ) -> None:
        note = ""
        try:
            result = done if done is not None else time_steps(make(), device, warmup, args.steps)  # type: ignore[misc]
        except torch.cuda.OutOfMemoryError:
            result = "out of memory"
        except Exception as err:  # noqa: BLE001 - one broken variant must not lose the others' figures
            log.exception("%s B=%d failed", variant, batch)
            result = f"failed: {err.__class__.__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        if isinstance(result, str):
            seconds, peak, note = float("nan"), float("nan"), result
            print(f"{variant} B={batch}: skipped ({result})")
        else:
            seconds, peak = result
        bare = next((r for r in rows if r["variant"] == "bare" and r["batch"] == batch), None)
        pps = batch / seconds if seconds == seconds else float("nan")
        ratio = pps / bare["pairs_per_s"] if bare and bare["pairs_per_s"] == bare["pairs_per_s"] else float("nan")
        if variant == "bare":
            ratio = 1.0 if pps == pps else float("nan")
        target = None
        if variant == "ray/infonce":
            target = f">= {TARGET_RAY_INFONCE}"
        elif variant.startswith("ours/") and variant != "ours/infonce":
            target = f">= {TARGET_SOFT_LABEL}"
        if target and ratio == ratio:
            target += " ok" if ratio >= float(target.split()[1]) else " MISSED"
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "seconds_per_step": seconds,
                "pairs_per_s": pps,
                "ratio_to_bare": ratio,
                "peak_gib": peak,
                "target": target,
                "note": note,
            }
        )
        log.info("%s B=%d: %.1f pairs/s (ratio %.3f), peak %.2f GiB", variant, batch, pps, ratio, peak)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for batch in args.batch_sizes:
        measure("bare", batch, lambda: bare_step(args.model, batch, device))
        for family in args.families:
            measure(f"ours/{family}", batch, lambda: our_step(family, args.model, batch, device))
        accum_variant = f"accum{args.accum_steps}/infonce"
        if args.accum_steps > 1 and batch % args.accum_steps == 0:
            measure(accum_variant, batch, lambda: our_step("infonce", args.model, batch, device, args.accum_steps))
        else:
            measure(accum_variant, batch, done=f"B={batch} is not split into {args.accum_steps} micro-batches")
        backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
        measure(
            "compiled/infonce", batch, lambda: our_step("infonce", args.model, batch, device, compile_backend=backend)
        )
        if args.no_ray:
            measure("ray/infonce", batch, done="--no-ray")
        else:
            measure("ray/infonce", batch, done=ray_infonce(args.model, batch, device, warmup, args.steps))

    eval_size = args.eval_size or ([5000, 25000, 512] if device.type == "cuda" else [500, 2500, 64])
    evaluation = eval_timing(device, *eval_size)
    fits = all(r["note"] != "out of memory" for r in rows if r["batch"] == 1024)

    print()
    print(format_rows(rows))
    print(
        f"\nevaluation {evaluation['images']} x {evaluation['captions']} (D={evaluation['dim']}): "
        f"{evaluation['seconds']:.2f} s on {device}"
    )
    fits_text = ("yes" if fits else "NO") if 1024 in args.batch_sizes else "not measured"
    print(
        f"targets: ray/infonce / bare >= {TARGET_RAY_INFONCE}; ours/<soft-label family> / bare >= "
        f"{TARGET_SOFT_LABEL}; B=1024 fits: {fits_text}"
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    payload = {
        "device": device_name,
        "model": args.model,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "warmup": warmup,
        "steps": args.steps,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "rows": rows,
        "evaluation": evaluation,
        "b1024_fits": fits if 1024 in args.batch_sizes else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).write_text(json.dumps(payload, indent=2, allow_nan=True))
    print(f"wrote {args.out}")
    if not args.no_ray:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
