"""The decoded-image cache (``data.image_cache: decoded``): exact pixels, content addressing, crash safety, no
JPEG opened once it is built, and bad input."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_tree
from PIL import Image
from test_bad_input import assert_one_line_error, run_cli

from orchestrator.config import DataConfig, ExperimentConfig, ModelConfig
from orchestrator.data import image_cache_build
from orchestrator.data.image_cache import (
    DecodedImages,
    DecodeImages,
    PixelStore,
    decoded_images,
    image_input,
    prepare_image_cache,
)
from orchestrator.data.loader import ImageTensorCache
from orchestrator.data.pixels import split_preprocess
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError
from orchestrator.models.student import build_student


# ------------------------------------------------------------------------------------------------ helpers
def coco_subset(root: Path, coco: Path, n_train: int, n_val: int = 0) -> Path:
    """A captions_json dataset of the first ``n_train`` (+ ``n_val``) coco-mini train images, copied into ``root``
    (so tests may change or break files), all their captions."""
    records = json.loads((coco / "train.json").read_text())
    order: list[str] = []
    for rec in records:
        if rec["image"] not in order:
            order.append(rec["image"])
    (root / "images").mkdir(parents=True)
    for split, chosen in (("train", order[:n_train]), ("val", order[n_train : n_train + n_val])):
        if not chosen:
            continue
        for rel in chosen:
            shutil.copyfile(coco / rel, root / rel)
        (root / f"{split}.json").write_text(json.dumps([r for r in records if r["image"] in set(chosen)]))
    return root


def transform_of(model: str):
    student = build_student(ModelConfig(name=model))
    return student.preprocess, split_preprocess(student.preprocess, model)


def store_files(store: PixelStore) -> tuple[int, int]:
    """(committed rows by keys.bin, rows pixels.u8 holds)."""
    return store.keys_path.stat().st_size // 32, store.pixels_path.stat().st_size // store.row_bytes


@pytest.fixture(scope="module")
def tiny_transform():
    return transform_of("itr-tiny-vit")


# ---------------------------------------------------------------------------------------- exact pixels
def odd_images(folder: Path) -> list[Path]:
    """A 16-bit grey PNG, a CMYK JPEG, a palette PNG, a grey JPEG: modes the RGB decode must handle."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    wide = Image.fromarray(rng.integers(0, 65535, (70, 90), dtype=np.uint16))
    wide.save(folder / "wide16.png")
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgb.convert("L").save(folder / "grey.jpg", quality=90)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("model", ["itr-tiny-vit", "ViT-B-32"])
def test_cache_rows_normalised_on_the_device_equal_todays_preprocessing(tmp_path, coco_mini, model):
    """Every row, normalised by ``on_device``, equals open_clip's own ``preprocess(load_image(i))`` to 1e-6 -- on
    coco-mini photos and on images of other modes (16-bit, CMYK, palette, grey)."""
    root = coco_subset(tmp_path / "data", coco_mini, 10)
    for path in odd_images(root / "images" / "odd"):
        records = json.loads((root / "train.json").read_text())
        records.append({"image": str(path.relative_to(root)), "caption": "an odd image", "image_id": path.stem})
        (root / "train.json").write_text(json.dumps(records))
    index = load_split(DataConfig(root=root), "train")
    preprocess, transform = transform_of(model)
    images, stats = decoded_images(index, transform, tmp_path / "cache")
    assert stats.computed == index.num_images == 14 and stats.reused == 0
    got = images.on_device(images.batch(np.arange(index.num_images)))
    want = torch.stack([preprocess(index.load_image(i)) for i in range(index.num_images)])
    assert got.dtype == torch.float32 and got.shape == want.shape == (14, 3, *transform.size)
    assert (got - want).abs().max().item() <= 1e-6
    single = torch.stack([images.on_device(images(i)) for i in range(index.num_images)])
    assert torch.equal(single, got)


def test_a_transform_that_cannot_be_split_is_refused_naming_the_model():
    import torchvision.transforms as T

    mean, std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    cases = {
        "RandomResizedCrop": T.Compose([T.RandomResizedCrop(32), T.ToTensor(), T.Normalize(mean, std)]),
        "one fixed size": T.Compose([T.Resize(32), T.ToTensor(), T.Normalize(mean, std)]),  # no crop
        "not a torchvision Compose": lambda image: image,
        "Normalize": T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()]),
    }
    for needle, transform in cases.items():
        with pytest.raises(UserError) as err:
            split_preprocess(transform, "my-model")
        assert err.value.field == "model.name" and "my-model" in str(err.value) and needle in str(err.value), err.value
        assert "data.image_cache: tensor_ram" in str(err.value)


