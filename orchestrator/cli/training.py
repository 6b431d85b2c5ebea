"""``itr train``, and the caches a training run reads: ``itr teachers`` and ``itr prepare``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from orchestrator.cli.common import Subparsers, format_table, metrics_table

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.run import run_experiment

    cfg = load_config(args.config, args.set)
    result = run_experiment(cfg, config_source=args.config)
    print(metrics_table(result.metrics, "val/") or "(no val metrics)")
    print(f"\nbest checkpoint: {result.best_checkpoint}")
    if result.run_id:
        print(f"MLflow run {result.run_id} in {result.tracking_uri}")
        print("open the dashboard with: itr ui   (serves on http://127.0.0.1:5000)")
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.run import prepare_teacher_features

    cfg = load_config(args.config, args.set)
    if cfg.teachers.image is None and cfg.teachers.text is None:
        from orchestrator.errors import UserError as _UE

        raise _UE("no teacher configured (set teachers.image and/or teachers.text)", path=args.config, field="teachers")
    if cfg.teachers.backend == "ray":
        from orchestrator.run import init_ray

        init_ray()
    found = prepare_teacher_features(cfg, roles=tuple(args.splits))
    rows = []
    for role, feats in found.items():
        for side, stats in feats.stats.items():
            rows.append(
                {
                    "split": role,
                    "teacher": side,
                    "items": stats.total,
                    "computed": stats.computed,
                    "reused": stats.reused,
                    "seconds": float(stats.seconds),
                    "features": str(feats.view_dirs.get(side, "")),
                }
            )
    print(format_table(rows, ["split", "teacher", "items", "computed", "reused", "seconds", "features"]))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Fill every cache a config reads, on this machine, before any training: teacher features, locked-tower
    outputs, the decoded-image cache. A rerun finds them all and computes nothing."""
    from orchestrator.config import load_config
    from orchestrator.data.image_cache import prepare_image_cache
    from orchestrator.models.tower_cache import prepare_tower_features
    from orchestrator.run import prepare_teacher_features

    cfg = load_config(args.config, args.set)
    roles = tuple(args.splits)
    rows: list[dict[str, object]] = []
    if cfg.teachers.image is not None or cfg.teachers.text is not None:
        if cfg.teachers.backend == "ray":
            from orchestrator.run import init_ray

            init_ray()
        for role, feats in prepare_teacher_features(cfg, roles=roles).items():
            for side, st in feats.stats.items():
                rows.append(
                    {
                        "split": role,
                        "cache": f"{side} teacher",
                        "items": st.total,
                        "computed": st.computed,
                        "reused": st.reused,
                        "seconds": float(st.seconds),
                        "where": str(feats.view_dirs.get(side, "")),
                    }
                )
    for role, towers in prepare_tower_features(cfg, roles=roles).items():
        for side, st in towers.stats.items():
            rows.append(
                {
                    "split": role,
                    "cache": f"locked {side} tower",
                    "items": st.total,
                    "computed": st.computed,
                    "reused": st.reused,
                    "seconds": float(st.seconds),
                    "where": str(st.view_dir),
                }
            )
    shard_row = _shard_count_row(cfg, roles)
    if shard_row is not None:
        rows.append(shard_row)
    for role, st in prepare_image_cache(cfg, roles=roles).items():
        rows.append(
            {
                "split": role,
                "cache": "decoded images",
                "items": st.images,
                "computed": st.computed,
                "reused": st.reused,
                "seconds": float(st.seconds),
                "where": str(st.store),
            }
        )
    if not rows:
        print("nothing to prepare: no teacher, no cached locked tower, and data.image_cache is not decoded")
        return 0
    print(format_table(rows, ["split", "cache", "items", "computed", "reused", "seconds", "where"]))
    return 0


def _shard_count_row(cfg: ExperimentConfig, roles: tuple[str, ...]) -> dict[str, object] | None:
    """The streamed train pairs' sample counts (``data.shards``, which DataConfig requires for the webdataset
    format), counted once into the shards' sizes file; None when training does not stream shards."""
    shard_spec = cfg.data.shards if cfg.data.resolved_format == "webdataset" else None
    if shard_spec is None or "train" not in roles or cfg.data.train_samples is not None:
        return None
    import time

    from orchestrator.data.shards import SIZES_FILE, open_shards, recorded_counts, shard_paths

    t0, paths = time.perf_counter(), shard_paths(shard_spec)
    known = len(recorded_counts(paths))  # the epoch length: shards without a recorded count are counted once
    shards = open_shards(cfg.data)
    return {
        "split": "train",
        "cache": "shard sample counts",
        "items": len(paths),
        "computed": len(paths) - known,
        "reused": known,
        "seconds": time.perf_counter() - t0,
        "where": str(paths[0].parent / SIZES_FILE) + f" ({shards.num_samples} samples)",
    }


def add_training_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """``train``, and the caches a training run reads: ``teachers`` and ``prepare``."""
    t = sub.add_parser("train", help="train one experiment (Ray Train) and record it in MLflow")
    t.add_argument("config", help="experiment YAML (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="a.b=value", help="override a config field")
    t.set_defaults(func=cmd_train)

    th = sub.add_parser("teachers", help="extract teacher features of every split into the content-addressed cache")
    th.add_argument("config", help="experiment YAML with teachers.image / teachers.text")
    th.add_argument("--set", action="append", default=[], metavar="a.b=value")
    th.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    th.set_defaults(func=cmd_teachers)

    pr = sub.add_parser(
        "prepare",
        help="fill every cache a config reads before training: teacher features, "
        "locked-tower outputs and the decoded-image cache (data.image_cache_dir)",
    )
    pr.add_argument("config", help="experiment YAML")
    pr.add_argument("--set", action="append", default=[], metavar="a.b=value")
    pr.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    pr.set_defaults(func=cmd_prepare)
