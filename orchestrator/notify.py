"""Alerts for reproductions: ``itr reproduce`` tells apprise URLs of a regression, and of the recovery after one.

Where the URLs come from (all of them are told, each once): the recipe's ``notify: [URL, ...]``, ``itr reproduce
--notify URL`` (repeatable) and ``$ITR_NOTIFY_URLS`` (whitespace separated: what the Kubernetes deployment sets
from a Secret). A URL is an apprise URL (``json://host:port/path`` and ``jsons://`` for a generic JSON webhook,
``slack://...``, ``mailto://...``, ...). Each is checked before anything runs: one that apprise cannot use is bad
input (exit 2, the message naming where it came from and its scheme only).

When: one message per reproduction, sent when any enforced metric REGRESSED (every night it stays regressed, and
when a run crashed), or when a metric passes whose previous verdict for the same recipe, run and metric was a
regression (RECOVERED). A pass that follows a pass (or a first pass) sends nothing. The message names the recipe,
and per metric the reference, the measured value, the band (reference and tolerance, with the interval over seeds
where the verdict gives one) and the MLflow run (id, and its address on a tracking server).

The previous verdict: with tracking, from MLflow: the newest earlier run of the recipe and run (tags
``repro/recipe``, ``repro/run``) that holds a verdict (``repro/status``; per metric ``repro/result/<metric>``), or
that ended FAILED without one (a crashed reproduction: every metric regressed). Without tracking, from the state
file ``reproduce-verdicts.json`` in the run's ``train.output_dir``, written by every reproduction that notifies.
A metric without a previous verdict counts as having passed.

Secrets: a URL holds tokens. It is never logged, printed, put in an error message or recorded in MLflow: only its
scheme is (``json://``, ``slack://``); apprise's own log lines, which name URLs, are muted while it works. A message
that cannot be delivered logs one WARNING naming the scheme; the verdict and its exit code stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.errors import UserError
from orchestrator.recipe import TAG_RECIPE, TAG_RUN, TAG_STATUS, Recipe, RecipeRun
from orchestrator.reproduce import FAIL, PASS, STATUS_PASS, STATUS_REGRESSED, Report, Row, RunOutcome

log = logging.getLogger(__name__)

#: the environment variable with notify URLs, whitespace separated
ENV_VAR = "ITR_NOTIFY_URLS"
#: the state file (in ``train.output_dir``) holding the last verdicts when tracking is disabled
VERDICTS_FILE = "reproduce-verdicts.json"
#: how many of the newest runs of a recipe run are searched for a crashed reproduction
CRASH_WINDOW = 50
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^\s/@]+@")
_MUTED = ("apprise", "urllib3")  # their log lines name the URL (path, host, query) they send to


@dataclass(frozen=True)
class Destination:
    """One apprise URL (a secret: left out of ``repr``) and where it came from (``origin``, for messages)."""

    url: str = field(repr=False)
    origin: str

    @property
    def scheme(self) -> str:
        return scheme_of(self.url)


@dataclass
class Change:
    """A metric whose verdict is told: ``kind`` is ``"regressed"`` or ``"recovered"``."""

    row: Row
    kind: str


def scheme_of(url: str) -> str:
    """The scheme of ``url`` (lower case), ``"?"`` when it has none: the only part of a URL ever shown."""
    match = _SCHEME.match(url.strip())
    return match.group(1).lower() if match else "?"


@contextlib.contextmanager
def _muted() -> Iterator[None]:
    """Silence apprise's and urllib3's loggers, their modules' too (their lines name URLs), for the duration."""
    names = [n for n in logging.root.manager.loggerDict if n in _MUTED or n.startswith(tuple(f"{m}." for m in _MUTED))]
    loggers = [logging.getLogger(name) for name in {*_MUTED, *names}]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def url_problem(url: str) -> str | None:
    """Why apprise cannot send to ``url`` (naming its scheme only, never the rest), or None when it can."""
    if not _SCHEME.match(url.strip()):
        return "not a URL of the form scheme://... (an apprise URL: json://host:port/path, slack://..., mailto://...)"
    import apprise

    with _muted():
        plugin = apprise.Apprise.instantiate(url.strip(), suppress_exceptions=True)
    if plugin is None:
        return f"apprise cannot use this {scheme_of(url)}:// URL (an unknown scheme, or a malformed URL)"
    return None


def env_urls(environ: Mapping[str, str] | None = None) -> list[str]:
    """The URLs of ``$ITR_NOTIFY_URLS`` (whitespace separated), in order."""
    return (os.environ if environ is None else environ).get(ENV_VAR, "").split()


