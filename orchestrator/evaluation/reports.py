"""Report figures of a model's embeddings of a split: what ``itr eval --report-dir`` writes and what every
training run logs to MLflow (under ``reports/``) at its end.

* ``recall_curves.png``: Recall@K for K = 1 .. 100 (or the gallery size), image->text and text->image.
* ``tsne.png``: a 2-D t-SNE of image and caption embeddings (CUSA's Figure 4 view: how far apart the two
  modalities lie and whether an image sits among its captions).
* ``case_study.png``: a few fixed text queries (the first caption of evenly spaced images, so the same queries
  in every run on a split), each with its top-5 images, the ground truth framed in green (CUSA's Figure 5 view).

Each figure names what it shows (``source``: the checkpoint and its epoch, the split) in a footer and in the
PNG's ``Description`` text chunk. matplotlib draws on its Agg canvas (no display; pyplot is not used).
"""

from __future__ import annotations

import json
import logging
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.index import DatasetIndex
from orchestrator.evaluation.embed import SplitEmbeddings
from orchestrator.evaluation.recall import ranks

log = logging.getLogger(__name__)

__all__ = [
    "case_study_figure",
    "generate_run_reports",
    "publish_run_reports",
    "recall_curve_figure",
    "report_source",
    "tsne_figure",
    "write_reports",
]

GT_COLOUR = "#1a9850"
OTHER_COLOUR = "#bdbdbd"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path, source: str | None) -> Path:
    """Write ``fig`` to ``path``; ``source`` (what the figure shows) as a footer and the PNG's Description."""
    if source:
        # a figure-level x label: the constrained layout keeps room for it under the axes
        fig.supxlabel(source, x=0.01, ha="left", fontsize=7, color="0.35")
    fig.savefig(path, metadata={"Description": source} if source else None)
    return path


def report_source(
    split: str,
    checkpoint: Path | str | None = None,
    epoch: int | None = None,
    epochs: int | None = None,
    label: str = "checkpoint",
) -> str:
    """The figures' footer, e.g. ``val split · checkpoint run/best (epoch 3 = 4 of 20)``.

    Epochs are 0-based, as in MLflow and the leaderboard; the checkpoint is named by its last two path parts."""
    parts = [f"{split} split"]
    if checkpoint is not None:
        where = Path(checkpoint)
        where = where.parent if where.suffix == ".pt" else where
        text = f"{label} {where.parent.name}/{where.name}"
        if epoch is not None:
            text += f" (epoch {epoch} = {epoch + 1}" + (f" of {epochs})" if epochs else ")")
        parts.append(text)
    return " · ".join(parts)


