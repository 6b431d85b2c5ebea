"""Webdataset shards (issue 15 item 4): the brace patterns (checked against bash), the writer (round trip against
coco-mini's own JSON), the per-rank / per-worker split, streamed batches (distinct images, one caption each, the
same steps on every rank, a mid-epoch resume that continues the uninterrupted epoch), the epoch length counted
once, bad shards (exit 2, one line naming the shard), and the training loop on shards. ``itr train`` on shards
with 2 Ray Train workers reading disjoint shards is in tests/test_train_paths.py (one Ray cluster for every input
path).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.config import DataConfig, validate_config
from orchestrator.data.formats import clean_caption
from orchestrator.data.shard_loader import (
    caption_choice,
    distinct_batches,
    key_id,
    shard_train_loader,
    shuffled,
    steps_share,
)
from orchestrator.data.shards import (
    Sample,
    check_split,
    count_samples,
    expand_braces,
    iter_samples,
    open_shards,
    rank_shards,
    shard_paths,
    worker_shards,
)
from orchestrator.data.splits import load_split
from orchestrator.data.write_shards import write_shards
from orchestrator.errors import UserError
from tests.conftest import COCO_MINI, tiny_tree
from tests.test_bad_input import assert_one_line_error, run_cli

IMAGES, SHARD_SIZE = 96, 12  # 8 shards of coco-mini train images


def needs_coco_mini() -> Path:
    if not (COCO_MINI / "train.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return COCO_MINI


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    """(folder, pattern) of the first 96 coco-mini train images written as 8 shards of 12 (captions as stored)."""
    root = needs_coco_mini()
    index = load_split(DataConfig(root=root, clean_captions=False, verify_images="none"), "train")
    out = tmp_path_factory.mktemp("shards")
    result = write_shards(index.subset_images(range(IMAGES)), out, shard_size=SHARD_SIZE, progress=False)
    return out, result.pattern


def copy_shards(written, dest: Path, sizes: bool = True) -> str:
    folder, pattern = written
    shutil.copytree(folder, dest)
    if not sizes:
        (dest / "sizes.json").unlink()
    return pattern.replace(str(folder), str(dest))


def coco_records(root: Path, images: int) -> dict[str, list[str]]:
    """image_id -> captions of the first ``images`` images of coco-mini's train.json, read here with json."""
    groups: dict[str, list[str]] = defaultdict(list)
    for record in json.loads((root / "train.json").read_text()):
        groups[record["image_id"]].append(record["caption"])
    return dict(list(groups.items())[:images])


# ------------------------------------------------------------------------------------------ patterns
@pytest.mark.parametrize(
    "pattern",
    [
        "s-{000000..000009}.tar",
        "a{1..3}b{x,y}",
        "{a,{b,c}}z",
        "x{9..11}",
        "{08..10}",
        "{3..1}",
        "lit{abc}",
        "p/{0..2}/q{,r}",
        "n{-2..1}",
    ],
)
def test_brace_expansion_matches_bash(pattern):
    theirs = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert expand_braces(pattern) == theirs


def test_shard_lists_refuse_bad_patterns_and_repeats():
    for spec, needle in (
        ("a{1,2", "unbalanced"),
        ("{0..9999999}", "more than"),
        (["a.tar", "a.tar"], "twice"),
        ([], "no shards"),
    ):
        with pytest.raises(UserError) as err:
            shard_paths(spec)
        assert needle in str(err.value) and err.value.field in ("data.shards", None)
    assert shard_paths(["x-{0..1}.tar", "y.tar"]) == [Path("x-0.tar"), Path("x-1.tar"), Path("y.tar")]


