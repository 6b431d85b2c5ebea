"""``itr eval``: the metrics of a checkpoint or of exported embeddings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import BinaryIO

from orchestrator.cli.common import Subparsers, metrics_table


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.suite import EvalOptions, evaluate_checkpoint, evaluate_embeddings_file
    from orchestrator.storage import is_uri

    opts = EvalOptions(
        split=args.split or ("test" if args.eccv else "val"),
        folds=args.folds,
        eccv=args.eccv,
        eccv_k=args.eccv_k,
        graded=args.graded,
        relevance=args.relevance,
        relevance_aggregation=args.relevance_agg,
        kendall_candidates=args.kendall_candidates,
        image_folder=Path(args.image_folder) if args.image_folder else None,
        sts=Path(args.sts) if args.sts else None,
        report_dir=Path(args.report_dir) if args.report_dir else None,
        export_embeddings=Path(args.export_embeddings) if args.export_embeddings else None,
        json_out=Path(args.json) if args.json else None,
    )
    if args.embeddings:
        result = evaluate_embeddings_file(Path(args.embeddings), opts)
        source = {"embeddings": str(args.embeddings)}
    elif is_uri(args.checkpoint):  # object storage: its files to a temp folder, then as a local checkpoint
        import tempfile

        from orchestrator.storage import download_checkpoint

        with tempfile.TemporaryDirectory(prefix="itr-eval-") as tmp:
            local = download_checkpoint(args.checkpoint, Path(tmp) / "checkpoint")
            result = evaluate_checkpoint(local, opts, config=args.config, overrides=args.set)
        source = {"checkpoint": args.checkpoint}
    else:
        from orchestrator.checkpoint import model_file

        result = evaluate_checkpoint(Path(args.checkpoint), opts, config=args.config, overrides=args.set)
        source = {"checkpoint": str(model_file(Path(args.checkpoint)))}
    print(metrics_table(result.metrics))
    payload = {**source, "split": opts.split, "dataset": result.dataset, "metrics": result.metrics}
    if args.json:
        from orchestrator.checkpoint import atomic_write

        text = json.dumps(payload, indent=2).encode()

        def write(fh: BinaryIO) -> None:
            fh.write(text)

        atomic_write(Path(args.json), write, what="metrics JSON")
    else:
        print(json.dumps(payload))
    return 0


def add_eval_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """``eval``: the metrics of a checkpoint or of exported embeddings."""
    e = sub.add_parser("eval", help="retrieval metrics of a checkpoint on a split")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder or its model.pt")
    src.add_argument(
        "--embeddings",
        metavar="EMB.npz",
        help="evaluate exported embeddings instead (recall, --folds, --eccv, --report-dir)",
    )
    e.add_argument("--split", choices=["train", "val", "test"], help="default val (test with --eccv)")
    e.add_argument("--config", help="use this config instead of the one stored in the checkpoint")
    e.add_argument("--set", action="append", default=[], metavar="a.b=value")
    e.add_argument("--folds", type=int, metavar="N", help="also average over N image folds (COCO 1K: 5)")
    e.add_argument(
        "--eccv",
        action="store_true",
        help="ECCV Caption / CxC / COCO 1K+5K metrics (COCO 5K test split by COCO id; eccv-caption)",
    )
    e.add_argument("--eccv-k", type=int, default=100, metavar="K", help="ranked list length for --eccv (>= 50)")
    e.add_argument("--graded", action="store_true", help="NDCG@10/25/all and Kendall's tau on graded relevance")
    e.add_argument(
        "--relevance",
        choices=["auto", "exact", "teacher"],
        default="auto",
        help="--graded relevance: the data's exact one, or the text teacher's caption similarity",
    )
    e.add_argument("--relevance-agg", choices=["max", "mean"], help="default: eval.relevance_aggregation")
    e.add_argument(
        "--kendall-candidates",
        type=int,
        metavar="N",
        help="Kendall's tau over N random candidates per direction (a fast estimate on big galleries)",
    )
    e.add_argument("--image-folder", metavar="DIR|LIST", help="image->image R@1 (class = subfolder, or a list file)")
    e.add_argument("--sts", metavar="PAIRS.tsv", help="STS Spearman on sentence pairs with gold scores")
    e.add_argument("--report-dir", metavar="DIR", help="write recall curves, t-SNE, case study and metrics.json")
    e.add_argument("--export-embeddings", metavar="OUT.npz")
    e.add_argument("--json", metavar="OUT.json", help="write the metrics JSON here instead of stdout")
    e.set_defaults(func=cmd_eval)