def destinations(recipe: Recipe, extra: Sequence[str] = ()) -> list[Destination]:
    """The recipe's ``notify`` URLs then ``extra`` (``--notify``, ``$ITR_NOTIFY_URLS``), each once, all checked:
    an unusable one is a ``UserError`` naming its origin and scheme."""
    found = [Destination(u, f"{recipe.path.name} notify #{i}") for i, u in enumerate(recipe.spec.notify, 1)]
    found += [Destination(u, f"--notify/${ENV_VAR} URL #{i}") for i, u in enumerate(extra, 1)]
    out: list[Destination] = []
    for dest in found:
        problem = url_problem(dest.url)
        if problem:
            raise UserError(f"{dest.origin}: {problem}")
        if dest.url.strip() not in {d.url for d in out}:
            out.append(Destination(dest.url.strip(), dest.origin))
    return out


def describe(dests: Sequence[Destination]) -> str:
    """``json:// (recipe.yaml notify #1), slack:// (...)``: what may be shown of the destinations."""
    return ", ".join(f"{d.scheme}:// ({d.origin})" for d in dests)


# ---------------------------------------------------------------------------------- the previous verdict
def state_path(run: RecipeRun) -> Path | None:
    """The state file of a run without tracking, ``<train.output_dir>/reproduce-verdicts.json``; None for an
    ``output_dir`` in object storage (``s3://...``: no state kept, so no recovery is told)."""
    cfg = run.space.base_config if run.space is not None else run.config
    assert cfg is not None  # a RecipeRun holds exactly one of config / space
    if "://" in str(cfg.train.output_dir):
        return None
    return Path(cfg.train.output_dir).expanduser() / VERDICTS_FILE


def _read_state(path: Path | None) -> dict[str, Any]:
    """The state file's tree; empty when there is none or it is not a JSON object (it is then rewritten)."""
    if path is None:
        return {}
    try:
        tree = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return tree if isinstance(tree, dict) else {}


def _mlflow_previous(target: tracking.TrackingTarget, recipe: str, run: str, exclude: set[str]) -> dict[str, str]:
    """metric -> previous result (``pass`` | ``fail`` | ``info``) of the newest earlier verdict in MLflow; every
    metric ``fail`` (key ``*``) when the newest earlier reproduction crashed."""
    keys = {TAG_RECIPE: recipe, TAG_RUN: run}
    candidates = []
    for status in (STATUS_PASS, STATUS_REGRESSED):
        candidates += tracking.find_runs(target, {**keys, TAG_STATUS: status}, max_results=len(exclude) + 1)
    candidates += [
        r
        for r in tracking.find_runs(target, keys, max_results=CRASH_WINDOW)
        if r.info.status == "FAILED" and TAG_STATUS not in r.data.tags and "mlflow.parentRunId" not in r.data.tags
    ]
    candidates = [r for r in candidates if r.info.run_id not in exclude]
    if not candidates:
        return {}
    newest = max(candidates, key=lambda r: r.info.start_time)
    tags = newest.data.tags
    if TAG_STATUS not in tags:
        return {"*": "fail"}
    prefix = "repro/result/"
    return {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}


def previous_results(report: Report) -> dict[str, dict[str, str]]:
    """run -> metric -> its previous result, for the runs with a passing row (only a pass needs it)."""
    recipe = report.recipe
    exclude = {o.run_id for o in report.outcomes.values() if o.run_id}
    passing = {r.run for r in report.rows if r.result == PASS}
    out: dict[str, dict[str, str]] = {}
    for run in recipe.runs:
        if run.name not in passing:
            continue
        cfg = run.tracking_config
        try:
            if cfg.enabled:
                out[run.name] = _mlflow_previous(tracking.resolve_target(cfg), recipe.name, run.name, exclude)
            else:
                out[run.name] = dict(_read_state(state_path(run)).get(recipe.name, {}).get(run.name, {}))
        except Exception as err:  # noqa: BLE001 - a store that does not answer must not end the reproduction
            log.warning(
                "notify: the previous verdict of %s is unknown (%s); a pass is not told as a recovery",
                run.name,
                err.__class__.__name__,
            )
            out[run.name] = {}
    return out


def record_state(report: Report) -> None:
    """Write this verdict into the state file of every run without tracking (atomically: temp file, rename)."""
    for run in report.recipe.runs:
        if run.tracking_config.enabled or run.name not in report.outcomes:
            continue
        path = state_path(run)
        if path is None:
            continue
        tree = _read_state(path)
        results = {r.metric: r.result.lower() for r in report.rows if r.run == run.name}
        tree.setdefault(report.recipe.name, {})[run.name] = results
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(tree, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)


def changes(report: Report, previous: dict[str, dict[str, str]]) -> list[Change]:
    """The rows to tell: every regression, and every pass whose previous result was a regression."""
    out = []
    for row in report.rows:
        if row.result == FAIL:
            out.append(Change(row, "regressed"))
        elif row.result == PASS:
            before = previous.get(row.run, {})
            if before.get(row.metric, before.get("*")) == FAIL.lower():
                out.append(Change(row, "recovered"))
    return out


# ------------------------------------------------------------------------------------------ the message
def _num(v: float | None) -> str:
    return "not measured" if v is None or not math.isfinite(v) else f"{v:.2f}"