def recall_curve_figure(
    i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, path: Path, max_k: int = 100, source: str | None = None
) -> Path:
    """Recall@K (%) against K (log scale) for both directions, from 1-based ranks (N,) and (M,)."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    i2t_ranks, t2i_ranks = np.asarray(i2t_ranks), np.asarray(t2i_ranks)
    # gallery sizes: image->text ranks among the M captions, text->image among the N images
    for name, r, gallery, colour in (
        ("image → text", i2t_ranks, len(t2i_ranks), "#2166ac"),
        ("text → image", t2i_ranks, len(i2t_ranks), "#b2182b"),
    ):
        k = np.arange(1, min(max_k, gallery) + 1)
        recall = 100.0 * (r[None, :] <= k[:, None]).mean(axis=1)
        marks = [m for m in (1, 5, 10) if m <= k[-1]]
        label = f"{name}   R@{'/'.join(map(str, marks))}: " + " / ".join(f"{recall[m - 1]:.1f}" for m in marks)
        ax.plot(k, recall, label=label, color=colour, lw=2)
        ax.plot(marks, [recall[m - 1] for m in marks], "o", color=colour, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Recall@K ({len(i2t_ranks)} images, {len(t2i_ranks)} captions)")
    return _save(fig, path, source)


def _spread(n: int, count: int) -> np.ndarray:
    """``count`` evenly spaced distinct indices in [0, n)."""
    return np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))


def tsne_figure(
    emb: SplitEmbeddings,
    path: Path,
    max_images: int = 200,
    captions_per_image: int = 1,
    seed: int = 0,
    max_iter: int = 500,
    source: str | None = None,
) -> Path:
    """t-SNE of up to ``max_images`` images (evenly spaced) and up to ``captions_per_image`` captions each;
    a thin line joins each image to its captions. About 2 s for 400 points on 2 CPU cores."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    images = _spread(emb.image_emb.shape[0], max_images)
    owners = np.asarray(emb.text_image)
    caps = np.concatenate([np.flatnonzero(owners == i)[:captions_per_image] for i in images])
    x = torch.cat([emb.image_emb[images], emb.text_emb[caps]]).numpy().astype(np.float32)
    n_img = len(images)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    # one OpenMP thread: next to torch's thread pool, sklearn's Barnes-Hut threads spin and run 5-10x slower
    with threadpool_limits(1):
        xy = TSNE(
            n_components=2,
            perplexity=perplexity,
            init="pca",
            learning_rate="auto",
            max_iter=max_iter,
            random_state=seed,
        ).fit_transform(x)
    img_xy, cap_xy = xy[:n_img], xy[n_img:]
    row_of = {int(i): r for r, i in enumerate(images)}
    fig = _figure(6.4, 6.0)
    ax = fig.add_subplot()
    for c, owner in enumerate(owners[caps]):
        a, b = img_xy[row_of[int(owner)]], cap_xy[c]
        ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=0.4, alpha=0.5, zorder=1)
    ax.scatter(img_xy[:, 0], img_xy[:, 1], s=14, c="#2166ac", marker="o", label=f"images ({n_img})", zorder=2)
    ax.scatter(cap_xy[:, 0], cap_xy[:, 1], s=14, c="#ef8a62", marker="^", label=f"captions ({len(caps)})", zorder=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    ax.set_title("t-SNE of image and caption embeddings (lines join an image to its captions)", fontsize=9)
    return _save(fig, path, source)


def case_study_figure(
    emb: SplitEmbeddings, index: DatasetIndex, path: Path, num_queries: int = 4, top: int = 5, source: str | None = None
) -> Path:
    """For ``num_queries`` fixed caption queries: the caption and its ``top`` images, ground truth in green."""
    owners = np.asarray(emb.text_image)
    query_images = _spread(index.num_images, num_queries)
    queries = [int(index.captions_of(int(i))[0]) for i in query_images]
    sims = emb.text_emb[queries] @ emb.image_emb.T  # (q, N)
    top = min(top, emb.image_emb.shape[0])
    best = sims.topk(top, dim=1)
    fig = _figure(2.0 * (top + 1.4), 2.3 * len(queries))
    grid = fig.add_gridspec(len(queries), top + 1, width_ratios=[1.4] + [1.0] * top)
    for row, q in enumerate(queries):
        gt = int(owners[q])
        gt_rank = int((sims[row] > sims[row, gt]).sum()) + 1
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        text = "\n".join(textwrap.wrap(f"“{index.captions[q]}”", 26)[:7])
        ax.text(
            0.0,
            0.5,
            f"{text}\n\nground truth: rank {gt_rank}",
            va="center",
            ha="left",
            fontsize=8,
            transform=ax.transAxes,
        )
        for col in range(top):
            image = int(best.indices[row, col])
            ax = fig.add_subplot(grid[row, col + 1])
            thumb = index.load_image(image)
            thumb.thumbnail((160, 160))
            ax.imshow(np.asarray(thumb))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = image == gt
            for spine in ax.spines.values():
                spine.set_edgecolor(GT_COLOUR if hit else OTHER_COLOUR)
                spine.set_linewidth(5 if hit else 1)
            ax.set_title(
                f"#{col + 1}  {float(best.values[row, col]):.2f}" + ("  GT" if hit else ""),
                fontsize=8,
                color=GT_COLOUR if hit else "black",
            )
    fig.suptitle("Text queries and their top images (green frame: the query's own image)", fontsize=10)
    return _save(fig, path, source)


def write_reports(
    emb: SplitEmbeddings,
    out_dir: Path,
    *,
    index: DatasetIndex | None = None,
    metrics: dict[str, float] | None = None,
    chunk_size: int = 1024,
    source: str | None = None,
) -> list[Path]:
    """Write the report figures (the case study only with ``index``) and, given ``metrics``, ``metrics.json``
    into ``out_dir``; ``source`` (see :func:`report_source`) labels every figure. Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    i2t, t2i = ranks(emb.image_emb, emb.text_emb, emb.text_image, chunk_size=chunk_size)
    files = [
        recall_curve_figure(i2t, t2i, out_dir / "recall_curves.png", source=source),
        tsne_figure(emb, out_dir / "tsne.png", source=source),
    ]
    if index is not None:
        files.append(case_study_figure(emb, index, out_dir / "case_study.png", source=source))
    if metrics is not None:
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        files.append(path)
    return files


def generate_run_reports(cfg, checkpoint: Path | str, out_dir: Path) -> list[Path]:
    """Load ``checkpoint`` (the run's best) with the run's config ``cfg``, embed its val split, write the reports."""
    from orchestrator.data.loader import ImageTensorCache
    from orchestrator.data.splits import load_split
    from orchestrator.evaluation.checkpoint_model import load_checkpoint_model
    from orchestrator.evaluation.embed import encode_split
    from orchestrator.session import default_device

    loaded = load_checkpoint_model(checkpoint, experiment=cfg)
    device = default_device()
    model = loaded.student.model.to(device)
    index = load_split(cfg.data, "val", verify=False)
    emb = encode_split(
        model,
        index,
        ImageTensorCache(index, loaded.student.preprocess),
        loaded.student.tokenizer,
        device=device,
        batch_size=cfg.eval.batch_size,
        precision=cfg.model.precision,
    )
    source = report_source("val", loaded.path, loaded.epoch, cfg.train.epochs, label="best checkpoint")
    return write_reports(emb, out_dir, index=index, chunk_size=cfg.eval.chunk_size, source=source)


def publish_run_reports(cfg, checkpoint: Path | str | None, log_files: Callable[[list[Path]], None]) -> list[str]:
    """The end-of-run reports: generated in a temporary folder and handed to ``log_files`` (e.g. MLflow).

    Does nothing when ``eval.reports`` is off, there is no checkpoint or no val split; any failure is logged as a
    warning and never raised (a plot must not fail a finished run). Returns the file names logged."""
    if not getattr(cfg.eval, "reports", True) or checkpoint is None or "val" not in cfg.eval.splits:
        return []
    try:
        with tempfile.TemporaryDirectory(prefix="itr-reports-") as tmp:
            from orchestrator import storage

            if storage.is_uri(str(checkpoint)):  # the run stored its checkpoints in object storage
                checkpoint = storage.download_checkpoint(str(checkpoint), Path(tmp) / "checkpoint")
            files = generate_run_reports(cfg, checkpoint, Path(tmp))
            log_files(files)
            names = [f.name for f in files]
    except Exception as err:  # noqa: BLE001 - reports are best effort
        log.warning("run reports skipped: %s: %s", err.__class__.__name__, err)
        return []
    log.info("run reports logged: %s", ", ".join(names))
    return names
