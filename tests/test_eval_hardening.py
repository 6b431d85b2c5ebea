"""Evaluation hardening: ties count against the model, non-finite embeddings are errors, outputs never overwrite
inputs (refused before anything runs), unwritable outputs are found before the evaluation, exported npz files are
checked array by array, and a tiny val split warns.

References are independent: naive float64 loops, ``scipy.stats.rankdata(method="max")``, hand-computed cases.
The CLI is called in-process (``orchestrator.cli.main``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from orchestrator.config import validate_config
from orchestrator.evaluation.recall import fold_metrics, ranks, retrieval_metrics
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree
from tests.test_bad_input import assert_one_line_error, run_cli


# ------------------------------------------------------------------------------------------------ references
def naive_ranks_pessimistic(img: np.ndarray, txt: np.ndarray, owners: np.ndarray) -> tuple[list[int], list[int]]:
    """rank = 1 + #negatives scoring >= the best positive, in float64 Python loops."""
    sim = (np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T).tolist()
    own = [int(x) for x in owners]
    n, m = len(sim), len(own)
    best = [max(sim[i][c] for c in range(m) if own[c] == i) for i in range(n)]
    i2t = [1 + sum(1 for j in range(m) if own[j] != i and sim[i][j] >= best[i]) for i in range(n)]
    t2i = [1 + sum(1 for i in range(n) if i != own[j] and sim[i][j] >= sim[own[j]][j]) for j in range(m)]
    return i2t, t2i


def naive_ranks_optimistic(sim: np.ndarray, owners: np.ndarray) -> tuple[list[int], list[int]]:
    """The old convention (ties in favour): rank = 1 + #candidates scoring strictly above the best positive."""
    s = np.asarray(sim, np.float64).tolist()
    own = [int(x) for x in owners]
    n, m = len(s), len(own)
    best = [max(s[i][c] for c in range(m) if own[c] == i) for i in range(n)]
    i2t = [1 + sum(1 for j in range(m) if s[i][j] > best[i]) for i in range(n)]
    t2i = [1 + sum(1 for i in range(n) if s[i][j] > s[own[j]][j]) for j in range(m)]
    return i2t, t2i


def rankdata_ranks(img: np.ndarray, txt: np.ndarray, owners: np.ndarray) -> tuple[list[int], list[int]]:
    """Sort-based reference: scipy's "max" rank of the best positive among itself and the negatives."""
    sim = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    i2t = []
    for i in range(sim.shape[0]):
        pos, neg = sim[i, owners == i], sim[i, owners != i]
        i2t.append(int(rankdata(-np.r_[pos.max(), neg], method="max")[0]))
    t2i = [int(rankdata(-sim[:, j], method="max")[owners[j]]) for j in range(sim.shape[1])]
    return i2t, t2i


def metrics_from(i2t: list[int], t2i: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    out = {f"i2t_r{k}": 100.0 * sum(r <= k for r in i2t) / len(i2t) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * sum(r <= k for r in t2i) / len(t2i) for k in ks})
    out["rsum"] = sum(out.values())
    return out


def tied_problem(seed: int, counts: list[int]):
    rng = np.random.default_rng(seed)
    owners = np.repeat(np.arange(len(counts)), counts)[rng.permutation(sum(counts))]
    img = rng.integers(-1, 2, size=(len(counts), 3)).astype(np.float64)  # few distinct values: many ties
    txt = rng.integers(-1, 2, size=(len(owners), 3)).astype(np.float64)
    txt[1] = txt[0] if owners[1] == owners[0] else txt[1]
    return img, txt, owners


COUNTS = [1, 3, 2, 5, 1, 4, 2, 2, 6, 1, 3, 2]


# ------------------------------------------------------------------------------------------------ case 2: ties
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_ties_count_against_the_model_like_naive_loops_and_rankdata(seed, chunk_size):
    img, txt, owners = tied_problem(seed, COUNTS * 2)
    sim = img @ txt.T
    # the inputs really tie: many targets share their score with a negative
    targets = sim[owners, np.arange(len(owners))]
    assert ((sim == targets[None, :]).sum(axis=0) > 1).sum() >= 10
    want = naive_ranks_pessimistic(img, txt, owners)
    assert rankdata_ranks(img, txt, owners) == want
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        i2t, t2i = ranks(torch.from_numpy(img).to(dtype), torch.from_numpy(txt).to(dtype), owners, chunk_size)
        assert (i2t.tolist(), t2i.tolist()) == want, dtype
    # and it is not the old convention on these inputs
    assert naive_ranks_optimistic(sim, owners) != want


