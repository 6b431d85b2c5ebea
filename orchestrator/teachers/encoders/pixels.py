"""The base of pixel teachers: PIL images -> the model's own eval transform -> pooled features, L2-normalised."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from orchestrator.teachers.encoders.base import Inputs, TeacherEncoder, l2_normalise


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
                batch = torch.stack([self._transform(img.convert("RGB")) for img in items[lo : lo + self.batch_size]])
                feats = self._forward(batch.to(device, non_blocking=True))
                out.append(feats.float().flatten(1).cpu().numpy())
        return l2_normalise(np.concatenate(out))