def band(row: Row) -> str:
    """The accepted range: ``>= 81.00 (reference 89.00 - tolerance 8, higher is better)`` and the like."""
    ref, tol = row.reference, row.tolerance
    if ref is None:
        return "no reference value"
    if row.direction == "higher":
        text = f">= {ref - tol:.2f} (reference {ref:.2f} - tolerance {tol:g}, higher is better)"
    elif row.direction == "lower":
        text = f"<= {ref + tol:.2f} (reference {ref:.2f} + tolerance {tol:g}, lower is better)"
    else:
        text = f"{ref - tol:.2f} .. {ref + tol:.2f} (reference {ref:.2f} +- tolerance {tol:g})"
    if row.interval is not None:
        text += f"; 95% interval of the seed mean [{row.interval[0]:.2f}, {row.interval[1]:.2f}]"
    return text


def scrub(text: str) -> str:
    """``text`` with the user and password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def run_link(outcome: RunOutcome | None) -> str:
    """``MLflow run <id> (<server>/#/experiments/<e>/runs/<id>)``, or where the run is for a local store."""
    if outcome is None or outcome.run_id is None or outcome.target is None:
        return "no MLflow run"
    uri = scrub(outcome.target.uri)
    if not uri.startswith(("http://", "https://")):
        return f"MLflow run {outcome.run_id} in {uri}"
    try:
        experiment = tracking.ensure_experiment(outcome.target)
    except Exception:  # noqa: BLE001 - the link is a convenience; the id is in the message anyway
        return f"MLflow run {outcome.run_id} on {uri}"
    return f"MLflow run {outcome.run_id} ({uri.rstrip('/')}/#/experiments/{experiment}/runs/{outcome.run_id})"


def compose(report: Report, told: list[Change]) -> tuple[str, str, str]:
    """(title, body, kind) of the message; kind ``failure`` when something regressed, else ``success``."""
    regressed = [c for c in told if c.kind == "regressed"]
    recovered = [c for c in told if c.kind == "recovered"]
    crashed = {n: o for n, o in report.outcomes.items() if o.error}
    parts = []
    if regressed or crashed:
        parts.append(f"REGRESSED ({len(regressed)} metric(s))")
    if recovered:
        parts.append(f"RECOVERED ({len(recovered)} metric(s))")
    recipe = report.recipe
    title = f"itr reproduce {recipe.name}: " + ", ".join(parts)
    lines = [f"recipe {recipe.name} ({recipe.path.name}), compared with the {report.against} reference"]
    for change in regressed + recovered:
        row = change.row
        delta = "" if row.delta is None else f" (delta {row.delta:+.2f})"
        lines.append(
            f"{change.kind.upper()} {row.run} {row.metric}: measured {_num(row.measured)}{delta}, "
            f"reference {_num(row.reference)} ({row.source}), band {band(row)}; "
            f"{run_link(report.outcomes.get(row.run))}"
        )
    for name, outcome in crashed.items():
        lines.append(f"run {name} FAILED: {outcome.error}")
    return scrub(title), scrub("\n".join(lines)), "failure" if regressed or crashed else "success"


# ------------------------------------------------------------------------------------------------ sending
def send(dests: Sequence[Destination], title: str, body: str, kind: str) -> int:
    """Send one message to each destination; how many took it. A failure logs one WARNING naming the scheme."""
    import apprise

    delivered = 0
    for dest in dests:
        try:
            with _muted():
                sender = apprise.Apprise()
                ok = sender.add(dest.url) and bool(
                    sender.notify(body=body, title=title, notify_type=kind, body_format=apprise.NotifyFormat.TEXT)
                )
        except Exception:  # noqa: BLE001 - a plugin's error must not end the reproduction (nor show the URL)
            ok = False
        if ok:
            delivered += 1
        else:
            log.warning("notify: %s:// (%s) did not take the message; the verdict stands", dest.scheme, dest.origin)
    return delivered


def notify_report(report: Report, dests: Sequence[Destination]) -> int:
    """Tell ``dests`` of this reproduction's regressions and recoveries (nothing when there are none); record the
    verdict in the state file of runs without tracking. Never raises (but Ctrl-C); returns how many took it."""
    if not dests:
        return 0
    t0 = time.perf_counter()
    try:
        told = changes(report, previous_results(report))
        delivered = 0
        if told or any(o.error for o in report.outcomes.values()):
            title, body, kind = compose(report, told)
            delivered = send(dests, title, body, kind)
            took = time.perf_counter() - t0
            log.info("notify: %s sent to %d of %d destination(s) (%.1f s)", title, delivered, len(dests), took)
    except Exception as err:  # noqa: BLE001 - telling is best effort: the verdict is what counts
        log.warning("notify: no message sent (%s); the verdict stands", err.__class__.__name__)
        return 0
    try:
        record_state(report)
    except Exception as err:  # noqa: BLE001 - a read-only output folder must not end the reproduction
        log.warning("notify: the verdict was not kept in %s (%s: %s)", VERDICTS_FILE, err.__class__.__name__, err)
    return delivered
