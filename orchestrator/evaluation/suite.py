"""``itr eval``: every requested protocol on a checkpoint (or on exported embeddings), in one pass.

Inputs are checked before any model runs (image folder, sentence-pair file, the eccv-caption package, the
relevance source), so bad input stops with one ``UserError`` and nothing written. Metric keys:

* recall (always): ``i2t_r1 … t2i_r10``, ``rsum``, medians and mean ranks (:mod:`.recall`);
* ``--folds N``: the same under ``folds/``, averaged over N consecutive image folds (COCO 1K: N = 5);
* ``--eccv``: ``eccv_r1/i2t``, ``eccv_map_at_r/t2i``, ``coco_1k_r5/i2t``, ``cxc_r10/t2i``, … (:mod:`.eccv`);
* ``--graded``: ``i2t_ndcg10``, ``i2t_ndcg25``, ``i2t_ndcg_all``, ``i2t_kendall_tau`` and t2i (:mod:`.graded`);
* ``--image-folder``: ``image_r1`` (:mod:`.unimodal`); ``--sts``: ``sts_spearman``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from orchestrator.errors import UserError
from orchestrator.evaluation.embed import (
    NonFiniteEmbeddingsError,
    SplitEmbeddings,
    evaluate_embeddings,
    warn_small_split,
)
from orchestrator.evaluation.outputs import EvalInputs, check_outputs, planned_outputs
from orchestrator.evaluation.recall import fold_metrics

if TYPE_CHECKING:
    from orchestrator.data.splits import SplitRole

log = logging.getLogger(__name__)

__all__ = ["EvalOptions", "EvalResult", "evaluate_checkpoint", "evaluate_embeddings_file"]


@dataclass
class EvalOptions:
    """What ``itr eval`` computes besides recall (see the module docstring)."""

    split: SplitRole = "val"
    ks: tuple[int, ...] | None = None  # default: the config's eval.ks, else (1, 5, 10)
    folds: int | None = None
    eccv: bool = False
    eccv_k: int = 100
    graded: bool = False
    relevance: Literal["auto", "exact", "teacher"] = "auto"
    relevance_aggregation: Literal["max", "mean"] | None = None  # default: the config's
    ndcg_ks: tuple[int, ...] = (10, 25)
    kendall_candidates: int | None = None
    image_folder: Path | None = None
    sts: Path | None = None
    report_dir: Path | None = None
    export_embeddings: Path | None = None
    json_out: Path | None = None  # written by the CLI; named here so that it is checked before anything runs


@dataclass
class EvalResult:
    metrics: dict[str, float]
    dataset: str
    report_files: list[Path] = field(default_factory=list)


def _check_inputs(opts: EvalOptions):
    from orchestrator.evaluation.unimodal import load_labelled_images, load_sentence_pairs

    if opts.eccv:
        from orchestrator.evaluation.eccv import MIN_LIST_LENGTH, eccv_reference

        if opts.eccv_k < MIN_LIST_LENGTH:
            raise UserError(
                f"the ranked lists need at least {MIN_LIST_LENGTH} items, got {opts.eccv_k}", field="--eccv-k"
            )
        eccv_reference()
    if opts.folds is not None and opts.folds < 1:
        raise UserError(f"--folds must be positive, got {opts.folds}", field="--folds")
    images = load_labelled_images(opts.image_folder) if opts.image_folder else None
    pairs = load_sentence_pairs(opts.sts) if opts.sts else None
    return images, pairs


def _guard_outputs(opts: EvalOptions, inputs: EvalInputs, bulk_inputs: Sequence[Path] = ()) -> None:
    """Refuse, before anything runs, an output that is an input or cannot be written (:mod:`.outputs`)."""
    if opts.image_folder is not None:
        (inputs.add_tree if Path(opts.image_folder).is_dir() else inputs.add_file)(opts.image_folder, "--image-folder")
    inputs.add_file(opts.sts, "--sts")
    outputs = planned_outputs(
        json_path=opts.json_out, export_embeddings=opts.export_embeddings, report_dir=opts.report_dir
    )
    if outputs:
        check_outputs(outputs, inputs, bulk_inputs=bulk_inputs, report_dir=opts.report_dir)


def _checkpoint_inputs(checkpoint: Path, model_path: Path, cfg, index, split: str, config: str | None) -> EvalInputs:
    """The files ``itr eval --checkpoint`` reads: the checkpoint (its whole folder when one was given), the
    config, the split's annotations, the dataset root and the teacher cache."""
    from orchestrator.checkpoint import TRAINING_STATE_FILE

    inputs = EvalInputs([], [])
    inputs.add_file(model_path, "the checkpoint")
    if Path(checkpoint).is_dir():
        inputs.add_tree(checkpoint, "the checkpoint folder")
    elif (model_path.parent / TRAINING_STATE_FILE).is_file():
        inputs.add_file(model_path.parent / TRAINING_STATE_FILE, "the checkpoint's training state")
    inputs.add_file(config, "--config")
    inputs.add_file(index.source, f"the {split} split's annotations")
    inputs.add_file(cfg.data.annotations, "data.annotations")
    inputs.add_tree(cfg.data.root, "the dataset (data.root)")
    inputs.add_tree(cfg.teachers.cache_dir, "the teacher cache (teachers.cache_dir)")
    return inputs