@pytest.mark.parametrize("kind", ["zeros", "constant"])
def test_degenerate_embeddings_score_zero(kind):
    n, per = 24, 3  # i2t: 69 negatives per image, t2i: 23 (11 in a fold of 12): nothing within the top 10
    owners = np.repeat(np.arange(n), per)
    fill = 0.0 if kind == "zeros" else 0.25
    img, txt = torch.full((n, 8), fill), torch.full((n * per, 8), fill)
    got = retrieval_metrics(img, txt, owners, chunk_size=7)
    assert got["rsum"] == 0.0
    assert got["i2t_medr"] == n * per - per + 1 and got["t2i_medr"] == n
    assert fold_metrics(img, txt, owners, num_folds=2)["rsum"] == 0.0
    # chance level for comparison: random embeddings score well above 0, so the collapsed model is below chance
    g = torch.Generator().manual_seed(0)
    rand = retrieval_metrics(torch.randn(n, 8, generator=g), torch.randn(n * per, 8, generator=g), owners)
    assert rand["rsum"] > got["rsum"]


def test_tied_positives_cost_nothing():
    # duplicate captions of one image (identical embeddings) tie with each other, never with a negative
    img = torch.eye(4)
    owners = np.array([0, 0, 1, 2, 2, 2, 3])
    txt = img[owners].clone()
    got = retrieval_metrics(img, txt, owners)
    assert got["rsum"] == 600.0
    i2t, t2i = ranks(img, txt, owners, chunk_size=1)
    assert i2t.tolist() == [1, 1, 1, 1] and t2i.tolist() == [1] * 7


def test_non_finite_embeddings_are_refused_by_ranks():
    img, txt = torch.randn(4, 3), torch.randn(6, 3)
    owners = np.array([0, 1, 2, 3, 0, 1])
    for bad in (float("nan"), float("inf")):
        broken = img.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match="1 of 4 image embeddings are not finite"):
            ranks(broken, txt, owners)
    with pytest.raises(ValueError, match="6 of 6 caption embeddings are not finite"):
        retrieval_metrics(img, torch.full((6, 3), float("nan")), owners)


# ------------------------------------------------------------------------------------------------ fixtures
VAL_RECORDS = [
    {"image": f"img/v{i}.jpg", "caption": f"caption {c} of image {i}", "image_id": f"v{i}"}
    for i in range(12)
    for c in range(2)
]


@pytest.fixture(scope="module")
def data_ckpt(tmp_path_factory) -> dict[str, Path]:
    """A captions_json dataset (12 val images, 2 captions each), a teacher cache file, and a checkpoint folder of an
    untrained tiny model whose embedded config points at them. Read-only for the tests (they copy what they break)."""
    from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, atomic_save
    from orchestrator.models.student import build_student
    from tests.test_bad_input import data_tree, write_image

    tmp = tmp_path_factory.mktemp("evaldata")
    data = tmp / "data"
    for rec in VAL_RECORDS:
        write_image(data / rec["image"])
    (data / "val.json").write_text(json.dumps(VAL_RECORDS))
    (data / "train.json").write_text(json.dumps(VAL_RECORDS[:4]))
    cache = tmp / "cache"
    (cache / "some-view").mkdir(parents=True)
    (cache / "some-view" / "text.npy").write_bytes(b"cached features")
    tree = data_tree(tmp)
    tree["model"] = {"name": "itr-tiny-vit"}
    tree["teachers"] = {"cache_dir": str(cache)}
    tree["data"]["leakage"] = "warn"
    cfg = validate_config(tree)
    student = build_student(cfg.model, heads=cfg.resolved_heads)
    ckpt = tmp / "ckpt"
    atomic_save({"model": student.model.state_dict(), "config_yaml": cfg.to_yaml(), "epoch": 0}, ckpt / MODEL_FILE)
    atomic_save({"epoch": 0}, ckpt / TRAINING_STATE_FILE)
    return {"root": tmp, "data": data, "cache": cache, "ckpt": ckpt}


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (to show that nothing was written or overwritten)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ case 2: NaN
def test_eval_of_a_nan_checkpoint_is_an_error_naming_split_and_count(data_ckpt, tmp_path):
    ckpt = shutil.copytree(data_ckpt["ckpt"], tmp_path / "nan_ckpt")
    state = torch.load(ckpt / "model.pt", weights_only=True)
    state["model"] = {
        k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state["model"].items()
    }
    torch.save(state, ckpt / "model.pt")
    out = tmp_path / "m.json"
    rc, lines, stdout = run_cli(["eval", "--checkpoint", str(ckpt), "--json", str(out)], tmp_path)
    assert_one_line_error(
        rc,
        lines,
        f"{ckpt / 'model.pt'}: val split: 12 of 12 image embeddings and 24 of 24 caption embeddings are not finite",
    )
    assert not out.exists() and stdout == ""


