"""The interface every teacher implements: ``encode(items) -> float32 (N, dim)``, rows L2-normalised.

A teacher kind (one module of this package) subclasses :class:`TeacherEncoder` and registers a builder for its spec
scheme with :func:`orchestrator.teachers.encoders.registry.register_teacher`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.teachers.hashing import FileHashMemo

Modality = Literal["image", "text"]
#: What ``encode`` takes: caption strings, PIL images, or positions in the bound split.
Inputs = Literal["text", "pixels", "index"]


def default_device_name() -> str:
    """``"cuda"`` when a GPU is visible to torch, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """float32 (N, D) with unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class TeacherEncoder:
    """A frozen teacher. ``encode(items) -> float32 (len(items), dim)``, every row L2-normalised.

    Attributes:
        spec: the spec string it was built from.
        modality: ``"image"`` or ``"text"``: the side of the pairs it encodes.
        inputs: what ``encode`` takes (``"text"``: str, ``"pixels"``: PIL images, ``"index"``: int
            positions in the split given to :meth:`bind`).
        cacheable: whether the per-item content cache applies (``False`` for ``file:``, whose features
            are already on disk).

    Subclasses implement ``_weights_digest``, ``preprocessing``, ``dim``, ``_load`` and ``encode`` (and ``bind``
    for ``index`` inputs). Models load lazily on the first ``encode``/``dim``; a pickled encoder (as shipped to Ray
    actors) carries no model and loads its own.
    """

    inputs: ClassVar[Inputs]
    cacheable: ClassVar[bool] = True

    def __init__(
        self,
        spec: str,
        modality: Modality,
        *,
        device: str | None = None,
        batch_size: int = 64,
        memo: FileHashMemo | None = None,
    ) -> None:
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

    def load(self) -> TeacherEncoder:
        """Load the model now (otherwise it loads on the first ``encode``); returns ``self``."""
        if self._model is None:
            self._model = self._load()
        return self

    def _load(self) -> Any:
        raise NotImplementedError

    def to(self, device: str | None) -> TeacherEncoder:
        """Use ``device`` (``None``: CUDA when available); moves a loaded model."""
        self.device = device
        if self._model is not None and hasattr(self._model, "to"):
            self._model.to(self._device())
        return self

    def _device(self) -> str:
        if self.device is None:
            self.device = default_device_name()
        return self.device

    def bind(self, index: DatasetIndex) -> TeacherEncoder:
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
