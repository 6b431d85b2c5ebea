"""Teacher inputs as untrusted data: pickled feature files, the teacher cache folder, non-finite features.

* a ``.npy`` whose pickle would run code is never unpickled: ``itr train`` (``teachers.image: file:``) and
  ``itr convert-features`` both exit 2 with one line, and the code never runs (a marker file never appears);
* the CUSA authors' ``{id: array}`` dicts convert to the ``.npz (ids, features)`` layout, values unchanged;
* ``teachers.cache_dir`` that cannot be written fails before anything is computed;
* NaN / inf teacher features fail when loaded, naming the file.

The CLI runs in-process (``orchestrator.cli.main``).
"""

from __future__ import annotations

import ast
import functools
import io
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import TeachersConfig
from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.errors import UserError
from orchestrator.teachers import extract_split
from orchestrator.teachers.safe_pickle import RefusedPickle, RestrictedUnpickler
from tests.test_bad_input import assert_one_line_error, base_tree, run_cli, snapshot
from tests.test_security import _calls, _dotted, _kw, _sources


# ---------------------------------------------------------------------------------------------- helpers
class _MakesMarker:
    """Unpickling this calls ``io.open(marker, "w")``: a visible, harmless side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


def write_evil_npy(path: Path, marker: Path) -> None:
    """A ``.npy`` that ``np.load(allow_pickle=True)`` turns into a call of ``io.open(marker, "w")``."""
    arr = np.empty((), dtype=object)
    arr[()] = {"img-0": _MakesMarker(marker)}
    np.save(path, arr, allow_pickle=True)


def write_numpy1_npy(path: Path, obj: dict) -> None:
    """``np.save(path, obj)`` as numpy 1.x wrote it (protocol 3, ``numpy.core.multiarray`` globals)."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    payload = pickle.dumps(arr, protocol=3).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    globals_used = {arg for op, arg, _ in pickletools.genops(payload) if op.name == "GLOBAL"}
    assert "numpy.core.multiarray _reconstruct" in globals_used, globals_used
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(payload)


def teacher_tree(tmp: Path, **teachers: object) -> dict:
    """``base_tree`` with CUSA (needs teacher features) and ``teachers`` under ``tmp``."""
    tree = base_tree(tmp)
    tree["loss"] = {"family": "cusa"}
    tree["train"].update(max_steps_per_epoch=1, eval_at_start=False)
    tree["eval"] = {"reports": False}
    tree["teachers"] = {"cache_dir": str(tmp / "cache"), **teachers}
    return tree


def write_config(tmp: Path, tree: dict) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ------------------------------------------------------------------------------------ pickled .npy files
def test_train_with_a_pickled_teacher_file_never_unpickles_it(tmp_path):
    marker, evil = tmp_path / "MARKER", tmp_path / "evil.npy"
    write_evil_npy(evil, marker)
    cfg = write_config(tmp_path, teacher_tree(tmp_path, image=f"file:{evil}", text="synthetic:attributes"))
    rc, lines, _ = run_cli(["train", str(cfg)], tmp_path)
    line = assert_one_line_error(
        rc, lines, f"{evil}:teachers.image:", "holds a pickle", f"itr convert-features {evil} {tmp_path / 'evil.npz'}"
    )
    assert not marker.exists(), f"code from the feature file ran ({line})"


def test_convert_features_refuses_a_pickle_that_calls_anything(tmp_path):
    marker, evil, out = tmp_path / "MARKER", tmp_path / "evil.npy", tmp_path / "evil.npz"
    write_evil_npy(evil, marker)
    before = snapshot(tmp_path)
    rc, lines, stdout = run_cli(["convert-features", str(evil), str(out)], tmp_path)
    assert_one_line_error(rc, lines, f"{evil}: refused to unpickle io.open", "nothing from the file was run")
    assert not marker.exists()
    assert snapshot(tmp_path) == before and stdout == ""