def test_npz_with_nan_rows_is_an_error_naming_the_array(tmp_path):
    path = tmp_path / "emb.npz"
    img = np.eye(3, dtype=np.float32)
    img[2, 0] = np.nan
    np.savez(
        path,
        image_emb=img,
        text_emb=np.eye(3, dtype=np.float32),
        image_ids=np.array(["a", "b", "c"]),
        text_image_ids=np.array(["a", "b", "c"]),
    )
    rc, lines, _ = run_cli(["eval", "--embeddings", str(path)], tmp_path)
    assert_one_line_error(rc, lines, f"{path}:image_emb: 1 of 3 rows are not finite")


def test_training_whose_model_goes_nan_fails_instead_of_scoring(tmp_path):
    from orchestrator.evaluation.embed import NonFiniteEmbeddingsError

    # one AdamW step at lr 1e30 blows the weights up; the loss of that step was still finite
    cfg = validate_config(
        tiny_tree(
            tmp_path,
            train={
                "epochs": 1,
                "max_steps_per_epoch": 1,
                "lr": 1e30,
                "min_lr": 0.0,
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "eval_at_start": False,
            },
            data={
                "synthetic": {
                    "num_train_images": 16,
                    "num_val_images": 8,
                    "num_test_images": 8,
                    "image_size": 32,
                    "seed": 0,
                }
            },
        )
    )
    session = LocalSession(tmp_path / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    with pytest.raises(NonFiniteEmbeddingsError, match=r"val split: \d+ of 8 image embeddings"):
        train_loop(cfg, session)
    assert session.history == [] and session.best_checkpoint() is None


# ------------------------------------------------------------------------------------------------ case 2: real model
def test_trained_coco_mini_model_metrics_do_not_move(coco_mini, tmp_path):
    """Real-valued embeddings of a trained model do not tie: the new convention gives the old numbers."""
    tree = tiny_tree(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 16, "eval_at_start": False})
    tree["data"] = {"root": str(coco_mini)}
    cfg = validate_config(tree)
    session = LocalSession(tmp_path / "run", best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode)
    train_loop(cfg, session)
    emb_file, js = tmp_path / "emb.npz", tmp_path / "m.json"
    rc, lines, _ = run_cli(
        [
            "eval",
            "--checkpoint",
            str(session.latest_checkpoint()),
            "--export-embeddings",
            str(emb_file),
            "--json",
            str(js),
        ],
        tmp_path,
    )
    assert rc == 0, lines
    got = json.loads(js.read_text())["metrics"]
    data = np.load(emb_file)
    lookup = {x: i for i, x in enumerate(data["image_ids"].tolist())}
    owners = np.array([lookup[x] for x in data["text_image_ids"].tolist()])
    assert len(lookup) == 201 and len(owners) > 201  # the whole coco-mini val split, several captions an image
    # the float32 similarities the evaluation compares (one chunk: 201 images < eval.chunk_size), exact in float64
    sim = (torch.from_numpy(data["image_emb"]) @ torch.from_numpy(data["text_emb"]).T).double().numpy()
    # no ties at all: no target shares its score with any negative (the two conventions differ only there)
    targets_t2i = sim[owners, np.arange(len(owners))]
    ties_t2i = (sim == targets_t2i[None, :]).sum() - len(owners)
    best_i2t = np.array([sim[i, owners == i].max() for i in range(sim.shape[0])])
    negative = owners[None, :] != np.arange(sim.shape[0])[:, None]
    ties_i2t = ((sim == best_i2t[:, None]) & negative).sum()
    assert ties_t2i == 0 and ties_i2t == 0
    want = metrics_from(*naive_ranks_optimistic(sim, owners))
    assert 0 < want["rsum"] < 600  # a real, imperfect score
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert session.history[-1]["val/rsum"] == pytest.approx(want["rsum"], abs=1e-6)  # training's eval too


