"""Bad input end to end: exit code 2, ONE stderr line naming the file and the field / record, no traceback,
nothing half-written. Configs (property-based and by hand), dataset files (captions_json, karpathy), teacher
caches and checkpoints of another architecture.

The CLI is called in-process (``orchestrator.cli.main``); one case runs it as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.cli import main
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers
def run_cli(argv: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """(exit code, non-empty stderr lines, stdout) of ``itr argv`` run in-process with ``cwd`` as working dir."""
    err, out = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    finally:
        os.chdir(old)
    return rc, [line for line in err.getvalue().splitlines() if line.strip()], out.getvalue()


def assert_one_line_error(rc: int, lines: list[str], *needles: str) -> str:
    """Exit 2, exactly one ``error: path:field: message`` line mentioning every needle, no traceback."""
    assert rc == 2, (rc, lines)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in line and "(run with --debug" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def base_tree(tmp: Path) -> dict[str, Any]:
    """A valid, tiny config that would write only under ``tmp`` (runs/, mlflow.db)."""
    return {
        "data": {
            "format": "synthetic",
            "synthetic": {"num_train_images": 16, "num_val_images": 8, "num_test_images": 8, "image_size": 16},
        },
        "model": {"name": "itr-tiny-vit"},
        "loss": {"family": "infonce"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-5, "output_dir": str(tmp / "runs")},
        "scaling": {"backend": "local"},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_dir": str(tmp / "mlartifacts")},
    }


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def train_bad_config(tree: dict[str, Any], *needles: str, overrides: tuple[str, ...] = ()) -> str:
    """Write ``tree`` to a fresh folder, ``itr train`` it, check the one-line error and that nothing appeared."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cfg = tmp / "bad.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        before = snapshot(tmp)
        argv = ["train", str(cfg)] + [a for o in overrides for a in ("--set", o)]
        rc, lines, out = run_cli(argv, tmp)
        line = assert_one_line_error(rc, lines, str(cfg), *needles)
        assert snapshot(tmp) == before, "a failed validation wrote files"
        assert not (REPO / "mlflow.db").exists() or True  # the repo's own store is not ours to check
        assert out == ""
        return line


# ------------------------------------------------------------------------------------- configs: properties
POSITIVE_INT_FIELDS = [
    "train.epochs",
    "train.eval_every",
    "train.log_every_steps",
    "eval.batch_size",
    "eval.chunk_size",
    "scaling.num_workers",
    "data.synthetic.num_train_images",
    "data.synthetic.num_val_images",
    "teachers.batch_size",
    "teachers.num_actors",
]
POSITIVE_FLOAT_FIELDS = ["train.lr", "scaling.cpus_per_worker", "train.grad_clip"]
NONNEG_FLOAT_FIELDS = ["train.weight_decay", "train.min_lr"]
SECTIONS = ["data", "model", "loss", "teachers", "train", "scaling", "eval", "tracking", "data.synthetic"]
KNOWN_KEYS = {
    "format",
    "root",
    "annotations",
    "name",
    "family",
    "epochs",
    "lr",
    "seed",
    "enabled",
    "uri",
    "image",
    "text",
    "backend",
    "splits",
    "ks",
    "tags",
    "experiment",
    "chunk_size",
    "batch_size",
}

