"""``itr table``: a sweep's settings as Markdown / LaTeX (booktabs) / CSV, read from a real MLflow store holding a
sweep's parent and child runs (2 settings x 3 seeds), with values checked against numpy on the logged metrics."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from orchestrator import leaderboard, tracking
from orchestrator.config import TrackingConfig
from orchestrator.sweep.settings_table import setting_rows
from tests.test_bad_input import run_cli

FAMILIES, SEEDS, EPOCHS = ("infonce", "cusa"), (0, 1, 2), 3


@pytest.fixture
def sweep_store(tmp_path, monkeypatch):
    """A sweep's runs as the sweep tracker records them: per trial, val/rsum and val/i2t_medr at epochs 0..2."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    target = tracking.resolve_target(TrackingConfig(), base_dir=tmp_path)
    parent = tracking.create_run(target, "sweep", {"itr.sweep": "t"}, {"sweep.metric": "val/rsum"})
    rng = np.random.default_rng(7)
    logged: dict[tuple[str, int], dict[str, list[float]]] = {}
    for fam in FAMILIES:
        for seed in SEEDS:
            tags = {
                "mlflow.parentRunId": parent,
                "itr.trial_id": f"{fam}-{seed}",
                "itr.varied": json.dumps({"loss.family": fam, "train.seed": seed}),
            }
            run = tracking.create_run(target, f"{fam}-{seed}", tags, {})
            rsum = list(rng.uniform(50, 90, EPOCHS) + (20 if fam == "cusa" else 0))
            medr = list(rng.uniform(2, 9, EPOCHS))
            for epoch in range(EPOCHS):
                tracking.log_metrics(target, run, {"val/rsum": rsum[epoch], "val/i2t_medr": medr[epoch]}, epoch)
            tracking.end_run(target, run)
            logged[(fam, seed)] = {"val/rsum": rsum, "val/i2t_medr": medr}
    return tmp_path, target, parent, logged


def _expected(logged, metric: str, pick) -> dict[str, tuple[float, float]]:
    out = {}
    for fam in FAMILIES:
        values = np.asarray([pick(logged[(fam, s)], metric) for s in SEEDS], dtype=np.float64)
        out[fam] = (float(values.mean()), float(values.std(ddof=1)))
    return out


def final(curves, metric):
    return curves[metric][-1]


def test_markdown_holds_mean_std_per_setting_best_in_bold_and_the_seeds_footnote(sweep_store):
    tmp_path, _, parent, logged = sweep_store
    rc, lines, out = run_cli(["table", parent, "--metrics", "val/rsum", "val/i2t_medr"], tmp_path)
    assert rc == 0, lines
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| loss.family | val/rsum | val/i2t_medr |"
    assert re.fullmatch(r"\|( -+ \|)( -+: \|){2}", table[1].replace("|---", "| ---"))
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert set(rows) == set(FAMILIES)
    for col, metric in enumerate(("val/rsum", "val/i2t_medr")):
        want = _expected(logged, metric, final)
        best = (max if metric == "val/rsum" else min)(FAMILIES, key=lambda f: want[f][0])
        for fam in FAMILIES:
            cell = f"{want[fam][0]:.2f} ± {want[fam][1]:.2f}"
            assert rows[fam][col] == (f"**{cell}**" if fam == best else cell)
    assert "mean ± std over n = 3 seeds per setting." in out


def test_latex_is_a_booktabs_tabular_with_one_bold_cell_per_column(sweep_store):
    tmp_path, _, parent, logged = sweep_store
    rc, lines, out = run_cli(["table", parent, "--metrics", "val/rsum", "val/i2t_medr", "--format", "latex"], tmp_path)
    assert rc == 0, lines
    body = out.splitlines()
    assert body[0] == "\\begin{tabular}{lrr}" and body[1] == "\\toprule"
    assert body[2] == "loss.family & val/rsum & val/i2t\\_medr \\\\" and body[3] == "\\midrule"
    assert body[6] == "\\bottomrule" and body[7] == "\\end{tabular}"
    data = [row.removesuffix(" \\\\").split(" & ") for row in body[4:6]]
    assert out.count("\\textbf{") == 2 and all(len(r) == 3 for r in data)
    want = _expected(logged, "val/rsum", final)
    for fam, rsum, _ in data:
        assert rsum.replace("\\textbf{", "").rstrip("}") == f"{want[fam][0]:.2f} $\\pm$ {want[fam][1]:.2f}"


def test_csv_and_the_best_view_equal_numpy_and_the_leaderboard(sweep_store):
    tmp_path, target, parent, logged = sweep_store
    rc, lines, out = run_cli(["table", parent, "--metrics", "val/rsum", "--format", "csv"], tmp_path)
    assert rc == 0, lines
    rows = {r["loss.family"]: r for r in csv.DictReader(io.StringIO(out))}
    want = _expected(logged, "val/rsum", final)
    board = setting_rows(
        leaderboard.records_from_mlflow(target, parent, "val/rsum"), ["loss.family", "train.seed"], "val/rsum", "max"
    )
    for fam in FAMILIES:
        assert float(rows[fam]["val/rsum mean"]) == pytest.approx(want[fam][0], rel=1e-12)
        assert float(rows[fam]["val/rsum std"]) == pytest.approx(want[fam][1], rel=1e-12)
        assert rows[fam]["val/rsum n"] == "3"
        (mine,) = [r for r in board if r["loss.family"] == fam]
        assert float(rows[fam]["val/rsum mean"]) == pytest.approx(mine["final val/rsum mean"], rel=1e-12)

    def at_best(curves, metric):  # the epoch where val/rsum was best
        return curves[metric][int(np.argmax(curves["val/rsum"]))]

    rc, _, out = run_cli(["table", parent, "--metrics", "val/i2t_medr", "--format", "csv", "--view", "best"], tmp_path)
    rows = {r["loss.family"]: r for r in csv.DictReader(io.StringIO(out))}
    want = _expected(logged, "val/i2t_medr", at_best)
    assert rc == 0 and all(float(rows[f]["val/i2t_medr mean"]) == pytest.approx(want[f][0]) for f in FAMILIES)


def test_a_source_that_is_neither_a_sweep_folder_nor_a_run_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.ensure_experiment(tracking.resolve_target(TrackingConfig(), base_dir=tmp_path))  # the store exists
    (tmp_path / "empty").mkdir()
    rc, lines, _ = run_cli(["table", "nope"], tmp_path)
    assert rc == 2 and len(lines) == 1 and "'nope' is neither a sweep folder nor a run" in lines[0]
    rc, lines, _ = run_cli(["table", str(tmp_path / "empty")], tmp_path)
    assert rc == 2 and len(lines) == 1 and "not a sweep folder" in lines[0]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian: texlive-latex-extra)")
def test_the_latex_table_compiles_with_booktabs(sweep_store):
    tmp_path, _, parent, _ = sweep_store
    rc, lines, out = run_cli(["table", parent, "--metrics", "val/rsum", "val/i2t_medr", "--format", "latex"], tmp_path)
    assert rc == 0, lines
    doc = tmp_path / "table.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + out + "\\end{document}\n")
    done = subprocess.run(
        ["pdflatex", "-halt-on-error", "-interaction=nonstopmode", doc.name], cwd=tmp_path, capture_output=True
    )
    assert done.returncode == 0, done.stdout[-2000:]
