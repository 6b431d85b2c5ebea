"""The ``itr`` command line. Bad input exits 2 with one line naming the file and field (``--debug``: traceback).

One module per command group builds its subcommands and runs them: ``training`` (train, teachers, prepare),
``data_tools`` (convert-features, write-shards), ``evaluate`` (eval), ``search`` (sweep, reproduce), ``ui`` (ui).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from orchestrator.cli.common import Subparsers, format_table, metrics_table
from orchestrator.cli.data_tools import add_data_commands, cmd_convert_features, cmd_write_shards
from orchestrator.cli.evaluate import add_eval_command, cmd_eval
from orchestrator.cli.search import add_search_commands, cmd_reproduce, cmd_sweep, dashboard_hint
from orchestrator.cli.training import add_training_commands, cmd_prepare, cmd_teachers, cmd_train
from orchestrator.cli.ui import add_ui_command, cmd_ui
from orchestrator.errors import UserError
from orchestrator.ui_server import ui_command  # the argv ``itr ui`` runs (re-exported for tests)

__all__ = [
    "Subparsers",
    "build_parser",
    "cmd_convert_features",
    "cmd_eval",
    "cmd_prepare",
    "cmd_reproduce",
    "cmd_sweep",
    "cmd_teachers",
    "cmd_train",
    "cmd_ui",
    "cmd_write_shards",
    "dashboard_hint",
    "format_table",
    "main",
    "metrics_table",
    "ui_command",
]

log = logging.getLogger("orchestrator")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("orchestrator").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itr", description="Image–text retrieval experiment orchestrator.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_data_commands(sub)
    add_eval_command(sub)
    add_search_commands(sub)
    add_ui_command(sub)
    return p


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