not_a_number = st.one_of(
    st.text(alphabet="abcxyz", min_size=1, max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), min_size=1, max_size=1),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(POSITIVE_INT_FIELDS),
    value=st.one_of(st.integers(max_value=0), not_a_number, st.floats(min_value=0.1, max_value=9.9)),
)
def test_nonpositive_or_wrong_type_int_field(field, value):
    if isinstance(value, float) and value.is_integer():
        value += 0.5
    with tempfile.TemporaryDirectory() as tmp:
        tree = base_tree(Path(tmp))
    set_path(tree, field, value)
    train_bad_config(tree, f":{field}:")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(POSITIVE_FLOAT_FIELDS + NONNEG_FLOAT_FIELDS),
    value=st.one_of(
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
        not_a_number,
    ),
)
def test_nan_negative_or_wrong_type_float_field(field, value):
    with tempfile.TemporaryDirectory() as tmp:
        tree = base_tree(Path(tmp))
    set_path(tree, field, value)
    train_bad_config(tree, f":{field}:")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    section=st.sampled_from(SECTIONS),
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12).filter(
        lambda k: k not in KNOWN_KEYS and not k.startswith("_")
    ),
    value=st.one_of(st.integers(), st.text(max_size=5), st.booleans()),
)
def test_unknown_key_is_named(section, key, value):
    with tempfile.TemporaryDirectory() as tmp:
        tree = base_tree(Path(tmp))
    node = tree
    for part in section.split("."):
        node = node.setdefault(part, {})
    if key in node or (section == "loss"):
        node = tree.setdefault("train", {})
        section = "train"
        if key in node:
            return
    node[key] = value
    line = train_bad_config(tree, f":{section}.{key}: unknown key")
    assert line.count("\n") == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(["train.lr", "train.batch_size", "train.epochs", "loss.temperature.init", "eval.chunk_size"]),
    text=st.sampled_from([".nan", "-1", "0", "abc", "[1, 2]", "-.inf"]),
)
def test_bad_override_is_named_and_marked(field, text):
    with tempfile.TemporaryDirectory() as tmp:
        tree = base_tree(Path(tmp))
    if text == "-1" and field == "loss.temperature.init":
        text = "-0.5"
    line = train_bad_config(tree, f":{field}:", "(from --set)", overrides=(f"{field}={text}",))
    assert "from --set" in line


# --------------------------------------------------------------------------------------- configs: by hand
@pytest.mark.parametrize(
    "mutate,needles",
    [
        (lambda t: set_path(t, "train.betas", [float("nan"), 0.9]), ["train.betas"]),
        (lambda t: set_path(t, "loss.family", "no_such_family"), ["loss"]),
        (lambda t: set_path(t, "loss.temperature", {"init": 0.05, "min": 0.2, "max": 0.1}), ["loss.temperature"]),
        (lambda t: set_path(t, "train.batch_size", 1), ["train.batch_size"]),
        (lambda t: set_path(t, "data.synthetic.captions_per_image", [0, 3]), ["data.synthetic.captions_per_image"]),
        (lambda t: set_path(t, "data.synthetic.captions_per_image", [4, 2]), ["data.synthetic.captions_per_image"]),
        (lambda t: set_path(t, "data.synthetic.image_size", 8), ["data.synthetic.image_size"]),
        (lambda t: set_path(t, "eval.ks", [0, 5]), ["eval.ks"]),
        (lambda t: set_path(t, "train.min_lr", 1.0), ["train.min_lr"]),
        (lambda t: set_path(t, "train.best_metric", "test/rsum"), ["train.best_metric"]),
        (lambda t: set_path(t, "data.root", "/nonexistent/folder"), ["data.root", "does not exist"]),
        (lambda t: set_path(t, "model", "ViT-B-32"), ["model"]),
        (lambda t: set_path(t, "tracking.tags", {"a": [1, 2]}), ["tracking.tags.a"]),
        (lambda t: set_path(t, "scaling.use_gpu", "sometimes"), ["scaling.use_gpu"]),
    ],
)
def test_hand_written_bad_configs(tmp_path, mutate, needles):
    tree = base_tree(tmp_path)
    mutate(tree)
    train_bad_config(tree, *needles)


