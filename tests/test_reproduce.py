"""``itr reproduce``: recipes are validated before anything runs (exit 2, one line), a run is compared with its
reference table (exit 0 on pass, 1 on regression), the verdict is tagged on the MLflow run, and
``--against-last-pass`` compares with the newest passing reproduction instead of the recipe's table.

The end-to-end runs use ``recipes/synthetic_tiny.yaml`` (tiny ViT, synthetic data, in-process: seconds)."""

from __future__ import annotations

import math
import re
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.recipe import Reference, load_recipe
from orchestrator.reproduce import FAIL, INFO, PASS, baselines_from_last_pass, compare, judge

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
SYNTHETIC = RECIPES / "synthetic_tiny.yaml"
SPEC = REPO / "docs" / "methods.md"  # the team's method spec, kept in the repository
PAPER_INPUTS = (
    "ITR_COCO_ANNOTATIONS",
    "ITR_COCO_IMAGES",
    "ITR_F30K_ANNOTATIONS",
    "ITR_F30K_IMAGES",
    "ITR_CLIP_VIT_B_32",
    "ITR_CLIP_VIT_L_14_336",
    "ITR_UNICOM_COCO",
    "ITR_UNICOM_F30K",
)


def store_flags(root: Path) -> list[str]:
    return [
        "--set",
        f"train.output_dir={root / 'runs'}",
        "--set",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "--set",
        f"tracking.artifact_dir={root / 'mlartifacts'}",
    ]


