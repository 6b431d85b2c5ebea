"""``itr reproduce --notify``: apprise tells a real webhook (an HTTP server on 127.0.0.1 started here, apprise's
``json://`` scheme) of a regression and of the recovery after one, never of a pass after a pass; a URL that cannot
take the message logs one WARNING naming its scheme and the exit code stays the verdict's; URLs (secrets) never
reach a log, the output or MLflow.

The end-to-end runs reproduce ``recipes/synthetic_tiny.yaml`` in-process against a local MLflow server (so the
message carries the run's address), its training cut to 2 steps and its reference table replaced: an impossible
val/rsum (above the 600 an RSUM can reach) for the regression, a val/rsum of 0 for the passes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.notify import VERDICTS_FILE, Destination, band, notify_report, send, url_problem
from orchestrator.recipe import load_recipe
from orchestrator.reproduce import Report, Row, RunOutcome, compare
from tests.mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC = REPO / "recipes" / "synthetic_tiny.yaml"
TOKEN = "tok-7f3a9c2e41"  # the secret part of every URL: must never show up anywhere but the webhook's path
DEAD_TOKEN = "tok-dead-5b8e10"
SHORT = [  # the shipped run, cut to 2 training steps on 64 images: seconds instead of minutes
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.warmup_steps=1",
    "data.synthetic.num_train_images=64",
    "data.synthetic.num_val_images=16",
    "data.synthetic.num_test_images=16",
]
IMPOSSIBLE = {"val/rsum": {"value": 1000.0, "tolerance": 0.0, "source": "impossible: an RSUM is at most 600"}}
ANY = {"val/rsum": {"value": 0.0, "tolerance": 0.0, "source": "every RSUM is at least 0"}}


class Webhook:
    """A JSON webhook on 127.0.0.1: every POST's (path, decoded JSON body) lands in ``received``."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, token: str = TOKEN) -> str:
        return f"json://127.0.0.1:{self.port}/hook/{token}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def recipe_with(tmp_path: Path, reference: dict, name: str) -> Path:
    """The shipped synthetic recipe (same name, same run and config) with ``reference`` as its table."""
    doc = yaml.safe_load(SYNTHETIC.read_text())
    doc["runs"]["tiny-infonce"]["reference"] = reference
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Three reproductions into one MLflow server, told to a live webhook (``--notify``) and a dead one
    (``$ITR_NOTIFY_URLS``): regressed, then passed, then passed. Yields (server, webhook, [night])."""
    root = tmp_path_factory.mktemp("nights")
    hook = Webhook()
    dead = f"json://127.0.0.1:{free_port()}/hook/{DEAD_TOKEN}"
    handler = Records()
    logging.getLogger().addHandler(handler)
    saved = os.environ.get("ITR_NOTIFY_URLS")
    os.environ["ITR_NOTIFY_URLS"] = f"  {dead}\n"
    nights = []
    try:
        with mlflow_server(root / "server") as server:
            sets = [f"train.output_dir={root / 'runs'}", f"tracking.uri={server.uri}", *SHORT]
            for i, table in enumerate([IMPOSSIBLE, ANY, ANY]):
                recipe = recipe_with(root, table, f"night{i}.yaml")
                out, err = io.StringIO(), io.StringIO()
                before, first = len(hook.received), len(handler.records)
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    argv = ["reproduce", str(recipe), "--notify", hook.url(), *[a for s in sets for a in ("--set", s)]]
                    code = main(argv)
                nights.append(
                    {
                        "code": code,
                        "stdout": out.getvalue(),
                        "stderr": err.getvalue(),
                        "posts": hook.received[before:],
                        "records": handler.records[first:],
                    }
                )
            yield server, hook, nights
    finally:
        hook.close()
        logging.getLogger().removeHandler(handler)
        if saved is None:
            os.environ.pop("ITR_NOTIFY_URLS", None)
        else:
            os.environ["ITR_NOTIFY_URLS"] = saved


def mlflow_runs(server):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=server.uri)
    exp = c.get_experiment_by_name("itr-reproduce")
    return c, exp, c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_regression_posts_one_message_with_its_fields(nights):
    server, _, [night, _, _] = nights
    assert night["code"] == 1, night["stdout"] + night["stderr"]
    assert "REGRESSED: tiny-infonce val/rsum" in night["stdout"]
    ((path, payload),) = night["posts"]
    assert path == f"/hook/{TOKEN}"
    c, exp, runs = mlflow_runs(server)
    run = runs[0]
    assert run.data.tags["repro/status"] == "regressed"
    measured = run.data.metrics["val/rsum"]
    assert payload["type"] == "failure"
    assert payload["title"] == "itr reproduce synthetic-tiny: REGRESSED (1 metric(s))"
    text = payload["message"]
    assert f"REGRESSED tiny-infonce val/rsum: measured {measured:.2f} (delta {measured - 1000.0:+.2f})" in text
    assert "reference 1000.00 (impossible: an RSUM is at most 600)" in text
    assert "band >= 1000.00 (reference 1000.00 - tolerance 0, higher is better)" in text
    assert f"MLflow run {run.info.run_id} ({server.uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id})" in (
        text
    )


def test_a_pass_after_the_regression_posts_the_recovery(nights):
    server, _, [_, night, _] = nights
    assert night["code"] == 0, night["stdout"] + night["stderr"]
    ((path, payload),) = night["posts"]
    assert path == f"/hook/{TOKEN}"
    _, exp, runs = mlflow_runs(server)
    run = runs[1]
    assert run.data.tags["repro/status"] == "pass"
    measured = run.data.metrics["val/rsum"]
    assert payload["type"] == "success"
    assert payload["title"] == "itr reproduce synthetic-tiny: RECOVERED (1 metric(s))"
    text = payload["message"]
    assert f"RECOVERED tiny-infonce val/rsum: measured {measured:.2f} (delta {measured:+.2f})" in text
    assert "reference 0.00 (every RSUM is at least 0)" in text and "band >= 0.00" in text
    assert f"{server.uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in text


def test_a_pass_after_a_pass_posts_nothing(nights):
    _, _, [_, _, night] = nights
    assert night["code"] == 0, night["stdout"] + night["stderr"]
    assert night["posts"] == []
    assert not [r for r in night["records"] if r.name == "orchestrator.notify" and r.levelno >= logging.WARNING]


def test_an_undeliverable_url_warns_once_by_scheme_and_keeps_the_exit_code(nights):
    _, _, [regressed, recovered, _] = nights
    for night, code in ((regressed, 1), (recovered, 0)):
        assert night["code"] == code
        warnings = [r for r in night["records"] if r.levelno >= logging.WARNING and r.name == "orchestrator.notify"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        message = warnings[0].getMessage()
        assert "json://" in message and "ITR_NOTIFY_URLS URL #2" in message and "127.0.0.1" not in message


def test_urls_never_reach_the_logs_the_output_or_mlflow(nights):
    server, hook, all_nights = nights
    for night in all_nights:
        texts = [night["stdout"], night["stderr"], *(r.getMessage() for r in night["records"])]
        for text in texts:
            assert TOKEN not in text and DEAD_TOKEN not in text and f":{hook.port}/" not in text
    _, _, runs = mlflow_runs(server)
    assert len(runs) == 3
    for run in runs:
        stored = json.dumps([run.data.params, run.data.tags])
        assert TOKEN not in stored and DEAD_TOKEN not in stored and "/hook/" not in stored


# ------------------------------------------------------------------------------------ without tracking
def verdict(recipe, value: float) -> Report:
    """The report ``reproduce`` builds when the run measured val/rsum = ``value`` (no training here)."""
    (run,) = recipe.runs
    rows = compare(recipe.references, {run.name: {"val/rsum": value}})
    return Report(recipe=recipe, rows=rows, outcomes={run.name: RunOutcome(run=run, metrics={"val/rsum": value})})


def test_without_tracking_the_state_file_holds_the_previous_verdict(tmp_path, webhook):
    path = recipe_with(tmp_path, {"val/rsum": {"value": 50.0, "tolerance": 5.0, "source": "s"}}, "r.yaml")
    recipe = load_recipe(path, ["tracking.enabled=false", f"train.output_dir={tmp_path / 'out'}"])
    dest = [Destination(webhook.url(), "test")]
    state = tmp_path / "out" / VERDICTS_FILE
    state.parent.mkdir()
    state.write_text("{not json")  # a damaged state file counts as none and is rewritten
    assert notify_report(verdict(recipe, 60.0), dest) == 0 and webhook.received == []  # a first pass: silent
    assert json.loads(state.read_text()) == {"synthetic-tiny": {"tiny-infonce": {"val/rsum": "pass"}}}
    assert notify_report(verdict(recipe, 44.9), dest) == 1  # 44.9 < 50 - 5
    assert [p["type"] for _, p in webhook.received] == ["failure"]
    assert "band >= 45.00" in webhook.received[0][1]["message"] and "no MLflow run" in webhook.received[0][1]["message"]
    assert json.loads(state.read_text())["synthetic-tiny"]["tiny-infonce"] == {"val/rsum": "fail"}
    assert notify_report(verdict(recipe, 45.0), dest) == 1  # the edge of the band passes: recovered
    assert (
        webhook.received[1][1]["type"] == "success"
        and "RECOVERED tiny-infonce val/rsum: measured 45.00" in (webhook.received[1][1]["message"])
    )
    assert notify_report(verdict(recipe, 70.0), dest) == 0 and len(webhook.received) == 2


def test_a_crashed_reproduction_in_mlflow_counts_as_a_regression(tmp_path, webhook):
    from orchestrator import tracking

    path = recipe_with(tmp_path, {"val/rsum": {"value": 50.0, "tolerance": 5.0, "source": "s"}}, "r.yaml")
    recipe = load_recipe(path, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    (run,) = recipe.runs
    target = tracking.resolve_target(run.tracking_config)
    keys = {"repro/recipe": "synthetic-tiny", "repro/run": "tiny-infonce"}
    passed = tracking.create_run(target, "old", {**keys, "repro/status": "pass", "repro/result/val/rsum": "pass"}, {})
    tracking.end_run(target, passed)
    dest = [Destination(webhook.url(), "test")]
    assert notify_report(verdict(recipe, 60.0), dest) == 0  # pass after pass
    crashed = tracking.create_run(target, "crashed", keys, {})  # what a run that crashed leaves: no verdict tags
    tracking.end_run(target, crashed, "FAILED", reason="RuntimeError: boom")
    trial = tracking.create_run(target, "trial", {**keys, "mlflow.parentRunId": passed}, {})
    tracking.end_run(target, trial, "FINISHED")  # a sweep's trial carries the tags too but is never a verdict
    assert notify_report(verdict(recipe, 60.0), dest) == 1
    assert "RECOVERED tiny-infonce val/rsum" in webhook.received[0][1]["message"]


# ----------------------------------------------------------------------------------------- the URLs
def test_url_problems_name_the_scheme_only():
    assert url_problem("json://127.0.0.1:8080/hook/x") is None
    assert url_problem("jsons://hooks.example.org/x") is None
    problem = url_problem(f"bogus://{TOKEN}")
    assert problem is not None and "bogus://" in problem and TOKEN not in problem
    assert "scheme://" in (url_problem(TOKEN) or "") and TOKEN not in (url_problem(TOKEN) or "")


def test_bad_urls_are_bad_input_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ITR_NOTIFY_URLS", raising=False)
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load(SYNTHETIC.read_text())
    doc["notify"] = ["json://127.0.0.1:1/ok", f"bogus://{TOKEN}"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.startswith("notify:"))
    assert main(["reproduce", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:{line}:notify: entry 2: apprise cannot use this bogus:// URL"), err
    assert TOKEN not in err
    assert main(["reproduce", str(SYNTHETIC), "--notify", f"slak://{TOKEN}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--notify/$ITR_NOTIFY_URLS URL #1" in err and "slak://" in err and TOKEN not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("ITR_NOTIFY_URLS", f"json://127.0.0.1:1/{TOKEN} jsons://example.org/{TOKEN}")
    assert main(["reproduce", str(SYNTHETIC), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "notify json:// (--notify/$ITR_NOTIFY_URLS URL #1), jsons:// (" in out and TOKEN not in out


def test_an_undeliverable_message_logs_one_warning_and_nothing_of_the_url(caplog):
    url = f"json://127.0.0.1:{free_port()}/hook/{TOKEN}"
    with caplog.at_level(logging.DEBUG):
        assert send([Destination(url, "--notify #1")], "title", "body", "failure") == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["orchestrator.notify"]
    assert "json://" in warnings[0].getMessage() and "--notify #1" in warnings[0].getMessage()
    assert not [r for r in caplog.records if TOKEN in r.getMessage() or "127.0.0.1" in r.getMessage()]
    assert TOKEN not in repr(Destination(url, "x"))


@pytest.mark.parametrize(
    "direction, interval, expected",
    [
        ("higher", None, ">= 87.50 (reference 90.00 - tolerance 2.5, higher is better)"),
        ("lower", None, "<= 92.50 (reference 90.00 + tolerance 2.5, lower is better)"),
        ("both", None, "87.50 .. 92.50 (reference 90.00 +- tolerance 2.5)"),
        (
            "higher",
            (84.25, 86.5),
            ">= 87.50 (reference 90.00 - tolerance 2.5, higher is better); 95% interval of "
            "the seed mean [84.25, 86.50]",
        ),
    ],
)
def test_the_band_names_reference_tolerance_and_interval(direction, interval, expected):
    row = Row("r", "val/rsum", 90.0, 85.0, 2.5, direction, "FAIL", "s", interval=interval)
    assert band(row) == expected
