"""Metrics that must arrive, and sweep validation that matches what the trials will do.

* the metric catalogue (``orchestrator.metrics_catalogue``) equals the keys a real short training run reports,
  for every loss family, and every family declares the terms its ``forward`` returns;
* ``train.best_metric``, a space's ``metric`` and a recipe's reference rows are checked against it before
  anything trains: exit 2, one line naming the file, the field and the closest valid names;
* a space's distributions are checked against the field's type, and the cross-field rules over every grid
  combination and the corners of the ranges (not the first 512 combinations of three samples);
* ASHA's ``grace_period`` against the trials' epochs when ``max_t`` is unset.

The CLI is called in-process (``tests.test_bad_input.run_cli``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import methods
from methods import EmbeddingBatch
from orchestrator.config import validate_config
from orchestrator.metrics_catalogue import reported_metrics
from orchestrator.train_loop import train_loop
from tests.test_bad_input import assert_one_line_error, base_tree, run_cli, snapshot


# ------------------------------------------------------------------------------------------- helpers
def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def dry_run_sweep(tmp_path: Path, space: dict, **settings) -> tuple[int, list[str], Path]:
    """``itr sweep SPACE --dry-run`` of a space over the tiny base config; (exit code, stderr lines, file)."""
    doc = {"base": base_tree(tmp_path), "space": space, **settings}
    path = write(tmp_path / "space.yaml", doc)
    rc, lines, _ = run_cli(["sweep", str(path), "--dry-run"], tmp_path)
    return rc, lines, path


# ------------------------------------------------------------------ case 8: the catalogue is what arrives
RUN_VARIANTS = {
    "infonce": {"loss": {"family": "infonce"}},
    "triplet": {"loss": {"family": "triplet", "mining": "selhn"}},
    "listwise": {"loss": {"family": "listwise"}},
    "bcls": {"loss": {"family": "bcls"}},
    "cusa": {
        "loss": {"family": "cusa", "alpha": 0.1, "beta": 0.5},
        "teachers": {"image": "synthetic:attributes", "text": "synthetic:attributes"},
    },
}


class RecordingSession:
    """A one-process ``Session`` that keeps every report's metrics and drops the checkpoints (not under test)."""

    rank, world_size, device = 0, 1, torch.device("cpu")
    progress, saves_steps = False, False

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def prepare_model(self, model):
        return model

    def latest_checkpoint(self):
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir, epoch: int) -> None:
        self.history.append(dict(metrics))


@pytest.mark.parametrize("family", sorted(RUN_VARIANTS))
def test_catalogue_equals_what_a_real_run_reports(family, tmp_path):
    """One-step epochs of the real loop (init eval on): the union of the reported keys is the catalogue, and
    the last report holds all of them (it is what a recipe measures; two epochs for infonce to show it)."""
    tree = base_tree(tmp_path)
    tree["train"].update(
        epochs=2 if family == "infonce" else 1, max_steps_per_epoch=1, eval_at_start=True, log_every_steps=1000
    )
    tree["teachers"] = {"cache_dir": str(tmp_path / "teachers")}
    for section, values in RUN_VARIANTS[family].items():
        tree.setdefault(section, {}).update(values)
    cfg = validate_config(tree)
    session = RecordingSession()
    train_loop(cfg, session)
    seen = set().union(*(set(report) for report in session.history))
    assert seen == reported_metrics(cfg)
    assert set(session.history[-1]) == seen
    assert session.history[-1]["init/val/rsum"] == session.history[0]["init/val/rsum"]


FAMILY_VARIANTS = [
    ("infonce", {}),
    ("triplet", {"mining": "hardest"}),
    ("triplet", {"mining": "soft_negative"}),
    ("listwise", {"relevance": "exact"}),
    ("bcls", {"relevance": "exact", "mining": "hardest"}),
    ("cusa", {}),
    ("cusa", {"alpha": 0.0}),
    ("cusa", {"beta": 0.0}),
    ("cusa", {"alpha": 0.0, "beta": 0.0}),
]


@pytest.mark.parametrize("family,params", FAMILY_VARIANTS)
def test_every_family_declares_the_terms_its_forward_returns(family, params):
    g = torch.Generator().manual_seed(0)
    B, D = 6, 5
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    batch = EmbeddingBatch(
        image_emb=unit(B, D),
        text_emb=unit(B, D),
        image_ids=torch.tensor([0, 1, 2, 2, 3, 4]),
        image_uni=unit(B, D),
        text_uni=unit(B, D),
        teacher_image=unit(B, 7),
        teacher_text=unit(B, 4),
        relevance=torch.rand(B, B, generator=g),
    )
    module = methods.build(family, **params)
    assert set(module(batch).terms) == set(module.logged_terms())