def test_not_yaml_and_not_a_mapping(tmp_path):
    for text, needle in (
        ("train: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("train:\n  lr: 1\n lr: 2\n", "not valid YAML"),
    ):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        rc, lines, _ = run_cli(["train", str(cfg)], tmp_path)
        assert_one_line_error(rc, lines, str(cfg), needle)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    rc, lines, _ = run_cli(["train", str(tmp_path / "bin.yaml")], tmp_path)
    assert_one_line_error(rc, lines, "bin.yaml", "UTF-8")
    assert snapshot(tmp_path) == {"bad.yaml", "bin.yaml"}


def test_subprocess_bad_config_one_line_no_traceback(tmp_path):
    tree = base_tree(tmp_path)
    set_path(tree, "train.lr", -1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", str(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert_one_line_error(proc.returncode, lines, f"{cfg}:train.lr:", "greater than 0")
    assert proc.stdout == ""
    assert snapshot(tmp_path) == {"bad.yaml"}


# ------------------------------------------------------------------------------------------ dataset files
def write_image(path: Path, kind: str = "ok") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "ok":
        Image.fromarray(np.full((20, 24, 3), 128, dtype=np.uint8)).save(path)
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "text":
        path.write_text("this is not an image")
    elif kind == "empty":
        path.write_bytes(b"")


def good_records() -> list[dict[str, Any]]:
    return [
        {"image": "img/a.jpg", "caption": "a red square", "image_id": "a"},
        {"image": "img/a.jpg", "caption": "a square that is red", "image_id": "a"},
        {"image": "img/b.jpg", "caption": "a blue circle", "image_id": "b"},
    ]


def data_tree(tmp: Path, **data: Any) -> dict[str, Any]:
    tree = base_tree(tmp)
    tree["data"] = {"format": "captions_json", "root": str(tmp / "data"), **data}
    tree["tracking"] = {"enabled": False}
    return tree


def train_bad_dataset(tmp: Path, tree: dict[str, Any], *needles: str) -> str:
    """``itr train`` on a dataset that must be rejected before anything runs or is written."""
    cfg = tmp / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    before = snapshot(tmp)
    rc, lines, _ = run_cli(["train", str(cfg)], tmp)
    line = assert_one_line_error(rc, lines, *needles)
    assert snapshot(tmp) == before, sorted(snapshot(tmp) - before)
    return line


CAPTIONS_JSON_CASES = {
    # name: (train.json content (text or records), image kinds, verify mode, needles)
    "empty_file": ("", {}, "header", ["train.json", "not valid JSON"]),
    "not_json": ("{'image': nope", {}, "header", ["train.json", "not valid JSON"]),
    "empty_list": ([], {}, "header", ["train.json", "no records"]),
    "object_not_list": ({"images": []}, {}, "header", ["train.json", "expected a JSON list"]),
    "record_not_object": (["x"], {}, "header", ["train.json:[0]", "not an object"]),
    "missing_caption": ([{"image": "img/a.jpg", "image_id": "a"}], {}, "header", ["train.json:[0].caption", "missing"]),
    "missing_image": ([{"caption": "c", "image_id": "a"}], {}, "header", ["train.json:[0].image", "missing"]),
    "missing_image_id": ([{"caption": "c", "image": "img/a.jpg"}], {}, "header", ["train.json:[0].image_id"]),
    "caption_empty": (lambda r: r[1].update(caption="  "), {}, "header", ["train.json:[1].caption", "empty"]),
    "caption_punct_only": (lambda r: r[2].update(caption="?!,"), {}, "header", ["train.json:[2].caption", "empty"]),
    "caption_number": (lambda r: r[1].update(caption=42), {}, "header", ["train.json:[1].caption", "not text"]),
    "caption_list": (lambda r: r[0].update(caption=["a"]), {}, "header", ["train.json:[0].caption", "not text"]),
    "caption_null": (lambda r: r[0].update(caption=None), {}, "header", ["train.json:[0].caption", "not text"]),
    "image_id_null": (lambda r: r[2].update(image_id=None), {}, "header", ["train.json:[2].image_id"]),
    "image_id_bool": (lambda r: r[2].update(image_id=True), {}, "header", ["train.json:[2].image_id"]),
    "image_not_string": (lambda r: r[2].update(image=3), {}, "header", ["train.json:[2].image"]),
    "duplicate_id_two_files": (
        lambda r: r[2].update(image_id="a"),
        {},
        "header",
        ["train.json:[2].image", "names two files"],
    ),
    "image_file_missing": (None, {"a.jpg": "ok"}, "exists", ["b.jpg", "image file not found"]),
    "image_not_image": (None, {"a.jpg": "ok", "b.jpg": "text"}, "header", ["b.jpg", "not a readable image"]),
    "image_empty_file": (None, {"a.jpg": "empty", "b.jpg": "ok"}, "header", ["a.jpg", "not a readable image"]),
    "image_truncated": (None, {"a.jpg": "ok", "b.jpg": "truncated"}, "full", ["b.jpg", "not a readable image"]),
}


@pytest.mark.parametrize("case", sorted(CAPTIONS_JSON_CASES))
def test_bad_captions_json(tmp_path, case):
    content, images, verify, needles = CAPTIONS_JSON_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, kind in (images or {"a.jpg": "ok", "b.jpg": "ok"}).items():
        write_image(data / "img" / name, kind)
    records = good_records()
    if callable(content):
        content(records)
        content = records
    elif content is None:
        content = records
    (data / "train.json").write_text(content if isinstance(content, str) else json.dumps(content))
    (data / "val.json").write_text(json.dumps(good_records()))
    train_bad_dataset(tmp_path, data_tree(tmp_path, verify_images=verify), *needles)


def test_missing_split_file_names_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    line = train_bad_dataset(tmp_path, data_tree(tmp_path, train_split="nosuch"), "nosuch.json", "data.root")
    assert "not found" in line


def karpathy_tree() -> dict[str, Any]:
    return {
        "images": [
            {
                "filename": "a.jpg",
                "filepath": "img",
                "cocoid": 1,
                "split": "train",
                "sentences": [{"raw": "A red square.", "sentid": 10}, {"raw": "Red square", "sentid": 11}],
            },
            {
                "filename": "b.jpg",
                "filepath": "img",
                "cocoid": 2,
                "split": "restval",
                "sentences": [{"raw": "A blue circle.", "sentid": 12}],
            },
            {
                "filename": "c.jpg",
                "filepath": "img",
                "cocoid": 3,
                "split": "val",
                "sentences": [{"raw": "A green star.", "sentid": 13}],
            },
        ]
    }


KARPATHY_CASES = {
    "empty_file": ("", ["dataset.json", "not valid JSON"]),
    "truncated_json": ('{"images": [{"filename": ', ["dataset.json", "not valid JSON"]),
    "list_not_object": ([], ["dataset.json", "expected an object with an 'images' list"]),
    "no_images_in_split": (lambda t: [i.update(split="test") for i in t["images"]], ["dataset.json", "no images"]),
    "missing_sentences": (lambda t: t["images"][1].pop("sentences"), ["dataset.json:images[1].sentences", "missing"]),
    "missing_filename": (lambda t: t["images"][0].pop("filename"), ["dataset.json:images[0].filename", "missing"]),
    "empty_sentences": (lambda t: t["images"][0].update(sentences=[]), ["dataset.json:images[0].sentences"]),
    "sentence_without_raw": (
        lambda t: t["images"][0]["sentences"][1].pop("raw"),
        ["dataset.json:images[0].sentences[1].raw", "missing"],
    ),
    "raw_not_text": (
        lambda t: t["images"][1]["sentences"][0].update(raw=5),
        ["dataset.json:images[1].sentences[0].raw", "not text"],
    ),
    "raw_empty": (
        lambda t: t["images"][0]["sentences"][0].update(raw=" ... "),
        ["dataset.json:images[0].sentences[0].raw", "empty"],
    ),
    "duplicate_cocoid": (lambda t: t["images"][1].update(cocoid=1), ["dataset.json:images[1]", "duplicate image id"]),
    "image_entry_not_object": (lambda t: t["images"].insert(0, "x"), ["dataset.json:images[0]", "not an object"]),
    "duplicate_sentid": (
        lambda t: t["images"][1]["sentences"][0].update(sentid=10),
        ["dataset.json:images[1].sentences[0].sentid", "duplicate sentid"],
    ),
}


@pytest.mark.parametrize("case", sorted(KARPATHY_CASES))
def test_bad_karpathy(tmp_path, case):
    content, needles = KARPATHY_CASES[case]
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(tmp_path / "data" / "img" / name)
    tree = karpathy_tree()
    if callable(content):
        content(tree)
        content = tree
    ann = tmp_path / "dataset.json"
    ann.write_text(content if isinstance(content, str) else json.dumps(content))
    exp = data_tree(tmp_path, format="karpathy", annotations=str(ann))
    exp["eval"] = {"splits": ["val"]}
    train_bad_dataset(tmp_path, exp, *needles)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "image": st.one_of(st.just("img/a.jpg"), st.integers(), st.none()),
                    "caption": st.one_of(st.text(max_size=8), st.integers(), st.none()),
                    "image_id": st.one_of(st.text(max_size=3), st.integers(), st.booleans()),
                },
            ),
            st.integers(),
            st.text(max_size=3),
        ),
        min_size=0,
        max_size=4,
    )
)
def test_arbitrary_captions_json_records_fail_cleanly_or_load(records):
    """Whatever the records, the reader returns an index or raises a one-line UserError naming the file."""
    from orchestrator.data.formats import read_captions_json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        path.write_text(json.dumps(records))
        try:
            index = read_captions_json(path, name="t")
        except UserError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)
            return
        assert index.num_captions == len(records) and all(isinstance(c, str) and c for c in index.captions)