# ------------------------------------------------------------------------------------ content addressing
def test_a_changed_image_recomputes_only_its_own_row(tmp_path, coco_mini, tiny_transform):
    preprocess, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 8)
    index = load_split(DataConfig(root=root), "train")
    first, stats = decoded_images(index, transform, tmp_path / "cache")
    assert (stats.computed, stats.reused) == (8, 0)
    again, stats = decoded_images(index, transform, tmp_path / "cache")
    assert (stats.computed, stats.reused) == (0, 8) and np.array_equal(again.rows, first.rows)

    changed = index.image_paths[3]
    Image.open(changed).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=85)
    index = load_split(DataConfig(root=root), "train")
    after, stats = decoded_images(index, transform, tmp_path / "cache")
    assert (stats.computed, stats.reused) == (1, 7)
    kept = [i for i in range(8) if i != 3]
    assert np.array_equal(after.rows[kept], first.rows[kept]) and after.rows[3] == 8  # one new row, appended
    want = preprocess(index.load_image(3))
    assert (after.on_device(after(3)) - want).abs().max().item() <= 1e-6
    assert store_files(after.store) == (9, 9)


def test_splits_holding_the_same_files_share_rows(tmp_path, coco_mini, tiny_transform):
    _, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 6, 4)
    train = load_split(DataConfig(root=root), "train")
    decoded_images(train, transform, tmp_path / "cache")
    subset = train.subset_images([5, 1], name="two")
    images, stats = decoded_images(subset, transform, tmp_path / "cache")
    assert (stats.computed, stats.reused) == (0, 2) and images.rows.tolist() == [5, 1]


# ------------------------------------------------------------------------------------------ crash safety
def test_an_interrupted_build_resumes_from_the_committed_chunks(tmp_path, coco_mini, tiny_transform, monkeypatch):
    preprocess, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 10)
    index = load_split(DataConfig(root=root), "train")
    calls = {"n": 0}
    append = PixelStore.append

    def killed_on_second_chunk(self, keys, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return append(self, keys, pixels)

    monkeypatch.setattr(PixelStore, "append", killed_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        decoded_images(index, transform, tmp_path / "cache", chunk_rows=4)
    monkeypatch.setattr(PixelStore, "append", append)
    store = PixelStore.for_transform(tmp_path / "cache", transform)
    assert store_files(store) == (4, 4)
    images, stats = decoded_images(index, transform, tmp_path / "cache", chunk_rows=4)
    assert (stats.computed, stats.reused) == (6, 4)
    want = torch.stack([preprocess(index.load_image(i)) for i in range(10)])
    assert (images.on_device(images.batch(np.arange(10))) - want).abs().max().item() <= 1e-6


def test_a_torn_tail_is_never_read_and_is_truncated_by_the_next_writer(tmp_path, coco_mini, tiny_transform):
    """A crash mid-append leaves bytes past the committed rows: pixels without keys (killed between the two
    writes), half a key record, keys without pixels. None of it counts as a row; the next append replaces it."""
    preprocess, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 5)
    index = load_split(DataConfig(root=root), "train")
    decoded_images(index.subset_images([0, 1, 2]), transform, tmp_path / "cache")
    store = PixelStore.for_transform(tmp_path / "cache", transform)
    before = store.keys()
    with open(store.pixels_path, "ab") as fh:  # two rows' pixels whose keys never landed
        fh.write(os.urandom(2 * store.row_bytes))
    with open(store.keys_path, "ab") as fh:  # one key of a row that has pixels, then a torn record
        fh.write(os.urandom(32) + b"\x07" * 17)
    extra_key = store.keys_path.read_bytes()[3 * 32 : 4 * 32]
    assert np.array_equal(store.keys(), np.append(before, np.frombuffer(extra_key, "S32")))  # pixels exist
    with open(store.keys_path, "r+b") as fh:  # a zero-filled record (a crash that lost the data): the end
        fh.seek(3 * 32)
        fh.write(b"\0" * 32)
    assert np.array_equal(store.keys(), before)

    images, stats = decoded_images(index, transform, tmp_path / "cache")
    assert (stats.computed, stats.reused) == (2, 3) and images.rows.tolist() == [0, 1, 2, 3, 4]
    assert store_files(store) == (5, 5)  # the garbage tail was cut before the new rows went in
    want = torch.stack([preprocess(index.load_image(i)) for i in range(5)])
    assert (images.on_device(images.batch(np.arange(5))) - want).abs().max().item() <= 1e-6

    with open(store.keys_path, "ab") as fh:  # keys beyond the pixels: never rows
        fh.write(os.urandom(64))
    assert len(store.keys()) == 5


def test_two_builders_at_once_decode_each_image_once(tmp_path, coco_mini, tiny_transform):
    """Two ranks building the same store concurrently: the build lock makes the second wait and find the rows."""
    _, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 12)
    index = load_split(DataConfig(root=root), "train")
    results: list = []
    errors: list = []

    def build():
        try:
            results.append(decoded_images(index, transform, tmp_path / "cache", chunk_rows=3))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(stats.computed for _, stats in results) == [0, 12]
    assert np.array_equal(results[0][0].rows, results[1][0].rows)
    store = results[0][0].store
    assert store_files(store) == (12, 12) and len(set(store.keys().tolist())) == 12