def client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs_newest_first(root: Path):
    c = client(root)
    exp = c.get_experiment_by_name("itr-reproduce")
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def write_recipe(tmp_path: Path, doc: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_config(tmp_path: Path) -> dict:
    return {
        "data": {
            "format": "synthetic",
            "synthetic": {"num_train_images": 64, "num_val_images": 16, "num_test_images": 16, "image_size": 32},
        },
        "model": {"name": "itr-tiny-vit"},
        "train": {"epochs": 1, "batch_size": 8, "output_dir": str(tmp_path)},
        "scaling": {"backend": "local"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


# ------------------------------------------------------------------------------------------ the verdict
@pytest.mark.parametrize(
    "reference, measured, tolerance, direction, ok",
    [
        (89.0, 81.0, 8.0, "higher", True),
        (89.0, 80.9, 8.0, "higher", False),
        (89.0, 150.0, 8.0, "higher", True),
        (10.0, 12.0, 2.0, "lower", True),
        (10.0, 12.5, 2.0, "lower", False),
        (10.0, 2.0, 2.0, "lower", True),
        (5.0, 3.0, 2.0, "both", True),
        (5.0, 7.5, 2.0, "both", False),
        (5.0, math.nan, 2.0, "both", False),
    ],
)
def test_judge_is_one_sided_unless_both(reference, measured, tolerance, direction, ok):
    assert judge(reference, measured, tolerance, direction) is ok


def test_compare_resolves_relative_rows_informational_rows_and_missing_metrics():
    refs = [
        Reference("a", "test/rsum", 100.0, None, 2.0, "higher", "paper", True),
        Reference("b", "test/rsum", None, "a", 0.0, "higher", "claim", True),
        Reference("b", "test/eccv_r1/i2t", 70.0, None, 1.0, "higher", "other backbone", False),
        Reference("b", "val/rsum", 50.0, None, 1.0, "higher", "x", True),
    ]
    rows = compare(refs, {"a": {"test/rsum": 97.5}, "b": {"test/rsum": 97.4, "test/eccv_r1/i2t": 10.0}})
    assert [r.result for r in rows] == [FAIL, FAIL, INFO, FAIL]
    assert rows[0].delta == pytest.approx(-2.5)
    assert rows[1].reference == 97.5 and rows[1].delta == pytest.approx(-0.1)  # b is compared with a's value
    assert rows[3].measured is None and rows[3].delta is None  # not reported: a regression
    rows = compare(refs, {"a": {"test/rsum": 98.0}, "b": {"test/rsum": 98.0}})
    assert [r.result for r in rows[:2]] == [PASS, PASS]
    baseline = {"a": {"test/rsum": (120.0, "last pass")}}
    assert compare(refs[:1], {"a": {"test/rsum": 117.0}}, baseline)[0].result == FAIL


# ------------------------------------------------------------------------------------------ bad input
def test_paper_recipe_without_its_data_exits_2_naming_the_missing_path(monkeypatch, tmp_path, capsys):
    for name in PAPER_INPUTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES / "cusa_vitb32_coco.yaml"
    default = yaml.safe_load(recipe.read_text())["inputs"]["coco_annotations"]["default"]
    assert not Path(default).exists(), "this machine has COCO where the recipe's default points"
    assert main(["reproduce", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {recipe}:") and "inputs.coco_annotations" in err
    assert default in err and "ITR_COCO_ANNOTATIONS" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing half-written


def test_recipe_errors_name_file_line_and_key(tmp_path, capsys):
    doc = {
        "description": "x",
        "runs": {
            "r": {"config": tiny_config(tmp_path), "reference": {"val/r1": {"value": 1, "tolerance": 0, "source": "s"}}}
        },
    }
    path = write_recipe(tmp_path, doc)
    assert main(["reproduce", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "val/r1" in ln)
    assert err.startswith(f"error: {path}:{line}:runs.r.reference: 'val/r1' is not reported") and "val/rsum" in err
    doc["runs"]["r"]["reference"] = {"val/rsum": {"value": 1, "relative_to": "r", "tolerance": 0, "source": "s"}}
    assert main(["reproduce", str(write_recipe(tmp_path, doc)), "--dry-run"]) == 2
    assert "exactly one of value / relative_to" in capsys.readouterr().err
    doc["runs"]["r"]["reference"] = {"val/rsum": {"value": 1, "tolerance": 0, "source": "s"}}
    doc["runs"]["r"]["config"]["train"]["lrr"] = 1
    assert main(["reproduce", str(write_recipe(tmp_path, doc)), "--dry-run"]) == 2
    assert re.search(r":\d+:runs\.r: train\.lrr: unknown key", capsys.readouterr().err)


def test_learning_rate_zero_is_bad_input_not_a_regression(tmp_path, capsys):
    assert main(["reproduce", str(SYNTHETIC), "--set", "train.lr=0", *store_flags(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr" in err and "greater than 0" in err


def test_every_shipped_recipe_validates_with_its_inputs(monkeypatch, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for name in PAPER_INPUTS:
        target = tmp_path / "images" if name.endswith("_IMAGES") else tmp_path / name.lower()
        target.touch()
        monkeypatch.setenv(name, str(target))
    monkeypatch.setenv("ITR_COCO_MINI", str(tmp_path / "images"))  # the dry run only checks that it exists
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying what it needs"
        assert main(["reproduce", str(path), "--dry-run"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert out.startswith(f"recipe {load_recipe(path).name}: runs ")


def test_coco_mini_recipe_finds_the_data_beside_the_checkout(coco_mini, monkeypatch):
    monkeypatch.delenv("ITR_COCO_MINI", raising=False)
    recipe = load_recipe(RECIPES / "coco_mini_tiny.yaml")
    assert recipe.inputs == {"coco_mini": str(coco_mini)}
    assert recipe.runs[0].config.data.root == coco_mini and recipe.runs[0].config.scaling.backend == "local"
    provenance = recipe.spec.provenance
    assert re.match(r"[0-9a-f]{7}", provenance["commit"]) and provenance["measured_at"]


def test_paper_references_are_the_numbers_of_the_spec():
    table = {}
    for line in SPEC.read_text().splitlines():
        m = re.match(r"\| (ViT-[^|]+?) \| \**([\d.]+)\** \| \**([\d.]+)\** \|", line)
        if m:
            table[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert len(table) == 6
    rows = {
        "cusa_vitb32_coco.yaml": ("ViT-B/32", 0),
        "cusa_vitb32_f30k.yaml": ("ViT-B/32", 1),
        "cusa_vitl14_336_coco.yaml": ("ViT-L/14@336", 0),
        "cusa_vitl14_336_f30k.yaml": ("ViT-L/14@336", 1),
    }
    names = {"baseline": "baseline (InfoNCE only)", "csa": "+CSA", "usa": "+USA", "cusa": "+CUSA"}
    for file, (model, column) in rows.items():
        runs = yaml.safe_load((RECIPES / file).read_text())["runs"]
        for run, spec in runs.items():
            key = f"{model} {names[run]}" if f"{model} {names[run]}" in table else f"{model} {run}"
            assert spec["reference"]["test/rsum"]["value"] == table[key][column], (file, run)
    coco = yaml.safe_load((RECIPES / "cusa_vitb32_coco.yaml").read_text())["runs"]
    recalls = [coco["cusa"]["reference"][f"test/{d}_r{k}"]["value"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert "COCO i2t {}/{}/{}, t2i {}/{}/{}".format(*recalls) in SPEC.read_text()
    eccv = coco["cusa"]["reference"]
    text = "{}/{}/{} ; {}/{}/{}".format(
        *(
            eccv[f"test/{m}/{d}"]["value"]
            for d in ("i2t", "t2i")
            for m in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1")
        )
    )
    assert f"+CUSA {text}" in SPEC.read_text()


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """The synthetic recipe run twice into one store: as shipped (must pass), then with a learning rate near zero
    and ``--against-last-pass`` (must regress). Returns (store root, [(exit code, stdout)])."""
    root = tmp_path_factory.mktemp("repro")
    out = []
    for extra in ([], ["--set", "train.lr=1e-9", "--set", "train.min_lr=0", "--against-last-pass"]):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["reproduce", str(SYNTHETIC), *store_flags(root), *extra])
        out.append((code, buf.getvalue()))
    return root, out


def table_rows(stdout: str) -> dict[str, list[str]]:
    """metric -> [reference, measured, delta, tolerance, result] from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 7 and parts[0] == "tiny-infonce":
            rows[parts[1]] = parts[2:]
    return rows


def test_shipped_synthetic_recipe_passes_and_tags_its_run(reproduced):
    root, [(code, out), _] = reproduced
    assert code == 0, out
    reference = yaml.safe_load(SYNTHETIC.read_text())["runs"]["tiny-infonce"]["reference"]
    rows = table_rows(out)
    assert set(rows) == set(reference) and all(r[-1] == "pass" for r in rows.values())
    assert f"PASS: {len(reference)} metric(s) within tolerance" in out
    run = runs_newest_first(root)[1]
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["repro/status"] == "pass" and tags["repro/recipe"] == "synthetic-tiny"
    assert tags["repro/run"] == "tiny-infonce" and tags["repro/against"] == "recipe"
    for metric, ref in reference.items():
        measured = metrics[metric]  # the run's own last logged value
        assert float(tags[f"repro/measured/{metric}"]) == measured
        assert float(tags[f"repro/delta/{metric}"]) == pytest.approx(measured - ref["value"], abs=1e-4)
        assert rows[metric][:2] == [f"{ref['value']:.2f}", f"{measured:.2f}"]


def test_near_zero_learning_rate_regresses_against_the_last_pass(reproduced):
    root, [_, (code, out)] = reproduced
    assert code == 1, out
    passed, broken = runs_newest_first(root)[1], runs_newest_first(root)[0]
    assert broken.data.params["train.lr"] == "1e-09"
    rows = table_rows(out)
    for metric, (reference, _measured, delta, _, result) in rows.items():
        assert float(reference) == pytest.approx(passed.data.metrics[metric], abs=0.006)  # the last pass's value
        assert result == "FAIL" and float(delta) < 0
    regressed = re.search(r"^REGRESSED: (.*)$", out, re.M).group(1)
    assert set(regressed.split(", ")) == {f"tiny-infonce {m}" for m in rows}
    assert f"last pass {passed.info.run_id[:8]}" in out
    tags = broken.data.tags
    assert tags["repro/status"] == "regressed" and tags["repro/against"] == "last-pass"
    assert set(tags["repro/regressed"].split(", ")) == set(rows)
    assert tags["repro/result/val/rsum"] == "fail"
    # the newest *passing* run stays the baseline: the regressed one is never picked
    recipe = load_recipe(SYNTHETIC, store_flags(root)[1::2])
    baselines, _ = baselines_from_last_pass(recipe)
    assert baselines["tiny-infonce"]["val/rsum"][0] == passed.data.metrics["val/rsum"]


# ------------------------------------------------------------------------------------------ sweep recipes
def stand_in_trial(cfg, session) -> dict:
    """Reports ``train.epochs`` epochs without training: val/rsum = 1e5 * lr * (epoch + 1)."""
    metrics = {}
    for epoch in range(cfg.train.epochs):
        metrics = {"train/loss": 1.0, "val/rsum": 1e5 * cfg.train.lr * (epoch + 1), "epoch": epoch}
        with tempfile.TemporaryDirectory() as tmp:
            session.report(metrics, Path(tmp), epoch)
    return metrics


@pytest.mark.ray
def test_sweep_recipe_is_measured_by_its_best_trial(tmp_path, monkeypatch, capsys):
    from ray import cloudpickle

    import orchestrator.sweep as sweep

    real = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", lambda space, **kw: real(space, trial_fn=stand_in_trial, **kw))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    base = tiny_config(tmp_path)
    base["train"].update(epochs=2, eval_at_start=False)
    base["tracking"]["experiment"] = "itr-reproduce"
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "space": {"train.lr": {"grid": [1e-3, 2e-3]}},
                "max_concurrent_trials": 2,
                "resources": {"cpu": 0.5},
            }
        )
    )
    path = write_recipe(
        tmp_path,
        {
            "description": "a sweep",
            "runs": {
                "lr": {
                    "space": str(space),
                    "reference": {
                        "best/val/rsum": {"value": 400.0, "tolerance": 1.0, "source": "1e5 * 2e-3 * 2 epochs"},
                        "val/rsum": {
                            "value": 400.5,
                            "tolerance": 1.0,
                            "direction": "both",
                            "source": "the best trial's last",
                        },
                    },
                }
            },
        },
    )
    try:
        code = main(["reproduce", str(path)])
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        import ray

        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines() if ln.startswith("lr ")}
    assert rows["best/val/rsum"][3] == "400.00" and rows["val/rsum"][3] == "400.00"
    c = client(tmp_path)
    parent = next(
        r
        for r in c.search_runs([c.get_experiment_by_name("itr-reproduce").experiment_id])
        if r.data.tags.get("itr.kind") == "sweep"
    )
    assert parent.data.tags["repro/status"] == "pass" and parent.data.tags["repro/run"] == "lr"
    assert float(parent.data.tags["repro/measured/best/val/rsum"]) == 400.0
