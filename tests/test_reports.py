"""Report artifacts: logged to MLflow at the end of a run, written by ``itr eval --report-dir`` with every metric."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import ndcg_score

from orchestrator.cli import main
from orchestrator.config import validate_config
from orchestrator.data.splits import load_split
from orchestrator.evaluation import reports
from tests.conftest import tiny_tree

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPORT_FILES = {"recall_curves.png", "tsne.png", "case_study.png"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny synthetic run (local backend) tracked in its own MLflow store."""
    from orchestrator.run import run_experiment

    tmp = tmp_path_factory.mktemp("reports")
    cfg = validate_config(tiny_tree(tmp, train={"epochs": 1}, tracking={"run_name": "reports"}))
    return cfg, run_experiment(cfg, config_source="inline"), tmp


def assert_png(path: Path, min_side: int = 300) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side, (path, img.size)
        assert len(set(img.convert("L").getdata())) > 10  # something is drawn


def test_run_logs_report_figures_to_mlflow(trained_run):
    from mlflow.tracking import MlflowClient

    cfg, result, tmp = trained_run
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    logged = {Path(a.path).name for a in client.list_artifacts(result.run_id, "reports")}
    assert logged == REPORT_FILES
    best = Path(result.best_checkpoint)
    for name in REPORT_FILES:
        path = Path(client.download_artifacts(result.run_id, f"reports/{name}", str(tmp)))
        assert_png(path)
        # every figure says what it shows: the split and the checkpoint with its epoch (1 epoch: epoch 0)
        with Image.open(path) as img:
            expected = f"val split · best checkpoint {best.parent.name}/{best.name} (epoch 0 = 1 of 1)"
            assert img.info["Description"] == expected


def test_report_source_reads_the_checkpoint_epoch(trained_run, tmp_path):
    import shutil

    import torch

    from orchestrator.evaluation.checkpoint_model import load_checkpoint_model

    _, result, _ = trained_run
    copy = tmp_path / "run" / "best"
    shutil.copytree(result.best_checkpoint, copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    torch.save({**state, "epoch": 7}, copy / "model.pt")
    loaded = load_checkpoint_model(copy)
    assert loaded.epoch == 7
    source = reports.report_source("test", loaded.path, loaded.epoch, 20)
    assert source == "test split · checkpoint run/best (epoch 7 = 8 of 20)"
    assert reports.report_source("val") == "val split"


def test_itr_eval_writes_reports_and_every_metric(trained_run, tmp_path):
    cfg, result, _ = trained_run
    out, emb_file = tmp_path / "report", tmp_path / "emb.npz"
    js = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                result.best_checkpoint,
                "--graded",
                "--report-dir",
                str(out),
                "--image-folder",
                str(FIXTURES / "unimodal_images"),
                "--sts",
                str(FIXTURES / "sts_pairs.tsv"),
                "--export-embeddings",
                str(emb_file),
                "--json",
                str(js),
            ]
        )
        == 0
    )
    metrics = json.loads(js.read_text())["metrics"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {p.name for p in out.iterdir()} == REPORT_FILES | {"metrics.json"}
    best = Path(result.best_checkpoint)
    for name in REPORT_FILES:
        assert_png(out / name)
        with Image.open(out / name) as img:
            expected = f"val split · checkpoint {best.parent.name}/{best.name} (epoch 0 = 1 of 1)"
            assert img.info["Description"] == expected, name
    # reports of exported embeddings (no model, no images: no case study) name the file they come from
    out_emb = tmp_path / "report_emb"
    assert main(["eval", "--embeddings", str(emb_file), "--report-dir", str(out_emb)]) == 0
    assert {p.name for p in out_emb.iterdir()} == {"recall_curves.png", "tsne.png", "metrics.json"}
    for name in ("recall_curves.png", "tsne.png"):
        with Image.open(out_emb / name) as img:
            assert img.info["Description"] == "embeddings emb.npz", name
    for key in ("rsum", "i2t_ndcg10", "t2i_ndcg25", "i2t_ndcg_all", "t2i_kendall_tau", "image_r1", "sts_spearman"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["image_r1"] <= 100 and -100 <= metrics["sts_spearman"] <= 100
    # the graded metrics are those of the exported embeddings under the synthetic data's exact relevance
    data = np.load(emb_file)
    index = load_split(cfg.data, "val")
    rel = index.relevance(np.arange(index.num_images), np.arange(index.num_captions)).astype(np.float64)
    sims = data["image_emb"].astype(np.float64) @ data["text_emb"].astype(np.float64).T
    assert metrics["i2t_ndcg10"] == pytest.approx(ndcg_score(rel, sims, k=10), abs=1e-5)
    assert metrics["t2i_ndcg_all"] == pytest.approx(ndcg_score(rel.T, sims.T), abs=1e-5)


def test_itr_eval_graded_with_a_text_teacher(trained_run, tmp_path):
    _, result, _ = trained_run
    js = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                result.best_checkpoint,
                "--graded",
                "--relevance",
                "teacher",
                "--relevance-agg",
                "mean",
                "--set",
                "teachers.text=synthetic:attributes",
                "--set",
                f"teachers.cache_dir={tmp_path / 'cache'}",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    metrics = json.loads(js.read_text())["metrics"]
    assert 0 < metrics["i2t_ndcg10"] <= 1 and -1 <= metrics["t2i_kendall_tau"] <= 1


def test_graded_without_relevance_source_is_a_user_error(trained_run, capsys):
    _, result, _ = trained_run
    assert main(["eval", "--checkpoint", result.best_checkpoint, "--graded", "--relevance", "teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teachers.text" in err[0]


def test_report_failure_only_warns_and_reports_can_be_switched_off(trained_run, monkeypatch, caplog):
    cfg, result, _ = trained_run
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(reports, "generate_run_reports", broken)
    with caplog.at_level(logging.WARNING, logger="orchestrator.evaluation.reports"):
        assert reports.publish_run_reports(cfg, result.best_checkpoint, lambda files: None) == []
    assert calls and "no fonts today" in caplog.text
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"reports": False})})
    assert reports.publish_run_reports(off, result.best_checkpoint, lambda files: None) == []
    assert len(calls) == 1