def test_process_pool_build_gives_the_rows_of_the_in_process_build(tmp_path, coco_mini, tiny_transform, monkeypatch):
    _, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 9)
    index = load_split(DataConfig(root=root), "train")
    here, _ = decoded_images(index, transform, tmp_path / "one", workers=1, chunk_rows=4)
    monkeypatch.setattr(image_cache_build, "POOL_MIN_ROWS", 1)
    pooled, stats = decoded_images(index, transform, tmp_path / "pool", workers=2, chunk_rows=4)
    assert stats.computed == 9 and stats.backend == "local"
    assert torch.equal(pooled.batch(np.arange(9)), here.batch(np.arange(9)))
    assert not list((tmp_path / "pool").rglob("*.tmp"))


# --------------------------------------------------------------------------------------------- bad input
def corrupt_dataset(tmp_path: Path, coco: Path, n: int = 8, bad: int = 5) -> tuple[Path, Path]:
    """(dataset root, the broken file): image ``bad`` cut after its first 2,000 bytes (the header parses, the
    pixels do not decode)."""
    root = coco_subset(tmp_path / "data", coco, n, 2)
    index = load_split(DataConfig(root=root, verify_images="none"), "train")
    broken = Path(index.image_paths[bad])
    broken.write_bytes(broken.read_bytes()[:2000])
    with Image.open(broken) as img:
        img.verify()  # passes the header check (data.verify_images: header)
    return root, broken


def test_a_jpeg_that_fails_to_decode_stops_the_build_naming_it_and_leaves_no_partial_row(
    tmp_path, coco_mini, tiny_transform, monkeypatch
):
    _, transform = tiny_transform
    root, broken = corrupt_dataset(tmp_path, coco_mini)
    index = load_split(DataConfig(root=root), "train")
    for backend_setup in ("in-process", "pool"):
        cache = tmp_path / f"cache-{backend_setup}"
        if backend_setup == "pool":
            monkeypatch.setattr(image_cache_build, "POOL_MIN_ROWS", 1)
        with pytest.raises(UserError) as err:
            decoded_images(index, transform, cache, workers=2, chunk_rows=4)
        assert err.value.path == str(broken) and "truncated" in str(err.value), err.value
        store = PixelStore.for_transform(cache, transform)
        assert store_files(store) == (4, 4)  # the first chunk (images 0-3) is kept; the broken one's chunk is not
        rows, _ = store.lookup([hashlib.sha256(broken.read_bytes()).digest()])
        assert rows.tolist() == [-1]
        assert not [p for p in cache.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_a_jpeg_that_fails_to_decode_exits_2_with_one_line_naming_it(tmp_path, coco_mini, command):
    root, broken = corrupt_dataset(tmp_path, coco_mini)
    tree = tiny_tree(
        tmp_path, data={"format": "captions_json", "root": str(root), "image_cache_dir": str(tmp_path / "cache")}
    )
    del tree["data"]["synthetic"]
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tree))
    rc, lines, out = run_cli([command, str(config)], tmp_path)
    assert_one_line_error(rc, lines, f"error: {broken}: cannot read image", "truncated")
    assert out == ""
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # no run, no run folder