# ------------------------------------------------------------------------------------------------ case 3: outputs
def refused(data_ckpt, tmp_path, argv: list[str], *needles: str) -> None:
    """``itr eval`` with ``argv`` exits 2 with one line, and no file under the fixture or tmp_path changed."""
    before, before_tmp = contents(data_ckpt["root"]), contents(tmp_path)
    rc, lines, stdout = run_cli(["eval", *argv], tmp_path)
    assert_one_line_error(rc, lines, *needles)
    assert stdout == ""
    assert contents(data_ckpt["root"]) == before
    assert contents(tmp_path) == before_tmp


@pytest.mark.parametrize(
    "target, flag, needle",
    [
        ("ckpt/model.pt", "--export-embeddings", "is an input of this command (the checkpoint)"),
        ("ckpt/state.pt", "--json", "would overwrite a file of the checkpoint folder"),
        ("data/val.json", "--json", "is an input of this command (the val split's annotations)"),
        ("data/train.json", "--export-embeddings", "would overwrite a file of the dataset (data.root)"),
        ("data/img/v3.jpg", "--json", "is an input of this command (a dataset image)"),
        ("cache/some-view/text.npy", "--export-embeddings", "would overwrite a file of the teacher cache"),
    ],
)
def test_an_output_that_is_an_input_is_refused_before_anything_runs(data_ckpt, tmp_path, target, flag, needle):
    out = data_ckpt["root"] / target
    refused(data_ckpt, tmp_path, ["--checkpoint", str(data_ckpt["ckpt"]), flag, str(out)], f"{out}:{flag}: ", needle)


def test_links_to_inputs_and_colliding_outputs_are_refused(data_ckpt, tmp_path):
    val = data_ckpt["data"] / "val.json"
    ckpt = str(data_ckpt["ckpt"])
    (tmp_path / "link.json").symlink_to(val)
    refused(
        data_ckpt,
        tmp_path,
        ["--checkpoint", ckpt, "--json", str(tmp_path / "link.json")],
        "link.json:--json: ",
        "is an input",
    )
    os.link(data_ckpt["ckpt"] / "model.pt", tmp_path / "hard.pt")  # same file, another name (samefile)
    refused(
        data_ckpt,
        tmp_path,
        ["--checkpoint", ckpt, "--export-embeddings", str(tmp_path / "hard.pt")],
        "hard.pt:--export-embeddings: is an input of this command (the checkpoint)",
    )
    os.unlink(tmp_path / "hard.pt")
    refused(
        data_ckpt,
        tmp_path,
        ["--checkpoint", ckpt, "--json", str(tmp_path / "x"), "--export-embeddings", str(tmp_path / "x")],
        "x:--export-embeddings: is also the output of --json",
    )
    refused(
        data_ckpt,
        tmp_path,
        ["--checkpoint", ckpt, "--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "r" / "metrics.json")],
        "metrics.json:--report-dir: is also the output of --json",
    )


def test_embeddings_input_is_not_overwritten(tmp_path):
    emb = tmp_path / "emb.npz"
    np.savez(
        emb,
        image_emb=np.eye(3, dtype=np.float32),
        text_emb=np.eye(3, dtype=np.float32),
        image_ids=np.array(["a", "b", "c"]),
        text_image_ids=np.array(["a", "b", "c"]),
    )
    before = emb.read_bytes()
    rc, lines, _ = run_cli(["eval", "--embeddings", str(emb), "--json", str(emb)], tmp_path)
    assert_one_line_error(rc, lines, f"{emb}:--json: is an input of this command (--embeddings)")
    assert emb.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]


