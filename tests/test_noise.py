"""Noisy correspondence (``data.noise.caption_shuffle``): how many captions move, that none keeps its image, the
seed, clean val, the mask artifact, the refusals, and ``search_spaces/noise_robustness.yaml`` at toy size."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.config import DataConfig, set_dotted, validate_config
from orchestrator.data.noise import MASK_NAME, derange, plan_caption_shuffle
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError
from orchestrator.search_space import load_space
from orchestrator.search_space.loading import trial_tree
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "search_spaces" / "noise_robustness.yaml"


def coco(root: Path, r: float = 0.0, seed: int = 0, **more) -> DataConfig:
    return DataConfig(root=root, verify_images="none", noise={"caption_shuffle": r, "seed": seed}, **more)


def moved(clean, noisy) -> np.ndarray:
    """Caption indices whose image differs between the two loads (columns otherwise checked equal)."""
    assert list(noisy.captions) == list(clean.captions) and list(noisy.image_ids) == list(clean.image_ids)
    assert list(noisy.image_paths or []) == list(clean.image_paths or [])
    return np.flatnonzero(np.asarray(clean.caption_image) != np.asarray(noisy.caption_image))


# --------------------------------------------------------------------------------------------- the shuffle
@pytest.mark.parametrize("r", [0.2, 0.5, 0.9])
def test_round_r_m_captions_move_and_none_keeps_its_image(coco_mini, r):
    clean = load_split(coco(coco_mini), "train")
    noisy = load_split(coco(coco_mini, r), "train")
    m = clean.num_captions
    assert m == len(json.loads((coco_mini / "train.json").read_text()))  # M: every training caption
    changed = moved(clean, noisy)
    # every chosen caption changed image, so the changed ones are exactly the chosen ones
    assert changed.size == round(r * m)
    # the chosen captions' images were permuted among them: each image keeps its caption count, and the images
    # the moved captions now show are those they left, as a multiset
    assert np.array_equal(np.bincount(clean.caption_image), np.bincount(noisy.caption_image))
    assert sorted(clean.caption_image[changed].tolist()) == sorted(noisy.caption_image[changed].tolist())
    # captions_of follows the new pairs
    for img in range(0, noisy.num_images, 97):
        want = [c for c in range(m) if noisy.caption_image[c] == img]
        assert noisy.captions_of(img).tolist() == want


def test_synthetic_split_rounding_and_unchanged_columns(tmp_path):
    syn = {"num_train_images": 37, "num_val_images": 10, "num_test_images": 10, "captions_per_image": [1, 4]}
    clean = load_split(DataConfig(synthetic=syn), "train")
    m = clean.num_captions
    for r in (0.05, 0.3, 0.5, 0.75):
        noisy = load_split(DataConfig(synthetic=syn, noise={"caption_shuffle": r, "seed": 3}), "train")
        assert moved(clean, noisy).size == round(r * m), r
        assert list(noisy.caption_ids) == list(clean.caption_ids)
        assert noisy.content_hash() != clean.content_hash()  # caches keyed by content see another split


def test_choice_is_deterministic_by_seed_and_changes_with_it(coco_mini):
    clean = load_split(coco(coco_mini), "train")
    a = load_split(coco(coco_mini, 0.2, seed=0), "train")
    b = load_split(coco(coco_mini, 0.2, seed=0), "train")
    c = load_split(coco(coco_mini, 0.2, seed=1), "train")
    assert np.array_equal(a.caption_image, b.caption_image) and a.content_hash() == b.content_hash()
    assert set(moved(clean, a).tolist()) != set(moved(clean, c).tolist())
    assert moved(clean, a).size == moved(clean, c).size


def test_val_and_test_stay_clean(coco_mini):
    for role in ("val",):  # coco-mini has train and val
        clean = load_split(coco(coco_mini), role)
        noisy = load_split(coco(coco_mini, 0.5), role)
        assert np.array_equal(clean.caption_image, noisy.caption_image)
        assert clean.content_hash() == noisy.content_hash() and clean.name == noisy.name
    syn = {"num_train_images": 20, "num_val_images": 12, "num_test_images": 12}
    for role in ("val", "test"):
        clean = load_split(DataConfig(synthetic=syn), role)
        noisy = load_split(DataConfig(synthetic=syn, noise={"caption_shuffle": 0.5}), role)
        assert clean.content_hash() == noisy.content_hash()


def brute_force_derangeable(labels: list[int]) -> bool:
    return any(all(p[k] != labels[k] for k in range(len(labels))) for p in itertools.permutations(labels))


def test_derangement_is_over_images_exactly_when_one_exists():
    """Captions that share an image never swap among themselves: all M captions chosen (r rounds to M), on many
    random small splits, the plan succeeds if and only if a brute-force search finds a rearrangement of the
    images with no caption on its own, and its result is one."""
    rng = np.random.default_rng(12)
    outcomes = set()
    for _ in range(300):
        m = int(rng.integers(2, 8))
        labels = np.sort(rng.integers(0, int(rng.integers(1, 4)), size=m))
        labels = np.unique(labels, return_inverse=True)[1]  # images 0..k-1, each with a caption
        r = (m - 0.25) / m  # < 1, rounds to m: every caption is chosen
        feasible = brute_force_derangeable(labels.tolist())
        outcomes.add(feasible)
        if not feasible:
            with pytest.raises(UserError, match="cannot all move to another image") as err:
                plan_caption_shuffle(labels, r, seed=int(rng.integers(1000)))
            assert err.value.field == "data.noise.caption_shuffle"
            continue
        plan = plan_caption_shuffle(labels, r, seed=int(rng.integers(1000)))
        assert plan.captions.tolist() == list(range(m))
        assert (plan.to_image != labels).all()
        assert sorted(plan.to_image.tolist()) == labels.tolist()
    assert outcomes == {True, False}


def test_derange_with_heavy_sharing_and_exactly_half():
    for labels in ([0] * 5 + [1] * 5 + [2] * 4, [0] * 3 + [1, 2, 3], [0, 0, 1, 1]):
        arr = np.asarray(labels)
        seen = set()
        for seed in range(40):
            out = derange(arr, np.random.default_rng(seed))
            assert (out != arr).all() and sorted(out.tolist()) == sorted(labels)
            seen.add(tuple(out.tolist()))
        assert len(seen) > 1 or labels == [0, 0, 1, 1]  # random, not one fixed answer ([0,0,1,1] has one)


def test_impossible_and_empty_shuffles_are_refused():
    with pytest.raises(UserError, match=r"re-pairs 2 training caption\(s\), 2 of them of image index 0"):
        plan_caption_shuffle(np.zeros(3, dtype=np.int64), 0.5, seed=0)  # all chosen captions of one image
    with pytest.raises(UserError, match="rounds to none"):
        plan_caption_shuffle(np.arange(300), 0.001, seed=0)
    # through the config: one synthetic training image cannot give any caption another image
    one = {"num_train_images": 1, "num_val_images": 4, "num_test_images": 4, "captions_per_image": [3, 3]}
    with pytest.raises(UserError, match="cannot all move to another image") as err:
        load_split(DataConfig(synthetic=one, noise={"caption_shuffle": 0.5}), "train")
    assert "data.noise.caption_shuffle" in str(err.value) and "synthetic-train-000000" in str(err.value)


@pytest.mark.parametrize("value", [1.0, -0.1, "x", True])
def test_bad_share_is_a_field_error(tmp_path, value):
    with pytest.raises(UserError, match=r"^c\.yaml:data\.noise\.caption_shuffle: "):
        validate_config(tiny_tree(tmp_path, data={"noise": {"caption_shuffle": value}}), source="c.yaml")


def test_webdataset_training_with_noise_is_refused(tmp_path, coco_mini):
    data = {"format": "webdataset", "shards": str(tmp_path / "train-{0..1}.tar"), "root": str(coco_mini)}
    tree = tiny_tree(tmp_path, data={**data, "noise": {"caption_shuffle": 0.2}})
    with pytest.raises(UserError) as err:
        validate_config(tree, source="c.yaml")
    text = str(err.value)
    assert "\n" not in text and "data.noise" in text and "webdataset" in text
    tree["data"]["noise"]["caption_shuffle"] = 0.0
    validate_config(tree)  # off: the streamed path is fine


# ------------------------------------------------------------------------------------------ the mask artifact
def check_mask(doc: dict, data: DataConfig) -> None:
    """The mask equals what a clean and a noisy load of the same split show."""
    clean = load_split(data.model_copy(update={"noise": DataConfig().noise}), "train", verify=False)
    noisy = load_split(data, "train", verify=False)
    changed = moved(clean, noisy)
    assert doc["num_captions"] == clean.num_captions and doc["num_shuffled"] == changed.size
    assert doc["caption_index"] == changed.tolist()
    assert doc["from_image"] == [clean.image_ids[i] for i in clean.caption_image[changed]]
    assert doc["to_image"] == [noisy.image_ids[i] for i in noisy.caption_image[changed]]
    assert all(a != b for a, b in zip(doc["from_image"], doc["to_image"]))
    assert doc["caption_shuffle"] == data.noise.caption_shuffle and doc["seed"] == data.noise.seed
    assert doc["content_hash"] == clean.content_hash()


def test_run_writes_the_mask_to_mlflow_and_the_run_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.run import run_experiment

    tree = tiny_tree(
        tmp_path,
        data={"noise": {"caption_shuffle": 0.3, "seed": 5}},
        train={"epochs": 1, "max_steps_per_epoch": 2, "eval_at_start": False},
        eval={"reports": False},
        tracking={"system_metrics": False},
    )
    cfg = validate_config(tree)
    result = run_experiment(cfg)
    client = MlflowClient(result.tracking_uri)
    assert MASK_NAME in {a.path for a in client.list_artifacts(result.run_id)}
    doc = json.loads(Path(client.download_artifacts(result.run_id, MASK_NAME, str(tmp_path))).read_text())
    check_mask(doc, cfg.data)
    caption_ids = load_split(cfg.data, "train").caption_ids
    assert doc["caption_id"] == [caption_ids[c] for c in doc["caption_index"]]
    assert json.loads((Path(result.run_dir) / MASK_NAME).read_text()) == doc  # beside the checkpoints


def test_sweep_trial_runs_get_the_mask(tmp_path):
    """The sweep's driver callback logs the mask into each noisy trial's child run when it creates it."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.sweep.tracker import SweepTracker

    base = tiny_tree(tmp_path)
    cfg = validate_config(base)
    target = tracking.resolve_target(cfg.tracking)
    parent = tracking.start_run(target, cfg, run_name="parent")
    tracker = SweepTracker(target, parent, "noise", base, ["data.noise.caption_shuffle"], 1, 0, progress=False)
    noisy = SimpleNamespace(trial_id="t1", config={"data.noise.caption_shuffle": 0.5})
    clean = SimpleNamespace(trial_id="t0", config={"data.noise.caption_shuffle": 0.0})
    client = MlflowClient(target.uri)
    run_noisy, run_clean = tracker._child(noisy), tracker._child(clean)
    assert [a.path for a in client.list_artifacts(run_clean)] == []
    doc = json.loads(Path(client.download_artifacts(run_noisy, MASK_NAME, str(tmp_path))).read_text())
    check_mask(doc, validate_config(trial_tree(base, noisy.config)).data)