@pytest.mark.parametrize(
    "module,name",
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "frombuffer"),
        ("io", "open"),
    ],
)
def test_restricted_unpickler_resolves_no_other_global(module, name):
    with pytest.raises(RefusedPickle, match=f"refused to unpickle {module}.{name}"):
        RestrictedUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_cusa_dict_converts_to_npz_with_the_same_values(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(5, 6)).astype(np.float32)
    # ids as the CUSA files have them (str, int, numpy int); (1, D) and (D,) rows; one float16 row
    keys = ["img-a", 17, np.int64(42), "img-b", 7]
    table = {k: (raw[i][None, :] if i % 2 == 0 else raw[i]) for i, k in enumerate(keys)}
    table["img-b"] = raw[3].astype(np.float16)
    src, out = tmp_path / "train_unicom.npy", tmp_path / "train_unicom.npz"
    write_numpy1_npy(src, table)
    rc, lines, stdout = run_cli(["convert-features", str(src), str(out)], tmp_path)
    assert (rc, lines) == (0, []), lines
    assert f"wrote 5 teacher features (D=6) to {out}" in stdout
    with np.load(out, allow_pickle=False) as z:
        assert z["ids"].tolist() == ["img-a", "17", "42", "img-b", "7"]
        expected = raw.copy()
        expected[3] = raw[3].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(z["features"], expected)
        assert z["features"].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_unicom.npy", "train_unicom.npz"]


def test_convert_features_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "f.npz"
    np.savez(src, ids=np.asarray(["a"]), features=np.ones((1, 2), np.float32))
    before = src.read_bytes()
    rc, lines, _ = run_cli(["convert-features", str(src), str(src)], tmp_path)
    assert_one_line_error(rc, lines, f"{src}: the output is the input file")
    assert src.read_bytes() == before


def test_file_teacher_with_nan_features_names_the_file(tmp_path):
    syn = build_synthetic_split("val", num_images=4, image_size=16)
    feats = np.ones((4, 3), np.float32)
    feats[[1, 3], 2] = [np.nan, np.inf]
    path = tmp_path / "feats.npz"
    np.savez(path, ids=np.asarray(syn.image_ids), features=feats)
    cfg = TeachersConfig(image=f"file:{path}", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError) as err:
        extract_split(cfg, syn, progress=False)
    assert str(err.value).startswith(f"{path}:teachers.image: 2 of 4 teacher features are not finite"), err.value
    assert not list((tmp_path / "cache").rglob("features.npy"))


# ------------------------------------------------------------------------------------------ cache folder
@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_unwritable_cache_dir_fails_before_anything_is_computed(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cache = blocker / "cache" if where == "under_a_file" else Path("/proc/itr-teacher-cache")
    tree = teacher_tree(tmp_path, image="synthetic:attributes", text="synthetic:attributes")
    tree["teachers"]["cache_dir"] = str(cache)
    cfg = write_config(tmp_path, tree)
    before = snapshot(tmp_path)
    for command in ("teachers", "train"):
        rc, lines, stdout = run_cli([command, str(cfg)], tmp_path)
        assert_one_line_error(rc, lines, f"error: {cache}:teachers.cache_dir: ")
        assert snapshot(tmp_path) == before, command  # no MLflow run, no run folder, no features
        assert stdout == ""


# --------------------------------------------------------------------------------------- non-finite cache
def test_all_nan_teacher_cache_fails_when_opened_naming_the_file(tmp_path):
    tree = teacher_tree(tmp_path, image="synthetic:attributes", text="synthetic:attributes")
    cfg = write_config(tmp_path, tree)
    rc, lines, _ = run_cli(["teachers", str(cfg), "--splits", "train"], tmp_path)
    assert rc == 0, lines
    views = sorted((tmp_path / "cache").glob("image-*/views/*/features.npy"))
    assert len(views) == 1, views
    poisoned = np.lib.format.open_memmap(views[0], mode="r+")
    rows = poisoned.shape[0]
    poisoned[:] = np.nan
    poisoned.flush()
    del poisoned
    rc, lines, _ = run_cli(["train", str(cfg)], tmp_path)
    assert_one_line_error(
        rc, lines, f"error: {views[0]}:teachers.image: {rows} of {rows} teacher features are not finite"
    )
    assert "NonFiniteLoss" not in lines[0]


def test_nonfinite_count_is_exact_across_blocks():
    from orchestrator.teachers.cache import count_nonfinite_rows

    x = np.zeros((1000, 4), np.float32)
    x[[0, 511, 512, 999], [0, 3, 1, 2]] = [np.nan, np.inf, -np.inf, np.nan]
    x[700] = 3e38  # finite, but the block's float32 sum would overflow
    assert count_nonfinite_rows(x, block_rows=256) == (4, 0)
    assert count_nonfinite_rows(x[1:], block_rows=256) == (3, 510)
    assert count_nonfinite_rows(x[1:511]) == (0, None)


# ---------------------------------------------------------------------------------------------- audits
ALLOWED_UNPICKLING = {
    # the restricted unpickler itself
    "orchestrator/teachers/safe_pickle.py",
    # Ray Tune's own error file of a trial, written by Ray into the sweep's storage (the trust Ray already
    # asks for: it unpickles tuner.pkl and the trial state from the same folder on --resume)
    "orchestrator/sweep/ray_compat.py",
}


@functools.lru_cache(maxsize=1)
def _parsed() -> tuple:
    """(path, AST) of every module of orchestrator/ and methods/, parsed once for both audits."""
    return tuple(_sources("orchestrator", "methods"))


def test_every_np_load_refuses_pickles():
    calls = [(p, c) for p, tree in _parsed() for c in _calls(tree, "np.load") + _calls(tree, "numpy.load")]
    assert len(calls) >= 4, calls
    for path, call in calls:
        value = _kw(call, "allow_pickle")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
            f"{path}:{call.lineno}: np.load(allow_pickle=...)"
        )