def test_an_unwritable_cache_folder_exits_2_naming_the_field(tmp_path, coco_mini):
    root = coco_subset(tmp_path / "data", coco_mini, 3)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    tree = tiny_tree(
        tmp_path, data={"format": "captions_json", "root": str(root), "image_cache_dir": str(blocker / "cache")}
    )
    del tree["data"]["synthetic"]
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tree))
    rc, lines, _ = run_cli(["prepare", str(config), "--splits", "train"], tmp_path)
    assert_one_line_error(rc, lines, f"error: {blocker / 'cache'}:data.image_cache_dir: ")


# ------------------------------------------------------------------------------------- sources, configs
def test_sources_by_option_and_a_pickled_cache_reopens_its_map_lazily(tmp_path, tiny_transform):
    tree = tiny_tree(tmp_path, data={"image_cache_dir": str(tmp_path / "cache")})
    tree["data"]["synthetic"].update(num_train_images=6)
    cfg = ExperimentConfig.model_validate(tree)
    index = load_split(cfg.data, "train")
    preprocess, _ = tiny_transform
    decoded = image_input(cfg, index, preprocess)
    assert isinstance(decoded, DecodedImages) and decoded(0).dtype == torch.uint8
    blob = pickle.dumps(decoded)
    assert len(blob) < 20_000  # the pixels stay in the file
    clone = pickle.loads(blob)
    assert clone._array is None and torch.equal(clone(4), decoded(4))
    for mode, kind in (("tensor_ram", ImageTensorCache), ("none", DecodeImages)):
        cfg = ExperimentConfig.model_validate({**tree, "data": {**tree["data"], "image_cache": mode}})
        other = image_input(cfg, index, preprocess)
        assert isinstance(other, kind)
        assert (other(2) - decoded.on_device(decoded(2))).abs().max().item() <= 1e-6  # generated images too
    with pytest.raises(Exception, match="image_cache"):
        ExperimentConfig.model_validate({**tree, "data": {**tree["data"], "image_cache": "float16"}})


def test_prepare_builds_once_then_finds_everything(tmp_path, coco_mini):
    root = coco_subset(tmp_path / "data", coco_mini, 5, 3)
    tree = tiny_tree(
        tmp_path, data={"format": "captions_json", "root": str(root), "image_cache_dir": str(tmp_path / "cache")}
    )
    del tree["data"]["synthetic"]
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tree))
    rc, lines, out = run_cli(["prepare", str(config), "--splits", "train", "val"], tmp_path)
    assert rc == 0, lines
    rows = [line.split() for line in out.splitlines() if "decoded images" in line]
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [("train", "5", "5", "0"), ("val", "3", "3", "0")], out
    rc, lines, out = run_cli(["prepare", str(config), "--splits", "train", "val"], tmp_path)
    rows = [line.split() for line in out.splitlines() if "decoded images" in line]
    assert rc == 0 and [(r[3], r[4], r[5]) for r in rows] == [("5", "0", "5"), ("3", "0", "3")], out


