"""Config validation: one-line errors naming the file and dotted field; overrides; exit code 2 from the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ExperimentConfig, apply_overrides, load_config
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_are_the_papers():
    cfg = ExperimentConfig()
    assert cfg.loss.family == "infonce"
    assert (cfg.loss.temperature.init, cfg.loss.temperature.min, cfg.loss.temperature.max) == (0.05, 0.01, 0.10)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr, cfg.train.batch_size) == (1e-5, 1e-4, 1e-6, 128)
    assert cfg.train.seed == 23


def test_unknown_key_names_file_and_dotted_field(tmp_path):
    path = write(tmp_path, {"train": {"epochs": 2, "epocs": 3}})
    msg = error_of(path)
    assert msg == f"{path}:train.epocs: unknown key"


def test_wrong_type_names_field(tmp_path):
    msg = error_of(write(tmp_path, {"train": {"batch_size": "many"}}))
    assert ":train.batch_size:" in msg and "integer" in msg and "'many'" in msg


def test_out_of_range_names_field(tmp_path):
    msg = error_of(write(tmp_path, {"train": {"lr": 0}}))
    assert ":train.lr:" in msg and "greater than 0" in msg


def test_nan_hyperparameter_rejected(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("loss:\n  family: triplet\n  margin: .nan\n")
    assert ":loss.margin:" in error_of(path)


def test_loss_union_field_is_named_without_tag(tmp_path):
    msg = error_of(
        write(tmp_path, {"loss": {"family": "infonce", "temperature": {"init": 0.5, "min": 0.01, "max": 0.1}}})
    )
    assert ":loss.temperature.init:" in msg and "outside" in msg


def test_unknown_loss_family(tmp_path):
    msg = error_of(write(tmp_path, {"loss": {"family": "nope"}}))
    assert ":loss:" in msg or ":loss.family:" in msg


def test_missing_data_root_names_field_and_path(tmp_path):
    msg = error_of(write(tmp_path, {}), [f"data.root={tmp_path / 'absent'}"])
    assert "data.root" in msg and str(tmp_path / "absent") in msg and msg.endswith("(from --set)")


def test_unknown_model_name(tmp_path):
    msg = error_of(write(tmp_path, {"model": {"name": "ViT-B-33"}}))
    assert ":model.name:" in msg and "ViT-B-33" in msg


def test_best_metric_must_be_val(tmp_path):
    assert ":train.best_metric:" in error_of(write(tmp_path, {"train": {"best_metric": "test/rsum"}}))


def test_missing_config_file(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    msg = error_of(path)
    assert str(path) in msg and "line" in msg


def test_overrides_parse_yaml_values(tmp_path):
    tree = apply_overrides(
        {"train": {"epochs": 1}}, ["train.epochs=3", "train.grad_clip=null", "model.name=RN50", "eval.ks=[1,5]"]
    )
    assert tree == {"train": {"epochs": 3, "grad_clip": None}, "model": {"name": "RN50"}, "eval": {"ks": [1, 5]}}
    cfg = load_config(write(tmp_path, {}), ["loss.family=triplet", "loss.margin=0.3"])
    assert cfg.loss.family == "triplet" and cfg.loss.margin == 0.3


def test_relative_paths_resolve_against_the_launch_folder_not_the_workers(tmp_path, monkeypatch):
    """Ray workers run in another cwd: the cache the driver fills before they start must be the one they read."""
    launch, worker = tmp_path / "launch", tmp_path / "worker"
    launch.mkdir(), worker.mkdir()
    monkeypatch.chdir(launch)
    cfg = load_config(write(tmp_path, {"tracking": {"artifact_dir": "art"}}), ["train.output_dir=out"])
    assert cfg.teachers.cache_dir == launch / ".itr_cache" / "teachers"  # a default, resolved too
    assert cfg.train.output_dir == launch / "out" and cfg.tracking.artifact_dir == launch / "art"
    monkeypatch.chdir(worker)  # what a Ray Train worker does
    again = ExperimentConfig.model_validate(cfg.model_dump(mode="json"))
    assert (again.teachers.cache_dir, again.train.output_dir, again.tracking.artifact_dir) == (
        cfg.teachers.cache_dir,
        cfg.train.output_dir,
        cfg.tracking.artifact_dir,
    )
    assert ExperimentConfig().teachers.cache_dir == worker / ".itr_cache" / "teachers"


def test_auto_format_from_root(coco_mini, tmp_path):
    cfg = load_config(write(tmp_path, {}), [f"data.root={coco_mini}"])
    assert cfg.data.resolved_format == "captions_json"
    assert ExperimentConfig().data.resolved_format == "synthetic"


def test_random_sampler_needs_multi_positive_loss(tmp_path):
    msg = error_of(
        write(tmp_path, {"loss": {"family": "triplet", "multi_positive": False}, "train": {"batch_sampler": "random"}})
    )
    assert "batch_sampler" in msg


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if "root" in tree.get("data", {}) and not (REPO / tree["data"]["root"]).exists():
            continue  # needs ../shared
        load_config(path)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, {"train": {"epochs": -1}})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{path}:train.epochs:" in err[0]


def test_cli_subprocess_no_traceback(tmp_path):
    path = write(tmp_path, {"model": {"nmae": "x"}})
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}:model.nmae: unknown key"


def test_cross_field_errors_name_the_field(tmp_path):
    msg = error_of(write(tmp_path, {"loss": {"family": "cusa"}}))
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:teachers.image: ")
    msg = error_of(write(tmp_path, {"train": {"lr": 1e-4, "min_lr": 1e-3}}))
    assert ":train.min_lr:" in msg
    msg = error_of(write(tmp_path, {"data": {"format": "karpathy"}}))
    assert ":data.annotations:" in msg
    msg = error_of(write(tmp_path, {"loss": {"family": "listwise", "relevance": "teacher"}}))
    assert ":teachers.text:" in msg


def test_relevance_source_and_heads_resolve():
    cfg = ExperimentConfig.model_validate({"loss": {"family": "bcls"}})
    assert cfg.relevance_source == "exact" and cfg.resolved_heads == "none"
    cfg = ExperimentConfig.model_validate(
        {
            "loss": {"family": "cusa", "beta": 0.0},
            "teachers": {"image": "synthetic:attributes", "text": "synthetic:attributes"},
        }
    )
    assert cfg.resolved_heads == "cross" and cfg.relevance_source is None