def _recall_and_protocols(
    emb: SplitEmbeddings, opts: EvalOptions, ks: Sequence[int], chunk_size: int, device: torch.device, source: str
) -> dict[str, float]:
    metrics = evaluate_embeddings(emb, ks=tuple(ks), chunk_size=chunk_size, device=device)
    if opts.folds is not None:
        if emb.image_emb.shape[0] % opts.folds:
            raise UserError(
                f"{emb.image_emb.shape[0]} images cannot be split into {opts.folds} equal folds", field="--folds"
            )
        folds = fold_metrics(
            emb.image_emb.to(device),
            emb.text_emb.to(device),
            emb.text_image,
            num_folds=opts.folds,
            ks=tuple(ks),
            chunk_size=chunk_size,
        )
        metrics.update({f"folds/{k}": v for k, v in folds.items()})
    if opts.eccv:
        from orchestrator.evaluation.eccv import eccv_from_embeddings

        metrics.update(
            eccv_from_embeddings(
                emb.image_emb.to(device),
                emb.text_emb.to(device),
                emb.image_ids,
                emb.caption_ids,
                k=opts.eccv_k,
                chunk_size=chunk_size,
                source=source,
            )
        )
    return metrics


def _relevance(cfg, index, opts: EvalOptions, device: torch.device):
    """The relevance for ``--graded``: the data's exact one, or caption-caption similarity of the text teacher."""
    from orchestrator.evaluation.graded import CaptionRelevance, ExactRelevance

    if opts.relevance in ("auto", "exact") and index.relevance is not None:
        return ExactRelevance(index.relevance), "exact"
    if opts.relevance == "exact":
        raise UserError(
            "this data has no exact relevance (the synthetic data has); use --relevance teacher", field="--relevance"
        )
    if cfg.teachers.text is None:
        raise UserError(
            "graded relevance needs a text teacher for caption-caption similarity: set teachers.text "
            "(e.g. --set teachers.text=packaged:all-MiniLM-L6-v2)",
            field="teachers.text",
        )
    from orchestrator.teachers import extract_split

    feats = extract_split(cfg.teachers.model_copy(update={"image": None}), index, progress=True)
    if feats.text is None:  # extract_split extracts every configured side, and teachers.text is set
        raise RuntimeError(f"the text teacher {cfg.teachers.text!r} produced no caption features")
    agg = opts.relevance_aggregation or cfg.eval.relevance_aggregation
    return CaptionRelevance(feats.text, index.caption_image, index.num_images, agg, device), f"teacher-{agg}"


def _write_outputs(
    emb: SplitEmbeddings,
    opts: EvalOptions,
    metrics: dict[str, float],
    index,
    chunk_size: int,
    source: str | None = None,
) -> list[Path]:
    """Embeddings export and report folder, each written in a temporary place first, then moved."""
    from orchestrator.checkpoint import atomic_write

    files: list[Path] = []
    if opts.export_embeddings:
        out = Path(opts.export_embeddings)
        atomic_write(out, emb.save_npz, what="embeddings")  # temp file beside it, removed on any failure
        log.info("embeddings written to %s", out)
    if opts.report_dir:
        from orchestrator.evaluation.reports import write_reports

        target = Path(opts.report_dir)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".itr-report-", dir=target) as tmp:
            for f in write_reports(emb, Path(tmp), index=index, metrics=metrics, chunk_size=chunk_size, source=source):
                dest = target / f.name
                shutil.move(str(f), dest)
                files.append(dest)
        log.info("reports written to %s", target)
    return files