def test_only_the_restricted_unpickler_unpickles():
    repo = Path(__file__).resolve().parent.parent
    found = []
    for path, tree in _parsed():
        for node in ast.walk(tree):
            name = _dotted(node.func) if isinstance(node, ast.Call) else ""
            bases = [_dotted(b) for b in node.bases] if isinstance(node, ast.ClassDef) else []
            if name.endswith(
                (
                    "pickle.load",
                    "pickle.loads",
                    "pickle.Unpickler",
                    "torch.load",
                    "joblib.load",
                    "dill.load",
                    "dill.loads",
                    "shelve.open",
                    "marshal.loads",
                )
            ) and not (
                name.endswith("torch.load")
                and isinstance(_kw(node, "weights_only"), ast.Constant)
                and _kw(node, "weights_only").value is True
            ):
                found.append((str(path.relative_to(repo)), node.lineno, name))
            found.extend((str(path.relative_to(repo)), node.lineno, b) for b in bases if b.endswith("Unpickler"))
    outside = [f for f in found if f[0] not in ALLOWED_UNPICKLING]
    assert not outside, outside
    assert any(f[0] == "orchestrator/teachers/safe_pickle.py" for f in found)


class _HalfNanTextTeacher:
    """A text teacher (the encoder interface, real code of its own) whose every other caption encodes to NaN."""

    spec, modality, inputs, cacheable = "test:half-nan", "text", "text", True
    identity, preprocessing = "test:half-nan|text|sha256:0", "none"

    def bind(self, index):
        return self

    def encode(self, captions):
        out = np.ones((len(captions), 4), np.float32) / 2.0
        out[1::2] = np.nan
        return out


def test_teacher_emitting_nan_fails_before_caching_anything(tmp_path):
    """The extraction stops at the first batch holding NaN: the shared cache gets no shard and no view."""
    from orchestrator.teachers.extract import extract_modality

    syn = build_synthetic_split("val", num_images=3, image_size=16)
    with pytest.raises(UserError) as err:
        extract_modality(_HalfNanTextTeacher(), syn, tmp_path / "cache", batch_size=4, progress=False)
    assert str(err.value).startswith(
        "teachers.text: teacher test:half-nan returned 2 of 4 features that are not finite"
    ), err.value
    assert not list((tmp_path / "cache").rglob("*.npy")), list((tmp_path / "cache").rglob("*"))