# ------------------------------------------------------------------------------------------ writer/reader
def test_written_shards_hold_every_image_with_all_its_captions(written):
    folder, pattern = written
    paths = shard_paths(pattern)
    assert len(paths) == IMAGES // SHARD_SIZE
    assert json.loads((folder / "sizes.json").read_text()) == {p.name: SHARD_SIZE for p in paths}
    assert [count_samples(p) for p in paths] == [SHARD_SIZE] * len(paths)
    expected = coco_records(COCO_MINI, IMAGES)
    records = json.loads((COCO_MINI / "train.json").read_text())
    files = {r["image_id"]: COCO_MINI / r["image"] for r in records}
    seen = []
    for path in paths:
        with tarfile.open(path) as tar:  # the stdlib's own reader: the members the webdataset layout names
            names = tar.getnames()
            metas = {n: json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")}
        for sample in iter_samples(path, clean=False, expected=SHARD_SIZE):
            image_id = metas[f"{sample.key}.json"]["image_id"]
            assert sample.captions == [c.strip() for c in expected[image_id]]
            assert sample.image == files[image_id].read_bytes()  # the JPEG as it was, not re-encoded
            assert sample.image_member == f"{sample.key}.jpg"
            seen.append(image_id)
    assert seen == list(expected)  # every image once, in split order
    cleaned = next(iter_samples(paths[0], clean=True))
    assert cleaned.captions == [clean_caption(c) for c in expected[seen[0]]]


def test_txt_captions_and_other_members_are_read_by_webdatasets_rules(tmp_path):
    path = tmp_path / "t.tar"
    members = [
        ("a/x.jpg", b"IMG1"),
        ("a/x.txt", b"first\n\nsecond\n"),
        ("a/x.seg.png", b"ignored"),
        ("noext", b"ignored"),
        ("y.png", b"IMG2"),
        ("y.json", b'{"caption": "only one"}'),
        ("y.cls", b"3"),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(path, clean=False))
    assert [(s.key, s.image, s.captions) for s in samples] == [
        ("a/x", b"IMG1", ["first", "second"]),
        ("y", b"IMG2", ["only one"]),
    ]
    assert count_samples(path) == 2


def test_the_writer_refuses_a_folder_with_shards_and_cli_prints_the_pattern(written, tmp_path):
    folder = written[0]
    rc, lines, _ = run_cli(["write-shards", "--root", str(COCO_MINI), "--out", str(folder)], tmp_path)
    assert_one_line_error(rc, lines, str(folder), "--out", "already holds shards")
    rc, _, out = run_cli(
        [
            "write-shards",
            "--root",
            str(COCO_MINI),
            "--split",
            "val",
            "--out",
            str(tmp_path / "v"),
            "--shard-size",
            "100",
            "--captions",
            "txt",
        ],
        tmp_path,
    )
    assert rc == 0 and f"data.shards: {tmp_path / 'v'}/train-{{000000..000002}}.tar" in out
    assert sum(count_samples(p) for p in shard_paths(str(tmp_path / "v/train-{000000..000002}.tar"))) == 201
    assert not list((tmp_path / "v").glob(".*tmp"))  # no temp file left


# ------------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_ranks_and_workers_read_disjoint_shards_that_cover_the_list(world, workers):
    paths = [Path(f"s{i:02d}.tar") for i in range(13)]
    for epoch in range(3):
        readers = [
            worker_shards(rank_shards(paths, seed=7, epoch=epoch, rank=r, world_size=world), k, workers)
            for r in range(world)
            for k in range(workers)
        ]
        flat = [p for share in readers for p in share]
        assert sorted(flat) == paths and len(set(flat)) == len(flat)
        assert all(share for share in readers)
    orders = {tuple(rank_shards(paths, seed=7, epoch=e, rank=0, world_size=1)) for e in range(4)}
    assert len(orders) == 4  # a new shard order each epoch, the same on every rank (a function of seed, epoch)
    assert rank_shards(paths, seed=7, epoch=1, rank=1, world_size=2) == rank_shards(
        list(paths), seed=7, epoch=1, rank=1, world_size=2
    )


def test_fewer_shards_than_readers_is_refused_naming_the_field():
    check_split(4, 2, 2)
    with pytest.raises(UserError) as err:
        check_split(3, 2, 2)
    assert err.value.field == "data.shards" and "3 shards for 2 rank(s) x 2 loader worker(s)" in str(err.value)


def test_steps_are_dealt_round_robin_and_the_shuffle_buffer_keeps_every_item():
    for steps in range(12):
        for workers in (1, 2, 3):
            shares = [steps_share(steps, k, workers) for k in range(workers)]
            assert shares == [len(range(k, steps, workers)) for k in range(workers)]
    rng = np.random.default_rng(0)
    out = list(shuffled(range(100), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    samples = [Sample(k, Path("s"), b"", "", ["c"]) for k in "aabcbd"]
    assert [[s.key for s in b] for b in distinct_batches(samples, 2)] == [["a", "b"], ["a", "c"], ["b", "d"]]


# ------------------------------------------------------------------------------------------ batches
def pixel_sum(image) -> torch.Tensor:
    """A cheap stand-in for the preprocess: (1,) float64, the sum of the RGB pixels (identifies the image)."""
    return torch.tensor([float(np.asarray(image, dtype=np.float64).sum())])


def loader_cfg(tmp_path: Path, pattern: str, *, batch: int = 8, workers: int = 0, **data):
    tree = tiny_tree(
        tmp_path,
        data={
            "format": "webdataset",
            "shards": pattern,
            "root": str(COCO_MINI),
            "loader_workers": workers,
            "shuffle_buffer": 5,
            **data,
        },
        train={"batch_size": batch},
    )
    tree["data"].pop("synthetic")
    return validate_config(tree)


def epoch_batches(cfg, rank: int, world: int, epoch: int = 0, skip: int = 0):
    shards = open_shards(cfg.data, progress=False)
    loader, schedule = shard_train_loader(
        cfg, shards, preprocess=pixel_sum, tokenizer=lambda t: list(t), rank=rank, world_size=world
    )
    schedule.set_epoch(epoch)
    loader.batch_sampler.skip = skip
    batches = list(iter(loader))
    loader.batch_sampler.skip = 0
    return batches, len(schedule)


def test_streamed_batches_hold_distinct_images_one_drawn_caption_each_and_disjoint_ranks(written, tmp_path):
    cfg = loader_cfg(tmp_path, written[1], batch=8)
    expected = coco_records(COCO_MINI, IMAGES)
    captions_by_id = {key_id(f"{i:09d}"): [clean_caption(c) for c in caps] for i, caps in enumerate(expected.values())}
    for epoch in (0, 1):
        keys_of_rank = []
        for rank in (0, 1):
            batches, steps = epoch_batches(cfg, rank, 2, epoch)
            assert steps == IMAGES // (8 * 2) and len(batches) == steps  # the same step count on every rank
            ids = []
            for batch in batches:
                assert batch.images.shape == (8, 1) and batch.caption_index.tolist() == [-1] * 8
                assert len(set(batch.image_index.tolist())) == 8  # no two captions of one image
                for image_id, caption in zip(batch.image_index.tolist(), batch.tokens, strict=True):
                    caps = captions_by_id[image_id]
                    key = next(f"{i:09d}" for i in range(IMAGES) if key_id(f"{i:09d}") == image_id)
                    assert caption == caps[caption_choice(cfg.train.seed, epoch, key, len(caps))]
                ids.extend(batch.image_index.tolist())
            assert len(set(ids)) == len(ids)  # each image at most once per epoch and rank
            keys_of_rank.append(set(ids))
        assert not keys_of_rank[0] & keys_of_rank[1]  # the ranks read disjoint shards
    first = epoch_batches(cfg, 0, 2, 0)[0]
    again = epoch_batches(cfg, 0, 2, 0)[0]
    other = epoch_batches(cfg, 0, 2, 1)[0]
    assert [b.image_index.tolist() for b in first] == [b.image_index.tolist() for b in again]  # deterministic
    assert [b.image_index.tolist() for b in first] != [b.image_index.tolist() for b in other]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_mid_epoch_continues_the_uninterrupted_epoch(written, tmp_path, workers):
    cfg = loader_cfg(tmp_path, written[1], batch=4, workers=workers)
    full, steps = epoch_batches(cfg, 1, 2, epoch=3)
    assert len(full) == steps == IMAGES // 8
    for skip in (1, 3, steps - 1):
        rest, _ = epoch_batches(cfg, 1, 2, epoch=3, skip=skip)
        assert [b.image_index.tolist() for b in rest] == [b.image_index.tolist() for b in full[skip:]]
        assert [b.tokens for b in rest] == [b.tokens for b in full[skip:]]
        torch.testing.assert_close(torch.cat([b.images for b in rest]), torch.cat([b.images for b in full[skip:]]))


def test_a_declared_epoch_longer_than_a_readers_shards_reads_them_again(written, tmp_path, caplog):
    cfg = loader_cfg(tmp_path, written[1], batch=8, workers=0, train_samples=IMAGES * 2)
    with caplog.at_level("INFO", logger="orchestrator.data.shard_loader"):
        batches, steps = epoch_batches(cfg, 0, 2)
    assert len(batches) == steps == IMAGES * 2 // 16  # twice the rank's share: a second pass
    assert all(len(set(b.image_index.tolist())) == 8 for b in batches)
    assert "reads its 4 shard(s) again" in caplog.text


# ------------------------------------------------------------------------------------------ epoch length
def test_epoch_length_is_declared_recorded_or_counted_once(written, tmp_path, monkeypatch):
    pattern = copy_shards(written, tmp_path / "s", sizes=False)
    data = loader_cfg(tmp_path, pattern).data
    assert open_shards(data, progress=False).num_samples == IMAGES  # counted ...
    sizes = json.loads((tmp_path / "s" / "sizes.json").read_text())
    assert sizes == {p.name: SHARD_SIZE for p in shard_paths(pattern)}  # ... and recorded
    import orchestrator.data.shards as shards_module

    monkeypatch.setattr(shards_module, "count_samples", lambda path: pytest.fail(f"counted {path} again"))
    assert open_shards(data, progress=False).num_samples == IMAGES
    declared = loader_cfg(tmp_path, pattern, train_samples=50).data
    assert open_shards(declared, progress=False).num_samples == 50


def test_a_shard_that_no_longer_matches_its_recorded_count_stops_naming_it(written, tmp_path):
    pattern = copy_shards(written, tmp_path / "s")
    first = shard_paths(pattern)[0]
    sizes = json.loads((tmp_path / "s" / "sizes.json").read_text())
    sizes[first.name] = SHARD_SIZE + 1
    (tmp_path / "s" / "sizes.json").write_text(json.dumps(sizes))
    shards = open_shards(loader_cfg(tmp_path, pattern).data, progress=False)
    with pytest.raises(UserError) as err:
        list(iter_samples(first, expected=shards.counts[first]))
    assert err.value.path == str(first) and "holds 12 samples" in str(err.value)


# ------------------------------------------------------------------------------------------ bad shards
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    boundary = members[6].offset  # the header of the 4th sample's image
    if how == "truncated":  # cut inside the 3rd sample's image
        path.write_bytes(data[: members[4].offset_data + 100])
    elif how == "cut_at_member":  # cut exactly between two members: tarfile alone would see a short, valid tar
        path.write_bytes(data[:boundary])
    else:  # garbage where a header should be: tarfile alone would end the archive there
        path.write_bytes(data[:boundary] + bytes(range(256)) * 2 + data[boundary + 512 :])


@pytest.mark.parametrize("how", ["truncated", "cut_at_member", "garbage_header"])
def test_damaged_shards_raise_a_user_error_naming_the_shard(written, tmp_path, how):
    pattern = copy_shards(written, tmp_path / "s")
    bad = shard_paths(pattern)[2]
    damage(bad, how)
    for read in (lambda: list(iter_samples(bad)), lambda: count_samples(bad)):
        with pytest.raises(UserError) as err:
            read()
        assert err.value.path == str(bad) and "corrupt or truncated shard" in str(err.value)


def test_an_image_that_does_not_decode_names_its_shard_and_member(written, tmp_path):
    from orchestrator.data.shard_loader import decode_image

    path = tmp_path / "bad.tar"
    jpeg = (COCO_MINI / json.loads((COCO_MINI / "train.json").read_text())[0]["image"]).read_bytes()
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.jpg", jpeg[: len(jpeg) // 3]), ("k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sample = next(iter_samples(path))
    with pytest.raises(UserError) as err:
        decode_image(sample, pixel_sum)
    assert err.value.path == str(path) and "cannot decode image k.jpg" in str(err.value)


@pytest.mark.parametrize("sizes", [True, False], ids=["while-training", "while-counting"])
def test_itr_train_on_a_truncated_shard_exits_2_with_one_line_naming_it(written, tmp_path, sizes):
    """With ``sizes.json`` the shard is met by a loader worker mid-epoch; without, by the count before the run."""
    pattern = copy_shards(written, tmp_path / "s", sizes=sizes)
    bad = shard_paths(pattern)[5]
    damage(bad, "truncated")
    tree = tiny_tree(
        tmp_path,
        data={
            "format": "webdataset",
            "shards": pattern,
            "root": str(COCO_MINI),
            "loader_workers": 2,
            "image_cache": "none",
        },
        train={"epochs": 1, "batch_size": 8, "eval_at_start": False, "max_steps_per_epoch": None},
    )
    tree["data"].pop("synthetic")
    tree["tracking"] = {"enabled": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    rc, lines, _ = run_cli(["train", str(tmp_path / "config.yaml")], tmp_path)
    assert_one_line_error(rc, lines, str(bad), "corrupt or truncated shard")


def test_configs_the_shards_cannot_serve_are_refused_naming_the_field(written, tmp_path):
    base = {"format": "webdataset", "shards": written[1], "root": str(COCO_MINI)}
    cases = [
        (
            {
                "loss": {"family": "cusa", "alpha": 0.1, "beta": 0.0},
                "teachers": {"image": "synthetic:attributes", "text": "synthetic:attributes"},
            },
            "loss.family",
        ),
        ({"loss": {"family": "listwise"}, "teachers": {"text": "packaged:all-MiniLM-L6-v2"}}, "loss.family"),
        ({"train": {"batch_sampler": "random"}}, "train.batch_sampler"),
        ({"data": {"root": None}}, "data.root"),
        ({"data": {"max_train_images": 10}}, "data.max_train_images"),
        ({"data": {"bad_images": "skip"}}, "data.bad_images"),
        ({"model": {"name": "itr-tiny-vit", "lock_image": True}}, "model.cache_locked_towers"),
        ({"data": {"format": "captions_json"}}, "data.shards"),
    ]
    for sections, field in cases:
        tree = tiny_tree(tmp_path, data=dict(base), **{k: v for k, v in sections.items() if k != "data"})
        tree["data"].pop("synthetic")
        tree["data"].update(sections.get("data", {}))
        with pytest.raises(UserError) as err:
            validate_config(tree)
        assert err.value.field == field, (sections, str(err.value))
    auto = tiny_tree(tmp_path, data={"shards": written[1], "root": str(COCO_MINI)})
    auto["data"].pop("synthetic")
    auto["data"].pop("format")
    cfg = validate_config(auto)
    assert cfg.data.resolved_format == "webdataset" and cfg.data.split_format == "captions_json"
    assert load_split(cfg.data, "val").num_images == 201  # the eval split stays map-style
    with pytest.raises(UserError, match=r"streamed from data\.shards"):
        load_split(cfg.data, "train")


# ------------------------------------------------------------------------------------------ training
def test_the_training_loop_trains_on_shards_in_the_local_backend(written, tmp_path):
    from orchestrator.train_loop import train_loop

    tree = tiny_tree(
        tmp_path,
        data={
            "format": "webdataset",
            "shards": written[1],
            "root": str(COCO_MINI),
            "loader_workers": 1,
            "image_cache": "none",
        },
        train={"epochs": 2, "batch_size": 8, "eval_at_start": False, "max_steps_per_epoch": 3},
        eval={"reports": False},
        tracking={"enabled": False},
    )
    tree["data"].pop("synthetic")
    metrics = train_loop(validate_config(tree))
    assert metrics["train/steps"] == 6.0 and np.isfinite(metrics["train/loss"])
    assert 0.0 < metrics["val/rsum"] <= 600.0


def test_the_shard_benchmark_times_one_epoch_through_the_loader(written):
    """``benchmarks/input_shards.measure_shards`` (benchmark (d)) in-process, small: its counts are the epoch's."""
    from benchmarks.input_shards import measure_shards

    row = measure_shards(written[1], workers=0, batch_size=16, image_size=32, tokenize=False)
    assert row["batches"] == IMAGES // 16 and row["pairs"] == (IMAGES // 16 - 1) * 16
    assert row["pairs_per_s"] > 0 and row["per_core"] == row["pairs_per_s"] and row["peak_rss_mib"] > 0