def evaluate_checkpoint(
    checkpoint: Path | str, opts: EvalOptions, *, config: str | None = None, overrides: Sequence[str] = ()
) -> EvalResult:
    """Every requested protocol for the model in ``checkpoint`` on split ``opts.split`` of its data."""
    from orchestrator.data.loader import ImageTensorCache
    from orchestrator.data.splits import load_split
    from orchestrator.evaluation.checkpoint_model import load_checkpoint_model
    from orchestrator.evaluation.embed import encode_split
    from orchestrator.session import default_device

    images, pairs = _check_inputs(opts)
    loaded = load_checkpoint_model(checkpoint, config=config, overrides=overrides)
    cfg, student = loaded.cfg, loaded.student
    device = default_device()
    index = load_split(cfg.data, opts.split)
    _guard_outputs(
        opts,
        _checkpoint_inputs(Path(checkpoint), loaded.path, cfg, index, opts.split, config),
        bulk_inputs=[*(index.image_paths or []), *(images.paths if images is not None else [])],
    )
    if opts.eccv and index.caption_ids is None:
        raise UserError(
            "ECCV Caption needs COCO caption ids; this data has none (use the Karpathy format)",
            path=index.source or index.name,
        )
    if opts.folds is not None and index.num_images % opts.folds:
        raise UserError(f"{index.num_images} images cannot be split into {opts.folds} equal folds", field="--folds")
    relevance = _relevance(cfg, index, opts, device) if opts.graded else None
    model = student.model.to(device)
    try:
        emb = encode_split(
            model,
            index,
            ImageTensorCache(index, student.preprocess),
            student.tokenizer,
            device=device,
            batch_size=cfg.eval.batch_size,
            precision=cfg.model.precision,
            split=opts.split,
        )
    except NonFiniteEmbeddingsError as err:  # a diverged model: bad input, named by its file
        raise UserError(f"{err} (the model outputs NaN/Inf)", path=str(loaded.path)) from None
    ks = opts.ks or tuple(cfg.eval.ks)
    metrics = _recall_and_protocols(emb, opts, ks, cfg.eval.chunk_size, device, index.source or index.name)
    if relevance is not None:
        from orchestrator.evaluation.graded import graded_metrics

        fn, name = relevance
        log.info("graded metrics with %s relevance", name)
        metrics.update(
            graded_metrics(
                emb.image_emb.to(device),
                emb.text_emb.to(device),
                fn,
                ks=opts.ndcg_ks,
                kendall_candidates=opts.kendall_candidates,
            )
        )
    if images is not None:
        from orchestrator.evaluation.unimodal import encode_image_files, image_retrieval_recall

        feats = encode_image_files(
            model, images.paths, student.preprocess, device=device, batch_size=cfg.eval.batch_size
        )
        metrics.update(image_retrieval_recall(feats.to(device), images.labels, ks=(1,)))
    if pairs is not None:
        from orchestrator.evaluation.unimodal import encode_texts, sts_spearman

        a = encode_texts(model, pairs.first, student.tokenizer, device=device, batch_size=cfg.eval.batch_size)
        b = encode_texts(model, pairs.second, student.tokenizer, device=device, batch_size=cfg.eval.batch_size)
        metrics["sts_spearman"] = sts_spearman(a, b, pairs.scores)
    from orchestrator.evaluation.reports import report_source

    warn_small_split(index.num_images, f"{opts.split} split", ks)
    source = report_source(opts.split, loaded.path, loaded.epoch, cfg.train.epochs)
    files = _write_outputs(emb, opts, metrics, index, cfg.eval.chunk_size, source)
    return EvalResult(metrics=metrics, dataset=index.name, report_files=files)


def evaluate_embeddings_file(path: Path | str, opts: EvalOptions) -> EvalResult:
    """Recall (and ``--folds`` / ``--eccv``) of embeddings exported by ``itr eval --export-embeddings`` (plus an
    optional ``caption_ids`` array for ``--eccv``). Protocols that need the model or the data are refused."""
    from orchestrator.session import default_device

    needs_model = [
        flag
        for flag, on in (("--graded", opts.graded), ("--image-folder", opts.image_folder), ("--sts", opts.sts))
        if on
    ]
    if needs_model:
        raise UserError(
            f"{needs_model[0]} needs --checkpoint (a model and its data), not --embeddings", field=needs_model[0]
        )
    _check_inputs(opts)
    inputs = EvalInputs([], [])
    inputs.add_file(path, "--embeddings")
    _guard_outputs(replace(opts, export_embeddings=None), inputs)  # this mode exports nothing
    emb = SplitEmbeddings.load_npz(path)
    device = default_device()
    metrics = _recall_and_protocols(emb, opts, opts.ks or (1, 5, 10), 1024, device, str(path))
    warn_small_split(emb.image_emb.shape[0], str(path), opts.ks or (1, 5, 10))
    files = _write_outputs(
        emb, EvalOptions(report_dir=opts.report_dir), metrics, None, 1024, f"embeddings {Path(path).name}"
    )
    return EvalResult(metrics=metrics, dataset=str(path), report_files=files)