def test_every_registered_family_is_covered_above():
    assert {f for f, _ in FAMILY_VARIANTS} == set(methods.families()) == set(RUN_VARIANTS)


# ------------------------------------------------------------------ case 8: checked before anything starts
def test_best_metric_never_reported_exits_2_naming_it_and_the_closest(tmp_path):
    tree = base_tree(tmp_path)
    tree["train"]["best_metric"] = "val/rsumm"
    cfg = write(tmp_path / "cfg.yaml", tree)
    before = snapshot(tmp_path)
    rc, lines, out = run_cli(["train", str(cfg)], tmp_path)
    line = assert_one_line_error(
        rc, lines, f"{cfg}:train.best_metric:", "'val/rsumm' is not reported", "closest: val/rsum"
    )
    assert snapshot(tmp_path) == before and out == "", line


def test_best_metric_without_a_val_split_exits_2(tmp_path):
    tree = base_tree(tmp_path)
    tree["eval"] = {"splits": ["test"]}
    cfg = write(tmp_path / "cfg.yaml", tree)
    rc, lines, _ = run_cli(["train", str(cfg)], tmp_path)
    assert_one_line_error(rc, lines, f"{cfg}:train.best_metric:", "'val/rsum'", "eval.splits has no val")


def recipe_doc(tmp_path: Path, reference: dict, **train) -> dict:
    tree = base_tree(tmp_path)
    tree["train"].update(train)
    tree["eval"] = {"reports": False}
    return {"description": "tiny", "runs": {"tiny": {"config": tree, "reference": reference}}}


