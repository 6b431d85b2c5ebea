"""``itr sweep`` (a Ray Tune search), ``itr reproduce`` (a recipe against its reference table) and ``itr table``
(a sweep's settings as a paper table)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.common import Subparsers, format_table


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


def cmd_table(args: argparse.Namespace) -> int:
    from orchestrator.sweep import paper_table

    target, parent = paper_table.sweep_parent(args.sweep)
    trials = paper_table.trial_values(target, parent, args.metrics, args.view, args.by)
    sys.stdout.write(paper_table.render(trials, args.metrics, args.format))
    return 0


def add_search_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
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

    t = sub.add_parser("table", help="a sweep's settings as a paper table: mean ± std over seeds, best in bold")
    t.add_argument("sweep", help="a sweep folder (runs/sweeps/<name>) or its MLflow parent run id")
    t.add_argument("--metrics", nargs="+", default=["val/rsum"], metavar="METRIC", help="the columns (val/rsum ...)")
    t.add_argument("--format", choices=("markdown", "latex", "csv"), default="markdown")
    t.add_argument(
        "--view",
        choices=("final", "best"),
        default="final",
        help="each trial's final epoch, or the epoch where --by was best (optimistic when selected on val)",
    )
    t.add_argument("--by", default="val/rsum", metavar="METRIC", help="the metric --view best selects the epoch by")
    t.set_defaults(func=cmd_table)