def test_export_to_a_folder_is_refused_and_leaves_no_temp_file(data_ckpt, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    refused(
        data_ckpt,
        tmp_path,
        ["--checkpoint", str(data_ckpt["ckpt"]), "--export-embeddings", str(target)],
        f"{target}:--export-embeddings: is a folder",
    )
    assert list(target.iterdir()) == []


def test_a_good_eval_writes_exactly_its_outputs(data_ckpt, tmp_path):
    before = contents(data_ckpt["root"])
    emb, js = tmp_path / "deep" / "emb.npz", tmp_path / "m.json"
    rc, lines, _ = run_cli(
        ["eval", "--checkpoint", str(data_ckpt["ckpt"]), "--export-embeddings", str(emb), "--json", str(js)], tmp_path
    )
    assert rc == 0, lines
    assert sorted(contents(tmp_path)) == ["deep/emb.npz", "m.json"]  # no temp files, no write-check files
    assert contents(data_ckpt["root"]) == before
    assert json.loads(js.read_text())["metrics"]["rsum"] >= 0
    assert np.load(emb)["image_emb"].shape[0] == 12


def test_atomic_write_removes_its_temp_file_on_every_failure(tmp_path):
    import errno

    from orchestrator.checkpoint import atomic_write
    from orchestrator.errors import UserError

    target = tmp_path / "emb.npz"
    target.write_bytes(b"old")

    def disk_full(fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def bug(fh):
        fh.write(b"partial")
        raise RuntimeError("not an OS error")

    with pytest.raises(UserError, match="cannot write embeddings .No space left on device."):
        atomic_write(target, disk_full, what="embeddings")
    with pytest.raises(RuntimeError):
        atomic_write(target, bug)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["emb.npz"]
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["emb.npz"]


# ------------------------------------------------------------------------------------------------ case 12g
def test_unwritable_outputs_fail_before_the_evaluation(data_ckpt, tmp_path, monkeypatch):
    from orchestrator.evaluation import embed

    encoded = []
    original = embed.encode_split
    monkeypatch.setattr(embed, "encode_split", lambda *a, **k: encoded.append(1) or original(*a, **k))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ok = tmp_path / "ok.npz"
    for flag, target in (
        ("--json", blocker / "m.json"),
        ("--export-embeddings", blocker / "sub" / "e.npz"),
        ("--report-dir", blocker),
    ):
        argv = [
            "--checkpoint",
            str(data_ckpt["ckpt"]),
            "--export-embeddings" if flag != "--export-embeddings" else "--json",
            str(ok),
            flag,
            str(target),
        ]
        refused(data_ckpt, tmp_path, argv, f":{flag}: ")
    assert encoded == []  # refused before the model ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_read_only_folder_fails_before_the_evaluation(data_ckpt, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(
            data_ckpt,
            tmp_path,
            ["--checkpoint", str(data_ckpt["ckpt"]), "--json", str(locked / "m.json")],
            "m.json:--json: cannot write here",
        )
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------------ case 12f
def save_npz(path: Path, **changes) -> Path:
    arrays = {
        "image_emb": np.eye(3, dtype=np.float32),
        "text_emb": np.eye(3, dtype=np.float32),
        "image_ids": np.array(["a", "b", "c"]),
        "text_image_ids": np.array(["a", "b", "c"]),
        **changes,
    }
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize(
    "changes, field, needle",
    [
        ({"image_emb": np.array([np.eye(3), "x", None], dtype=object)}, "image_emb", "an object array"),
        ({"text_image_ids": np.array(["a", 1, None], dtype=object)}, "text_image_ids", "an object array"),
        ({"caption_ids": np.array([{"id": 1}] * 3, dtype=object)}, "caption_ids", "an object array"),
        ({"image_emb": np.array(["x", "y", "z"])}, "image_emb", "expected a 2-D numeric array, got 1-D <U1"),
        ({"text_emb": np.eye(3, 2, dtype=np.float32)}, "text_emb", "2 columns, but image_emb has 3"),
        ({"image_ids": np.array([["a", "b", "c"]])}, "image_ids", "expected a 1-D array"),
        ({"caption_ids": np.array(["1", "2"])}, "caption_ids", "2 ids for 3 captions"),
    ],
)
def test_bad_npz_arrays_are_one_line_errors_naming_file_and_array(tmp_path, changes, field, needle):
    path = save_npz(tmp_path / "emb.npz", **changes)
    rc, lines, stdout = run_cli(["eval", "--embeddings", str(path)], tmp_path)
    assert_one_line_error(rc, lines, f"{path}:{field}: {needle}")
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]


# ------------------------------------------------------------------------------------------------ case 9d
def test_a_tiny_split_warns_and_a_big_one_does_not(tmp_path, caplog):
    from orchestrator.evaluation.embed import MIN_EVAL_IMAGES, warn_small_split

    path = save_npz(
        tmp_path / "one.npz",
        image_emb=np.ones((1, 3), np.float32),
        text_emb=np.ones((2, 3), np.float32),
        image_ids=np.array(["a"]),
        text_image_ids=np.array(["a", "a"]),
    )
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        rc, lines, stdout = run_cli(["eval", "--embeddings", str(path)], tmp_path)
    assert rc == 0 and '"rsum": 600.0' in stdout  # one image: perfect whatever the model, hence the warning
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"{path} has only 1 image: retrieval metrics over fewer than {MIN_EVAL_IMAGES} images are "
        "unreliable; R@1 and above are 100 for any model"
    ]
    assert warn_small_split(MIN_EVAL_IMAGES, "val split") is None
    assert warn_small_split(40, "val split") == (
        f"val split has only 40 images: retrieval metrics over fewer than {MIN_EVAL_IMAGES} images are unreliable"
    )
    assert warn_small_split(8, "val split").endswith("; R@10 and above are 100 for any model")