# ------------------------------------------------------------------------------------------- the shipped space
def shipped_space(coco_mini: Path):
    # data.root names the same coco-mini wherever this checkout sits (the file's path is relative to the repo root)
    return load_space(SPACE, [f"data.root={coco_mini}"])


def test_shipped_space_validates(coco_mini):
    space = shipped_space(coco_mini)
    dists = space.distributions
    assert dists["data.noise.caption_shuffle"].args == [0.0, 0.2, 0.5]
    assert dists["loss.family"].args == ["infonce", "cusa", "listwise"]
    assert space.num_trials == 3 * 3 * len(space.spec.seeds) and space.metric == "val/rsum"
    assert space.base_config.data.noise.seed == 0 and space.base_config.model.heads == "cross_uni"
    assert "#" in SPACE.read_text().splitlines()[0]


def toy(tree: dict, tmp_path: Path) -> dict:
    """A trial mapping at toy size: the tests' tiny model (32 px), one epoch of two steps on 24 coco-mini images."""
    for dotted, value in {
        "model.name": "itr-tiny-vit",
        "model.lock_image": False,
        "model.lock_text": False,
        "data.max_train_images": 24,
        "data.loader_workers": 0,
        "train.epochs": 1,
        "train.batch_size": 16,
        "train.max_steps_per_epoch": 2,
        "train.warmup_steps": 1,
        "train.eval_at_start": False,
        "train.output_dir": str(tmp_path / "runs"),
        "teachers.cache_dir": str(tmp_path / "teachers"),
        "scaling.backend": "local",
        "tracking.enabled": False,
        "eval.reports": False,
    }.items():
        set_dotted(tree, dotted, value)
    return tree


def test_first_trial_of_the_shipped_space_trains_at_toy_size(coco_mini, tmp_path):
    space = shipped_space(coco_mini)
    first = {key: dist.args[0] for key, dist in space.distributions.items()}  # every axis at its first value
    assert first == {"data.noise.caption_shuffle": 0.0, "loss.family": "infonce", "train.seed": 0}
    cfg = validate_config(toy(trial_tree(space.base_tree, first), tmp_path))
    session = LocalSession(tmp_path / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    metrics = train_loop(cfg, session)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["val/rsum"] <= 600
    # its first noisy trial is the same toy setting on re-paired captions (trained in the mask test above)
    cfg = validate_config(toy(trial_tree(space.base_tree, {**first, "data.noise.caption_shuffle": 0.5}), tmp_path))
    clean = load_split(coco(coco_mini, max_train_images=24), "train")
    assert moved(clean, load_split(cfg.data, "train")).size == round(0.5 * clean.num_captions) > 0