# ------------------------------------------------------------------------------------- no JPEG opened
class OpenCounter:
    """Counts opens of ``.jpg`` files through ``PIL.Image.open`` and ``open`` (``builtins``/``io``, which
    ``pathlib`` uses) while installed."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real_pil, real_open = Image.open, builtins.open

        def count(path) -> None:
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".jpg"):
                self.count += 1

        def pil_open(fp, *args, **kwargs):
            count(fp)
            return real_pil(fp, *args, **kwargs)

        def plain_open(file, *args, **kwargs):
            count(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(Image, "open", pil_open)
        monkeypatch.setattr(builtins, "open", plain_open)
        monkeypatch.setattr(io, "open", plain_open)


def run_counting_epochs(tmp_path: Path, root: Path, monkeypatch, name: str, **data) -> list[int]:
    """JPEG opens before the first epoch, then in each of 2 epochs (read at each epoch's report), of a local
    ``train_loop`` of the tiny model (loader in-process, so every open is seen)."""
    from orchestrator.session import LocalSession
    from orchestrator.train_loop import train_loop

    tree = tiny_tree(
        tmp_path,
        data={
            "format": "captions_json",
            "root": str(root),
            "loader_workers": 0,
            "image_cache_dir": str(tmp_path / "cache"),
            **data,
        },
        train={"batch_size": 8, "max_steps_per_epoch": 3, "output_dir": str(tmp_path / name)},
        tracking={"enabled": False},
    )
    del tree["data"]["synthetic"]
    cfg = ExperimentConfig.model_validate(tree)
    counter = OpenCounter(monkeypatch)
    session = LocalSession(tmp_path / name / "run")
    marks: list[int] = []
    report = session.report
    first_batch = LocalSession.prepare_model  # called once the inputs exist, before the first epoch

    def prepare_model(model):
        marks.append(counter.count)
        return first_batch(session, model)

    def report_and_count(metrics, ckpt, epoch):
        marks.append(counter.count)
        return report(metrics, ckpt, epoch)

    session.prepare_model = prepare_model
    session.report = report_and_count
    train_loop(cfg, session)
    monkeypatch.undo()
    return [marks[0], marks[1] - marks[0], marks[2] - marks[1]]


def test_once_the_cache_is_built_no_epoch_opens_a_jpeg(tmp_path, coco_mini, monkeypatch):
    root = coco_subset(tmp_path / "data", coco_mini, 12, 4)
    before, epoch1, epoch2 = run_counting_epochs(tmp_path, root, monkeypatch, "cold")
    assert before >= 16 and (epoch1, epoch2) == (0, 0)  # each of 12 + 4 images decoded (and hashed) once
    # built: the images are not even hashed again (data.verify_images: exists, so the header check parses none)
    assert run_counting_epochs(tmp_path, root, monkeypatch, "warm", verify_images="exists") == [0, 0, 0]
    # the counter sees the opens where there are some: without the cache every epoch decodes its images
    _, epoch1, epoch2 = run_counting_epochs(tmp_path, root, monkeypatch, "uncached", image_cache="none")
    assert epoch1 > 0 and epoch2 > 0


# ------------------------------------------------------------------------------------------------ Ray
@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_build_the_rows_of_the_in_process_build(tmp_path, coco_mini, tiny_transform):
    import ray

    _, transform = tiny_transform
    root = coco_subset(tmp_path / "data", coco_mini, 10)
    index = load_split(DataConfig(root=root), "train")
    here, _ = decoded_images(index, transform, tmp_path / "one", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote, stats = decoded_images(index, transform, tmp_path / "ray", backend="ray", chunk_rows=3)
    finally:
        ray.shutdown()
    assert stats.computed == 10 and stats.backend == "ray"
    assert torch.equal(remote.batch(np.arange(10)), here.batch(np.arange(10)))


def test_prepare_is_a_no_op_without_the_decoded_cache(tmp_path):
    tree = tiny_tree(tmp_path, data={"image_cache": "tensor_ram", "image_cache_dir": str(tmp_path / "cache")})
    assert prepare_image_cache(ExperimentConfig.model_validate(tree)) == {}
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------- benchmark
def test_input_pipeline_benchmark_measures_each_path_in_process(tmp_path):
    """``benchmarks/input_pipeline.py``'s measurements at a toy size (its fresh-process runs cost minutes here):
    distinct photo-like JPEGs, a cold build, then (a), (b) and (c) each deliver float32 batches of the size asked."""
    from benchmarks import input_pipeline as bench

    root = bench.photo_like_split(tmp_path / "data", 8)
    files = sorted((root / "images").iterdir())
    assert len(files) == 8 and len({hashlib.sha256(f.read_bytes()).digest() for f in files}) == 8
    with Image.open(files[0]) as img:
        assert img.size == (640, 480) and img.format == "JPEG"
    build = bench.build_cache(root, tmp_path / "cache")
    assert build["images"] == 8 and build["images_per_s"] > 0
    rows = [
        bench.measure_bare(root, 4, 2),
        bench.measure_decode(root, 4, 2, 0),
        bench.measure_cache(root, tmp_path / "cache", 4, 3, True),
        bench.measure_cache(root, tmp_path / "cache", 4, 3, False),
    ]
    assert [r["variant"] for r in rows] == ["a_bare", "b_decode_w0", "c_cache", "c_cache_uint8"]
    assert [r["pairs"] for r in rows] == [8, 8, 12, 12]
    assert all(r["pairs_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
