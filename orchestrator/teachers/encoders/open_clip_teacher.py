"""``open_clip:<name>@<weights file>``: the image tower of an open_clip model (``encode_image``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.teachers.encoders.pixels import ImageTeacher
from orchestrator.teachers.encoders.registry import TeacherRequest, existing_file, register_teacher
from orchestrator.teachers.hashing import files_digest


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
            raise UserError(
                f"cannot build open_clip {self.name} from these weights ({err.__class__.__name__}: {err})",
                path=str(self.weights),
                field="teachers.image",
            ) from None
        model = model.eval().to(self._device())
        self._transform = preprocess
        self._forward = model.encode_image
        return model


@register_teacher("open_clip", "image", forms=("open_clip:<name>@<weights>",))
def build_open_clip(request: TeacherRequest) -> OpenClipImageTeacher:
    """``open_clip:<name>@<weights file>``: the weights file is required (nothing is fetched)."""
    name, _, weights = request.value.partition("@")
    if not weights:
        raise UserError(
            f"open_clip teachers need a weights file: open_clip:{name}@/path/to/weights.pt "
            "(no pretrained CLIP weights can be fetched offline)",
            field=request.field,
        )
    path = existing_file(weights, "open_clip weights file", request.field)
    return OpenClipImageTeacher(request.spec, name.strip(), path, **request.options)
