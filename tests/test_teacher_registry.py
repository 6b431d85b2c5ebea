"""The teacher registry (orchestrator/teachers/encoders/registry.py): a kind registered by spec scheme is built by
``build_teacher`` and goes through extraction and the cache like the built-in kinds; misplaced specs name the
forms the other side takes; ``pretrained_timm_model`` gives a fresh copy of a timm teacher's network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from orchestrator.config import TeachersConfig
from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.errors import UserError
from orchestrator.teachers import extract_split
from orchestrator.teachers.encoders import (
    TeacherEncoder,
    TeacherRequest,
    build_image_teacher,
    build_text_teacher,
    pretrained_timm_model,
    register_teacher,
    registry,
    teacher_forms,
)

TEXT_FORMS = (
    "sentence-transformers:<name-or-path>, packaged:all-MiniLM-L6-v2, packaged:all-mpnet-base-v2 or "
    "synthetic:attributes"
)
IMAGE_FORMS = (
    "packaged:efficientnet-lite0, timm:<name>[@<weights>], open_clip:<name>@<weights>, file:<features> "
    "or synthetic:attributes"
)


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (registrations made in the test are dropped)."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))


class LetterCountTeacher(TeacherEncoder):
    """``letters:<alphabet>``: a caption's letter counts over ``alphabet``, L2-normalised (N, len(alphabet))."""

    inputs: ClassVar[Any] = "text"

    def __init__(self, spec: str, alphabet: str, **kwargs: Any) -> None:
        super().__init__(spec, "text", **kwargs)
        self.alphabet = alphabet

    def _weights_digest(self) -> str:
        return "0" * 64

    @property
    def preprocessing(self) -> str:
        return f"letter counts over {self.alphabet}"

    @property
    def dim(self) -> int:
        return len(self.alphabet)

    def _load(self) -> Any:
        return {c: k for k, c in enumerate(self.alphabet)}

    def encode(self, items: Sequence[str]) -> np.ndarray:
        column = self.load()._model
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for row, text in enumerate(items):
            for char in text.lower():
                if char in column:
                    out[row, column[char]] += 1
        norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return (out / norms).astype(np.float32)


def register_letters() -> None:
    @register_teacher("letters", "text", forms=("letters:<alphabet>",))
    def build_letters(request: TeacherRequest) -> LetterCountTeacher:
        return LetterCountTeacher(request.spec, request.value, **request.options)


def naive_letter_rows(captions: Sequence[str], alphabet: str) -> np.ndarray:
    """float64 (N, len(alphabet)): counts by str.count, divided by their Euclidean norm."""
    rows = []
    for text in captions:
        counts = [float(text.lower().count(c)) for c in alphabet]
        norm = sum(x * x for x in counts) ** 0.5
        rows.append([x / norm if norm else 0.0 for x in counts])
    return np.asarray(rows, dtype=np.float64)


def test_misplaced_specs_name_the_forms_of_their_side():
    with pytest.raises(UserError) as err:
        build_text_teacher("timm:resnet18")
    assert str(err.value) == f"teachers.text: timm: is an image teacher; a text teacher is {TEXT_FORMS}"
    assert err.value.field == "teachers.text"
    with pytest.raises(UserError) as err:
        build_image_teacher("sentence-transformers:all-MiniLM-L6-v2")
    assert (
        str(err.value) == f"teachers.image: sentence-transformers: is a text teacher; an image teacher is {IMAGE_FORMS}"
    )
    with pytest.raises(UserError) as err:
        build_image_teacher("bogus:thing")
    assert str(err.value) == "teachers.image: unknown image teacher scheme 'bogus' in 'bogus:thing'"


def test_a_registered_kind_is_built_cached_and_listed(tmp_path, scratch_registry):
    register_letters()
    teacher = build_text_teacher("letters:abcdefghijklmnopqrstuvwxyz", tmp_path, "cpu", batch_size=7)
    assert isinstance(teacher, LetterCountTeacher) and teacher.batch_size == 7 and teacher.device == "cpu"
    assert teacher_forms("text")[-1] == "letters:<alphabet>" and "letters:<alphabet>" not in teacher_forms("image")
    with pytest.raises(UserError) as err:
        build_image_teacher("letters:abc")
    assert str(err.value) == f"teachers.image: letters: is a text teacher; an image teacher is {IMAGE_FORMS}"
    with pytest.raises(UserError) as err:
        build_text_teacher("file:features.npz")
    assert str(err.value).endswith("packaged:all-mpnet-base-v2, synthetic:attributes or letters:<alphabet>")

    # through extraction and the content cache like any built-in kind
    alphabet = "aeiost"
    index = build_synthetic_split("val", num_images=8, image_size=32)
    cfg = TeachersConfig(text=f"letters:{alphabet}", cache_dir=tmp_path / "cache", backend="local")
    first = extract_split(cfg, index, progress=False, device="cpu")
    assert first.computed == {"text": len(set(index.captions))}
    np.testing.assert_allclose(np.asarray(first.text), naive_letter_rows(index.captions, alphabet), atol=1e-6)
    again = extract_split(cfg, index, progress=False, device="cpu")
    assert again.computed == {"text": 0}


def test_registering_twice_or_on_no_side_is_refused(scratch_registry):
    register_letters()
    with pytest.raises(ValueError, match="registered twice"):
        register_letters()
    with pytest.raises(ValueError, match="modalities"):
        register_teacher("audio", "sound", forms=("audio:x",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modalities"):
        register_teacher("nothing", forms=("nothing:x",))


@pytest.fixture(scope="module")
def tiny_timm_weights(tmp_path_factory):
    """(path, state_dict) of timm's ``test_efficientnet`` (random init, seed 0), classifier included."""
    import timm
    import torch

    torch.manual_seed(0)
    state = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path_factory.mktemp("tiny_timm") / "test_efficientnet.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_timm_model_is_a_fresh_copy_of_the_teachers_weights(tiny_timm_weights):
    import torch

    path, saved = tiny_timm_weights
    spec = f"timm:test_efficientnet@{path}"
    model = pretrained_timm_model(spec)
    got = model.state_dict()
    assert model.training and model.num_classes == 0
    assert not any(k.startswith("classifier") for k in got)
    assert set(got) == {k for k in saved if not k.startswith("classifier")}
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    # a new module each call: training it leaves the teacher's copy alone
    teacher = build_image_teacher(spec, None, "cpu").load()
    assert model is not teacher._model and pretrained_timm_model(spec) is not model
    image = torch.zeros(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image), teacher._model(image), rtol=0, atol=0)


def test_pretrained_timm_model_refuses_other_kinds(tmp_path):
    features = tmp_path / "f.npz"
    np.savez(features, ids=np.array(["1"]), features=np.ones((1, 4), dtype=np.float32))
    for spec in (f"file:{features}", "synthetic:attributes"):
        with pytest.raises(UserError, match="not a timm-backed image teacher") as err:
            pretrained_timm_model(spec)
        assert err.value.field == "teachers.image"