def test_recipe_init_reference_without_eval_at_start_exits_2_before_training(tmp_path):
    ref = {"init/val/rsum": {"value": 10.0, "tolerance": 100.0, "source": "test"}}
    recipe = write(tmp_path / "recipe.yaml", recipe_doc(tmp_path, ref, eval_at_start=False))
    rc, lines, _ = run_cli(["reproduce", str(recipe)], tmp_path)
    assert_one_line_error(
        rc,
        lines,
        f"{recipe}:{line_of(recipe, 'init/val/rsum')}:runs.tiny.reference:",
        "'init/val/rsum' is not reported by this run (train.eval_at_start is false)",
        "closest: ",
        "val/rsum",
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_recipe_references_on_init_terms_and_evaluation_load_when_reported(tmp_path):
    from orchestrator.recipe import load_recipe

    ref = {
        m: {"value": 1.0, "tolerance": 1.0, "source": "test"}
        for m in ("init/val/rsum", "train/infonce", "train/temperature/tau", "best/val/rsum")
    }
    recipe = write(tmp_path / "recipe.yaml", recipe_doc(tmp_path, ref))
    assert [r.metric for r in load_recipe(recipe).references] == list(ref)
    ref["train/triplet_hardest"] = {"value": 1.0, "tolerance": 1.0, "source": "test"}  # infonce has no such term
    write(recipe, recipe_doc(tmp_path, ref))
    rc, lines, _ = run_cli(["reproduce", str(recipe), "--dry-run"], tmp_path)
    assert_one_line_error(rc, lines, "runs.tiny.reference", "'train/triplet_hardest' is not reported by this run")


def test_sweep_metric_some_trials_never_report_exits_2_naming_the_trial(tmp_path):
    rc, lines, path = dry_run_sweep(tmp_path, {"loss.family": {"grid": ["infonce", "triplet"]}}, metric="train/infonce")
    assert_one_line_error(
        rc,
        lines,
        f"{path}:{line_of(path, 'metric:')}: metric: 'train/infonce' is not reported "
        "by the trial loss.family='triplet'",
        "closest: ",
    )


def test_sweep_metric_typo_names_the_closest(tmp_path):
    rc, lines, path = dry_run_sweep(tmp_path, {"train.lr": {"grid": [1e-3]}}, metric="val/rsun")
    assert_one_line_error(rc, lines, f"{path}:{line_of(path, 'metric:')}: metric: 'val/rsun'", "closest: val/rsum")


# ------------------------------------------------------------------------- case 11: types and combinations
@pytest.mark.parametrize(
    "key,dist,needle",
    [
        # 2, 39 and 102 (the old samples at 0, 0.37, 1) are integers: the old check let it through
        (
            "train.batch_size",
            {"uniform": [2, 102]},
            "uniform samples fractional numbers, but the field takes an integer",
        ),
        ("train.warmup_steps", {"loguniform": [1, 100]}, "loguniform samples fractional numbers"),
        ("train.eval_at_start", {"randint": [0, 1]}, "randint samples integers, but the field takes true/false"),
        ("train.batch_sampler", {"uniform": [0, 1]}, "uniform samples numbers, but the field takes one of fixed names"),
        ("loss.temperature.init", {"randint": [0, 1]}, None),  # randint fits a float field: only its values decide
    ],
)
def test_distribution_kind_is_checked_against_the_field_type(tmp_path, key, dist, needle):
    rc, lines, path = dry_run_sweep(tmp_path, {key: dist})
    if needle is None:
        assert_one_line_error(rc, lines, f"space.{key}: randint sample 0 does not fit")
        return
    assert_one_line_error(rc, lines, f"{path}:{line_of(path, key)}: space.{key}: {needle}")


@pytest.mark.parametrize(
    "lr,min_lr",
    [({"grid": [1e-3, 1e-4]}, {"grid": [1e-5, 5e-4]}), ({"loguniform": [1e-4, 1e-2]}, {"uniform": [1e-5, 5e-4]})],
)
def test_min_lr_above_lr_past_the_512th_combination_is_caught(tmp_path, lr, min_lr):
    """Alone each value fits the base (lr 1e-3, min_lr 1e-5); lr 1e-4 with min_lr 5e-4 does not. The 600 seeds
    put that combination past the 512th (grid) or between the old samples (ranges, past 512 as well)."""
    rc, lines, path = dry_run_sweep(tmp_path, {"train.lr": lr, "train.min_lr": min_lr}, seeds=list(range(600)))
    assert_one_line_error(
        rc, lines, f"{path}:", "space: the combination train.lr=0.0001, train.min_lr=0.0005", "is invalid: train.min_lr"
    )


def test_space_too_large_to_validate_is_refused(tmp_path):
    rc, lines, path = dry_run_sweep(
        tmp_path, {"train.warmup_steps": {"grid": list(range(400))}}, seeds=list(range(300))
    )
    assert_one_line_error(
        rc, lines, f"{path}:{line_of(path, 'space:')}: space: 120000 combinations", "more than 100000"
    )


def test_valid_space_with_ranges_still_passes(tmp_path, capsys):
    rc, lines, _ = dry_run_sweep(
        tmp_path,
        {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "train.warmup_steps": {"randint": [0, 5]},
            "train.weight_decay": {"uniform": [0.0, 0.1]},
        },
        num_samples=3,
    )
    assert rc == 0 and lines == []


# ---------------------------------------------------------------------------- case 10d: ASHA without max_t
@pytest.mark.parametrize(
    "space,which",
    [
        ({"train.lr": {"grid": [1e-3]}}, "train.epochs = 1 of the trials"),
        ({"train.epochs": {"randint": [1, 4]}}, "train.epochs = 1 of the trial train.epochs=1"),
    ],
)
def test_asha_grace_period_above_the_epochs_without_max_t_exits_2(tmp_path, space, which):
    rc, lines, path = dry_run_sweep(tmp_path, space, scheduler={"type": "asha", "grace_period": 3})
    assert_one_line_error(
        rc, lines, f"{path}:{line_of(path, 'grace_period:')}: scheduler.grace_period: 3 is larger than {which}"
    )


def test_asha_grace_period_within_the_epochs_passes(tmp_path):
    rc, lines, _ = dry_run_sweep(
        tmp_path, {"train.epochs": {"grid": [2, 3]}}, scheduler={"type": "asha", "grace_period": 2}
    )
    assert rc == 0 and lines == []


# ------------------------------------------------------------------ the baseline setting of paired tests
@pytest.mark.parametrize(
    "baseline, needle",
    [
        ({"train.epochs": 2}, "'train.epochs' is not varied by this space (it varies loss.family)"),
        ({"loss.family": "bcls"}, "loss.family: 'bcls' is not one of the space's values ['infonce', 'triplet']"),
        ({"train.seed": 0}, "train.seed is not part of a setting"),
        ({}, "give the baseline's value of at least one varied parameter"),
    ],
)
def test_a_baseline_outside_the_space_exits_2_naming_it(tmp_path, baseline, needle):
    space = {"loss.family": {"grid": ["infonce", "triplet"]}}
    rc, lines, path = dry_run_sweep(tmp_path, space, baseline=baseline, seeds=[0, 1])
    assert_one_line_error(rc, lines, f"{path}:{line_of(path, 'baseline:')}: baseline", needle)


def test_a_baseline_in_the_space_is_accepted(tmp_path):
    space = {"loss.family": {"grid": ["infonce", "triplet"]}}
    rc, lines, _ = dry_run_sweep(tmp_path, space, baseline={"loss.family": "infonce"}, seeds=[0, 1])
    assert rc == 0, lines