# ------------------------------------------------------------------------------------------------ case 2: other ranks
def naive_pessimistic_ndcg(scores: np.ndarray, gains: np.ndarray, k: int | None) -> list[float]:
    """Per row: candidates by descending score, equal scores lowest gain first; linear gains, log2 discounts."""
    out = []
    for s, g in zip(scores.tolist(), gains.tolist()):
        kk = len(s) if k is None else min(k, len(s))
        order = sorted(range(len(s)), key=lambda c: (-s[c], g[c]))
        dcg = sum(g[c] / np.log2(r + 2) for r, c in enumerate(order[:kk]))
        idcg = sum(v / np.log2(r + 2) for r, v in enumerate(sorted(g, reverse=True)[:kk]))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return out


def test_ndcg_ties_count_against_the_model():
    from orchestrator.evaluation.graded import ndcg_rows

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, (40, 17)).astype(np.float64)  # heavy ties
    scores[:5] = rng.standard_normal((5, 17))  # and rows without any
    scores[5] = 1.0  # a constant row: the worst ordering
    gains = rng.random((40, 17)) * (rng.random((40, 17)) < 0.5)
    for k in (1, 3, 10, None):
        got = ndcg_rows(torch.from_numpy(scores), torch.from_numpy(gains), k).numpy()
        np.testing.assert_allclose(got, naive_pessimistic_ndcg(scores, gains, k), rtol=0, atol=1e-12)
    worst = naive_pessimistic_ndcg(np.zeros((1, 17)), gains[5:6], 10)[0]
    assert ndcg_rows(torch.from_numpy(scores[5:6]), torch.from_numpy(gains[5:6]), 10).item() == pytest.approx(worst)


def test_graded_metrics_of_a_collapsed_model_are_worst_case_and_tau_zero():
    from orchestrator.evaluation.graded import graded_metrics

    rng = np.random.default_rng(4)
    rel = rng.random((9, 20)) * (rng.random((9, 20)) < 0.5)
    rel[0] = 0.0  # no relevant caption: tau undefined for that query, skipped
    dense = torch.from_numpy(rel)
    got = graded_metrics(
        torch.ones(9, 4, dtype=torch.float64),
        torch.ones(20, 4, dtype=torch.float64),
        lambda im, cap: dense[im][:, cap],
        ks=(5,),
        chunk_size=4,
    )
    zeros = np.zeros_like(rel)
    assert got["i2t_ndcg5"] == pytest.approx(np.mean(naive_pessimistic_ndcg(zeros, rel, 5)), abs=1e-12)
    assert got["t2i_ndcg_all"] == pytest.approx(np.mean(naive_pessimistic_ndcg(zeros.T, rel.T, None)), abs=1e-12)
    assert got["i2t_kendall_tau"] == 0.0 and got["t2i_kendall_tau"] == 0.0


def test_image_retrieval_ties_count_against_the_model():
    from orchestrator.evaluation.unimodal import image_retrieval_recall

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 30)
    labels[-1] = 9  # a class of one image: that query never hits
    emb = rng.integers(-1, 2, (30, 3)).astype(np.float64)
    sim = emb @ emb.T
    want = {}
    for k in (1, 3, 10):
        hits = 0
        for i in range(30):
            pos = [sim[i, j] for j in range(30) if j != i and labels[j] == labels[i]]
            if pos:
                hits += 1 + sum(1 for j in range(30) if labels[j] != labels[i] and sim[i, j] >= max(pos)) <= k
        want[f"image_r{k}"] = 100.0 * hits / 30
    for chunk_size in (4, 1024):
        got = image_retrieval_recall(torch.from_numpy(emb), labels, ks=(1, 3, 10), chunk_size=chunk_size)
        assert got == pytest.approx(want, abs=1e-12)
    assert image_retrieval_recall(torch.ones(30, 3), labels, ks=(1, 5))["image_r5"] == 0.0  # collapsed: 0, not 100
    with pytest.raises(ValueError, match="1 of 30 image embeddings are not finite"):
        image_retrieval_recall(torch.from_numpy(np.where(np.arange(30)[:, None] == 2, np.nan, emb)), labels)
