"""The ``itr`` command line. Bad input exits 2 with one line naming the file and field (``--debug``: traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from orchestrator.errors import UserError
from orchestrator.ui_server import ui_command  # the argv ``itr ui`` runs (re-exported for tests)

log = logging.getLogger("orchestrator")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("orchestrator").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A plain aligned text table (floats to 2 decimals)."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def metrics_table(metrics: dict[str, float], prefix: str = "") -> str:
    keys = [k for k in sorted(metrics) if k.startswith(prefix)]
    return format_table([{"metric": k, "value": float(metrics[k])} for k in keys], ["metric", "value"])


# ---------------------------------------------------------------------------------------------- train
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


# ------------------------------------------------------------------------------------------- teachers
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
    # streamed train pairs: data.shards, which DataConfig requires for the webdataset format
    shard_spec = cfg.data.shards if cfg.data.resolved_format == "webdataset" else None
    if shard_spec is not None and "train" in roles and cfg.data.train_samples is None:
        import time

        from orchestrator.data.shards import SIZES_FILE, open_shards, recorded_counts, shard_paths

        t0, paths = time.perf_counter(), shard_paths(shard_spec)
        known = len(recorded_counts(paths))  # the epoch length: shards without a recorded count are counted once
        shards = open_shards(cfg.data)
        rows.append(
            {
                "split": "train",
                "cache": "shard sample counts",
                "items": len(paths),
                "computed": len(paths) - known,
                "reused": known,
                "seconds": time.perf_counter() - t0,
                "where": str(paths[0].parent / SIZES_FILE) + f" ({shards.num_samples} samples)",
            }
        )
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


def cmd_convert_features(args: argparse.Namespace) -> int:
    """Convert a pickled ``.npy`` feature dict into an ``.npz (ids, features)`` without running code from it."""
    from orchestrator.teachers.feature_files import convert_features

    n, dim = convert_features(Path(args.input), Path(args.output))
    print(f"wrote {n} teacher features (D={dim}) to {args.output}; use it as teachers.image: file:{args.output}")
    return 0


def cmd_write_shards(args: argparse.Namespace) -> int:
    """Write a captions_json / karpathy split as webdataset tar shards (the layout ``data.format: webdataset``
    streams)."""
    from pydantic import ValidationError

    from orchestrator.config import DataConfig, format_validation_error
    from orchestrator.data.splits import SplitRole, load_split
    from orchestrator.data.write_shards import write_shards

    tree = {"root": args.root, "annotations": args.annotations, "clean_captions": False, "verify_images": "exists"}
    try:  # captions stored as written: the reader cleans them (data.clean_captions)
        data = DataConfig.model_validate(tree)
    except ValidationError as err:
        name, message = format_validation_error(err)
        raise UserError(message, field=f"--{name}") from None
    roles: dict[str, SplitRole] = {data.train_split: "train", data.val_split: "val", data.test_split: "test"}
    role = roles.get(args.split)
    if role is None:
        raise UserError(f"unknown split {args.split!r} (train, val or test)", field="--split")
    written = write_shards(
        load_split(data, role), Path(args.out), shard_size=args.shard_size, prefix=args.prefix, captions=args.captions
    )
    print(
        f"wrote {sum(written.counts)} samples in {len(written.paths)} shards; train on them with\n"
        f"  data.shards: {written.pattern}"
    )
    return 0


# ----------------------------------------------------------------------------------------------- eval
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


# ---------------------------------------------------------------------------------------------- sweep
def dashboard_hint(uri: str | None) -> str:
    """How to open the MLflow UI over ``uri`` (plain ``itr ui`` when it is this folder's default store)."""
    from orchestrator.config import TrackingConfig
    from orchestrator.tracking import resolve_target

    default = resolve_target(TrackingConfig()).uri
    command = "itr ui" if uri in (None, default) else f"itr ui --uri {uri}"
    return f"open the dashboard with: {command}   (serves on http://127.0.0.1:5000)"


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator import leaderboard
    from orchestrator.search_space import load_space
    from orchestrator.sweep import run_sweep

    space = load_space(args.space, args.set)
    if args.dry_run:
        print(
            f"sweep {args.name or space.name}: {space.num_trials} trial(s) of {', '.join(space.varied)}; "
            f"metric {space.metric} ({space.mode}); scheduler {space.spec.scheduler.type}; base "
            f"{space.base_source}"
        )
        return 0
    try:
        result = run_sweep(
            space, resume=args.resume, name=args.name, verbose=1 if args.verbose else 0, progress=not args.quiet
        )
    except KeyboardInterrupt:
        print(
            f"\nsweep interrupted; continue it with: itr sweep {args.space} --resume"
            + (f" --name {args.name}" if args.name else ""),
            file=sys.stderr,
        )
        raise
    print()
    print(
        f"sweep {result.name}: {len(result.records)} trial(s), metric {space.metric} ({space.mode}), "
        f"{result.wall_s:.0f} s" + (" (resumed)" if result.resumed else "")
    )
    if result.table:
        from orchestrator.sweep.tracker import leaderboard_text

        print(leaderboard_text(result.table, result.settings, result.paired))
    else:
        print("(no leaderboard: tracking is disabled)")
    print(f"\nsweep folder: {result.path}")
    if result.parent_run_id:
        print(
            f"MLflow parent run {result.parent_run_id} in {result.tracking_uri} "
            f"(leaderboard.csv and plots/ are its artifacts)"
        )
        print(dashboard_hint(result.tracking_uri))
    finished = sum(1 for r in result.records if r.status in (leaderboard.STATUS_FINISHED, leaderboard.STATUS_STOPPED))
    return 0 if finished or not result.records else 1


# ------------------------------------------------------------------------------------------ reproduce
def cmd_reproduce(args: argparse.Namespace) -> int:
    """Exit 0 when every metric is within tolerance of its reference, 1 on a regression (or a crashed run)."""
    from orchestrator.notify import describe, destinations, env_urls
    from orchestrator.recipe import load_recipe
    from orchestrator.reproduce import REPORT_COLUMNS, report_rows, reproduce

    recipe = load_recipe(args.recipe, args.set, args.input, args.run)
    notify = [*args.notify, *env_urls()]
    sinks = destinations(recipe, notify)  # an unusable URL: exit 2 before anything runs
    if args.dry_run:
        print(f"recipe {recipe.name}: runs {', '.join(f'{r.name} ({r.kind})' for r in recipe.runs)}")
        for name, value in recipe.inputs.items():
            print(f"  input {name} = {value}")
        if sinks:
            print(f"  notify {describe(sinks)}")
        rows = [
            {
                "run": r.run,
                "metric": r.metric,
                "reference": r.relative_to or r.value,
                "tolerance": r.tolerance,
                "direction": r.direction,
                "enforced": r.enforce,
                "source": r.source,
            }
            for r in recipe.references
        ]
        print(format_table(rows, ["run", "metric", "reference", "tolerance", "direction", "enforced", "source"]))
        return 0
    report = reproduce(recipe, against_last_pass=args.against_last_pass, notify=notify)
    print()
    print(f"recipe {recipe.name} ({recipe.path}), against {report.against}")
    print(format_table(report_rows(report.rows), REPORT_COLUMNS))
    for note in report.notes:
        print(f"note: {note}")
    for name, outcome in report.outcomes.items():
        where = f"MLflow run {outcome.run_id} in {outcome.target.uri}" if outcome.run_id and outcome.target else ""
        print(
            f"run {name}: {'FAILED: ' + outcome.error if outcome.error else 'finished'} "
            f"({outcome.wall_s:.0f} s) {where}".rstrip()
        )
    regressed = sorted({f"{r.run} {r.metric}" for r in report.regressed})
    if report.passed:
        print(f"PASS: {len(report.rows)} metric(s) within tolerance")
        return 0
    print("REGRESSED: " + (", ".join(regressed) or "a run failed"))
    return 1


# ------------------------------------------------------------------------------------------------- ui
def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI until it exits or ``itr ui`` gets SIGTERM/SIGINT (forwarded; the server is waited for)."""
    from orchestrator.config import TrackingConfig
    from orchestrator.preflight import check_tracking_uri
    from orchestrator.tracking import resolve_target
    from orchestrator.ui_server import check_port, serve

    check_port(args.port)
    target = resolve_target(TrackingConfig(uri=args.uri))
    check_tracking_uri(target.uri, field="--uri" if args.uri else "MLFLOW_TRACKING_URI")
    argv = ui_command(target.uri, args.host, args.port)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    print(f"MLflow UI for {target.uri} on http://{args.host}:{args.port} (Ctrl-C stops it)")
    sys.stdout.flush()
    return serve(argv, env)


# --------------------------------------------------------------------------------------------- parser
Subparsers = argparse._SubParsersAction  # what ``add_subparsers`` returns (argparse names it privately)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itr", description="Image–text retrieval experiment orchestrator.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_data_commands(sub)
    _add_eval_command(sub)
    _add_search_commands(sub)
    _add_ui_command(sub)
    return p


def _add_training_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
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


def _add_data_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """Data conversions: ``convert-features`` (teacher features) and ``write-shards`` (webdataset)."""
    cf = sub.add_parser(
        "convert-features",
        help="convert a pickled .npy dict {image_id: array} (CUSA's Unicom "
        "features) into an .npz (ids, features) for teachers.image: file:",
    )
    cf.add_argument(
        "input",
        metavar="IN.npy",
        help="the pickled dict; read with an unpickler that accepts only numpy arrays, dicts, lists, str and int",
    )
    cf.add_argument("output", metavar="OUT.npz", help="written atomically; must differ from IN")
    cf.set_defaults(func=cmd_convert_features)

    ws = sub.add_parser(
        "write-shards",
        help="write a captions_json / karpathy split as webdataset tar shards "
        "({key}.jpg + {key}.json) for data.format: webdataset",
    )
    ws.add_argument("--root", required=True, help="captions_json: the folder with <split>.json; karpathy: image root")
    ws.add_argument("--annotations", help="karpathy: dataset_coco.json / dataset_flickr30k.json")
    ws.add_argument("--split", default="train", help="the split to write (default train)")
    ws.add_argument("--out", required=True, help="the folder the shards (and sizes.json) go to")
    ws.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    ws.add_argument("--prefix", default="train", help="shard file names: <prefix>-000000.tar, ...")
    ws.add_argument("--captions", choices=["json", "txt"], default="json", help="{key}.json (default) or {key}.txt")
    ws.set_defaults(func=cmd_write_shards)


def _add_eval_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
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


def _add_search_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """``sweep`` (a Ray Tune search) and ``reproduce`` (a recipe against its reference table)."""
    w = sub.add_parser("sweep", help="run a Ray Tune search over a search space (search_spaces/*.yaml)")
    w.add_argument("space", help="search space YAML (see search_spaces/)")
    w.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep of this space (an error if there is none); "
        "rerunning without it also continues one that exists",
    )
    w.add_argument(
        "--name",
        help="sweep name (default: the space's name or file stem); names the folder <train.output_dir>/sweeps/<name>",
    )
    w.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="a.b=value",
        help="override a field of the base config (not a swept one)",
    )
    w.add_argument("--dry-run", action="store_true", help="validate the space and print the plan; run nothing")
    w.add_argument("--quiet", action="store_true", help="no per-epoch progress lines (itr -v sweep: Tune's tables too)")
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser(
        "reproduce",
        help="run a recipe (recipes/*.yaml) and compare it with its reference table; exit 1 on a regression",
    )
    r.add_argument("recipe", help="recipe YAML (see recipes/)")
    r.add_argument("--set", action="append", default=[], metavar="a.b=value", help="override a field of every run")
    r.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="supply one of the recipe's inputs (data, weights); default: its env variable",
    )
    r.add_argument("--run", action="append", default=[], metavar="NAME", help="run only this run of the recipe")
    r.add_argument(
        "--against-last-pass",
        action="store_true",
        help="compare with the last passing reproduction of this recipe in MLflow instead of the paper",
    )
    r.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="URL",
        help="an apprise URL (json://host:port/path, slack://..., mailto://...) told of a regression and of the "
        "recovery after one; also the URLs of $ITR_NOTIFY_URLS and the recipe's notify",
    )
    r.add_argument("--dry-run", action="store_true", help="validate the recipe and its inputs; run nothing")
    r.set_defaults(func=cmd_reproduce)


def _add_ui_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """``ui``: the MLflow dashboard."""
    u = sub.add_parser("ui", help="serve the MLflow dashboard over the project's tracking store")
    u.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)


def _user_error_in_chain(err: BaseException) -> UserError | None:
    from orchestrator.errors import find_in_chain

    return find_in_chain(err, UserError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from orchestrator.interrupts import SIGTERM_EXIT_CODE, Terminated, interruption_in, sigterm_as_interrupt

    def interrupted(err: KeyboardInterrupt) -> int:
        terminated = isinstance(err, Terminated)
        print("terminated (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
        return SIGTERM_EXIT_CODE if terminated else 130

    try:
        with sigterm_as_interrupt():  # SIGTERM ends a run as Ctrl-C does (MLflow run KILLED), then exit 143
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        return interrupted(interruption_in(err) or err)
    except Exception as err:
        interruption = interruption_in(err)  # a library's error raised while an interruption unwound it
        if interruption is not None and not args.debug:
            return interrupted(interruption)
        user = _user_error_in_chain(err)
        if args.debug:
            raise
        if user is not None:
            print(f"error: {user}", file=sys.stderr)
            return UserError.exit_code
        print(f"error: {err.__class__.__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
