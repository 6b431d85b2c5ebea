"""``itr ui``: the MLflow dashboard."""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.cli.common import Subparsers
from orchestrator.ui_server import ui_command


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


def add_ui_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """``ui``: the MLflow dashboard."""
    u = sub.add_parser("ui", help="serve the MLflow dashboard over the project's tracking store")
    u.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)