# ---------------------------------------------------------------------------------------- teacher caches
def _tiny_index(name: str, captions: list[str]):
    from orchestrator.data.index import DatasetIndex

    return DatasetIndex(
        name=name,
        image_ids=["x", "y"],
        captions=captions,
        caption_image=np.array([0, 0, 1]),
        renderer=lambda i: Image.new("RGB", (8, 8)),
    )


def test_teacher_view_of_another_dataset_or_wrong_shape(tmp_path):
    from orchestrator.teachers.cache import open_view, write_view

    index = _tiny_index("a", ["one", "two", "three"])
    other = _tiny_index("b", ["uno", "dos", "tres"])
    view = tmp_path / "view"
    write_view(
        view,
        np.ones((3, 4), np.float32),
        index=index,
        modality="text",
        identity="t",
        spec="s",
        preprocessing="p",
        digest="d",
    )
    assert open_view(view, index, modality="text").shape == (3, 4)
    with pytest.raises(UserError) as info:
        open_view(view, other, modality="text")
    assert str(info.value).startswith(f"{view / 'features.npy'}: ") and "another dataset" in str(info.value)
    with pytest.raises(UserError, match="not image features"):
        open_view(view, index, modality="image")
    np.save(view / "features.npy", np.ones((2, 4), np.float32))  # a row short
    with pytest.raises(UserError) as info:
        open_view(view, index, modality="text")
    assert "shape (2, 4)" in str(info.value) and str(view) in str(info.value) and "\n" not in str(info.value)
    np.save(view / "features.npy", np.ones((3, 4), np.float64))
    with pytest.raises(UserError, match="float32"):
        open_view(view, index, modality="text")
    (view / "features.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="unreadable teacher features"):
        open_view(view, index, modality="text")
    (view / "meta.json").write_text("{nope")
    with pytest.raises(UserError, match=r"meta\.json: unreadable meta\.json"):
        open_view(view, index, modality="text")


def test_check_features_other_dataset_and_wrong_shape():
    from orchestrator.teachers.extract import SplitTeacherFeatures, check_features

    index = _tiny_index("a", ["one", "two", "three"])
    other = _tiny_index("b", ["uno", "dos", "tres"])
    feats = SplitTeacherFeatures(index_name="b", content_hash=other.content_hash(), text=np.ones((3, 4), np.float32))
    with pytest.raises(UserError, match=r"^teachers: teacher features were computed for another dataset"):
        check_features(feats, index)
    feats = SplitTeacherFeatures(index_name="a", content_hash=index.content_hash(), image=np.ones((3, 4), np.float32))
    with pytest.raises(UserError, match=r"teachers: image teacher features have shape \(3, 4\), expected \(2, D\)"):
        check_features(feats, index)
    check_features(
        SplitTeacherFeatures(
            index_name="a",
            content_hash=index.content_hash(),
            image=np.ones((2, 4), np.float32),
            text=np.ones((3, 5), np.float32),
        ),
        index,
    )


# --------------------------------------------------------------------------------------------- checkpoints
def test_eval_checkpoint_of_another_architecture(tmp_path):
    import torch

    from orchestrator.checkpoint import MODEL_FILE, atomic_save
    from orchestrator.config import validate_config
    from orchestrator.models.student import build_student

    small = validate_config(
        {
            "data": {
                "format": "synthetic",
                "synthetic": {"num_train_images": 8, "num_val_images": 8, "num_test_images": 8, "image_size": 16},
            },
            "model": {"name": "itr-small-vit"},
        }
    )
    tiny = build_student(validate_config({"model": {"name": "itr-tiny-vit"}}).model)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    atomic_save(
        {"model": tiny.model.state_dict(), "model_name": "itr-small-vit", "config_yaml": small.to_yaml(), "epoch": 0},
        ckpt / MODEL_FILE,
    )
    before = snapshot(tmp_path)
    rc, lines, _ = run_cli(["eval", "--checkpoint", str(ckpt), "--json", str(tmp_path / "m.json")], tmp_path)
    assert_one_line_error(rc, lines, f"{ckpt / MODEL_FILE}:", "does not fit model 'itr-small-vit'")
    assert snapshot(tmp_path) == before
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    rc, lines, _ = run_cli(["eval", "--checkpoint", str(tmp_path / "foreign.pt")], tmp_path)
    assert_one_line_error(rc, lines, "foreign.pt", "not a model checkpoint")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    rc, lines, _ = run_cli(["eval", "--checkpoint", str(tmp_path / "garbage.pt")], tmp_path)
    assert_one_line_error(rc, lines, "garbage.pt")
