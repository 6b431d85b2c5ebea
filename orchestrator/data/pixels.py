"""open_clip's eval transform split in two: the PIL part (resize, crop, RGB) and the device part (float, /255,
mean/std).

The student's image preprocessing (``open_clip.create_model_and_transforms``' eval transform) is a torchvision
``Compose``::

    Resize(size, interpolation=BICUBIC) | CenterCrop(size) | MaybeConvertMode() | MaybeToTensor() | Normalize(mean, std)

Everything before ``ToTensor`` works on PIL images and ends in 8-bit RGB pixels: :meth:`PixelTransform.pixels`
turns an image into exactly those pixels, a uint8 (3, H, W) array (what ``ToTensor`` would read, channels
first). The rest is arithmetic: :meth:`PixelTransform.normalise` does ``x.float().div_(255)`` then
``sub_(mean).div_(std)`` -- the same float32 operations ``ToTensor`` and ``Normalize`` do, so on the CPU the
result is bit-identical to ``preprocess(image)``, and it runs wherever ``x`` lives (on the device, after the
uint8 batch was copied there: 4x fewer bytes over PCIe than float32).

A transform with any other step (a random crop, a colour jitter, a lambda) cannot be split without changing
what it computes: :func:`split_preprocess` refuses it with a ``UserError`` naming ``model.name``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from orchestrator.errors import UserError

#: Bump when the bytes a cached row holds would change for the same file and transform.
PIXELS_FORMAT = 1


def _step_kind(step: Any) -> str | None:
    """``"pil"`` (a deterministic PIL-to-PIL step), ``"rgb"``, ``"to_tensor"``, ``"normalize"``, or ``None``."""
    import torchvision.transforms as T

    name = type(step).__name__
    if isinstance(step, (T.Resize, T.CenterCrop)):
        return "pil"
    if name == "ResizeKeepRatio":  # open_clip's: deterministic unless asked for random scale / aspect
        if getattr(step, "random_scale_prob", 0.0) or getattr(step, "random_aspect_prob", 0.0):
            return None
        return "pil"
    if name == "CenterCropOrPad":
        return "pil"
    if name == "MaybeConvertMode":
        return "rgb" if getattr(step, "mode", "RGB") == "RGB" else None
    if callable(step) and getattr(step, "__name__", "") == "_convert_to_rgb":  # older open_clip
        return "rgb"
    if isinstance(step, T.ToTensor):  # MaybeToTensor is a subclass
        return "to_tensor"
    if isinstance(step, T.Normalize):
        return "normalize"
    return None


def _describe(step: Any) -> str:
    return " ".join(repr(step).split())  # one line; torchvision's repr names size, interpolation, antialias


@dataclass
class PixelTransform:
    """The split eval transform: :meth:`pixels` (PIL image -> uint8 (3, H, W)) and :meth:`normalise`
    (uint8 (..., 3, H, W) tensor -> float32 of the same shape, ``(x / 255 - mean) / std``).

    ``steps``: the PIL steps in order; ``size``: (H, W) of every output; ``spec``: a one-line description of
    everything that decides the pixels (the steps, the RGB decode, Pillow's version), part of the cache key.
    """

    steps: list[Callable[[Image.Image], Image.Image]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int]
    spec: str
    _stats: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(3, H, W): the shape of one row."""
        return (3, self.size[0], self.size[1])

    @property
    def digest(self) -> str:
        """sha256 (hex) of :attr:`spec`: names the cache store of this transform."""
        return hashlib.sha256(self.spec.encode()).hexdigest()

    def pil(self, image: Image.Image) -> Image.Image:
        """The PIL steps (resize, crop, RGB) applied to an already-decoded RGB ``image``."""
        for step in self.steps:
            image = step(image)
        return image.convert("RGB") if image.mode != "RGB" else image

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 (3, H, W), C-contiguous: the pixels ``ToTensor`` would read from ``pil(image)``."""
        out = np.asarray(self.pil(image), dtype=np.uint8)
        if out.shape != (self.size[0], self.size[1], 3):
            raise ValueError(
                f"the image transform gave {out.shape[1]}x{out.shape[0]} pixels, expected {self.size[1]}x{self.size[0]}"
            )
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device.type, device.index)
        hit = self._stats.get(key)
        if hit is None:
            mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1)
            hit = self._stats[key] = (mean, std)
        return hit

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) on any device -> float32 (..., 3, H, W): ``ToTensor`` then ``Normalize``, same ops."""
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 pixels, got {x.dtype}")
        mean, std = self._mean_std(x.device)
        return x.float().div_(255).sub_(mean).div_(std)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stats"] = {}  # device tensors stay in their process
        return state


def _probe_size(steps: Sequence[Callable], model_name: str) -> tuple[int, int]:
    """(H, W) the PIL steps give for two probe images of other aspect ratios; ``UserError`` unless one size."""
    sizes = set()
    for w, h in ((97, 61), (45, 131)):
        img: Image.Image = Image.new("RGB", (w, h))
        for step in steps:
            img = step(img)
        sizes.add((img.height, img.width))
    if len(sizes) != 1:
        raise UserError(
            f"model {model_name!r}: its image transform does not give one fixed size (got "
            f"{sorted(sizes)}), so decoded images cannot be stored as rows; set data.image_cache: "
            "tensor_ram or none",
            field="model.name",
        )
    return sizes.pop()


def split_preprocess(preprocess: Any, model_name: str) -> PixelTransform:
    """Split the student's ``preprocess`` (a torchvision ``Compose``) into a :class:`PixelTransform`.

    Accepted: deterministic PIL steps (``Resize``, ``CenterCrop``, open_clip's ``ResizeKeepRatio`` without random
    scale/aspect, ``CenterCropOrPad``), a convert to RGB, then ``ToTensor`` and ``Normalize`` with 3 channels, last.
    Anything else raises ``UserError`` (field ``model.name``) naming the step: the cache would compute otherwise.
    """
    import PIL

    steps = getattr(preprocess, "transforms", None)
    refuse = "; set data.image_cache: tensor_ram or none"
    if not isinstance(steps, (list, tuple)):
        raise UserError(
            f"model {model_name!r}: its image transform {type(preprocess).__name__} is not a torchvision "
            f"Compose, so it cannot be split into decode and normalise{refuse}",
            field="model.name",
        )
    pil_steps: list[Callable] = []
    described: list[str] = []
    stage = "pil"  # pil -> to_tensor seen -> normalize seen
    mean = std = None
    for step in steps:
        kind = _step_kind(step)
        if kind in ("pil", "rgb") and stage == "pil":
            pil_steps.append(step)
            described.append(_describe(step))
        elif kind == "to_tensor" and stage == "pil":
            stage = "tensor"
        elif kind == "normalize" and stage == "tensor":
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
            stage = "done"
        else:
            raise UserError(
                f"model {model_name!r}: cannot split its image transform at step {_describe(step)!r} "
                f"(only resize, centre crop, RGB, ToTensor, Normalize are understood){refuse}",
                field="model.name",
            )
    if stage != "done" or mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise UserError(
            f"model {model_name!r}: its image transform does not end in ToTensor + a 3-channel Normalize{refuse}",
            field="model.name",
        )
    size = _probe_size(pil_steps, model_name)
    spec = (
        f"pixels v{PIXELS_FORMAT}; decode: to_rgb (16-bit by range); "
        + " | ".join(described)
        + f"; RGB uint8 CHW {size[0]}x{size[1]}; Pillow {PIL.__version__}"
    )
    return PixelTransform(steps=pil_steps, mean=mean, std=std, size=size, spec=spec)


__all__ = ["PIXELS_FORMAT", "PixelTransform", "split_preprocess"]
