"""What every config section shares: the strict ``Section`` base, ``FieldError`` (a cross-field error that names
its field), the number types (strict ints and bools) and the path types (made absolute against the current folder)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictInt

from orchestrator.spec_files import StrictModel

# ints and bools are strict (``epochs: yes`` is not 1, ``lock_image: 1`` is not True); floats accept numeric
# strings (YAML reads ``1e-4`` as one) and ints
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class FieldError(ValueError):
    """A cross-field validation error that knows which dotted field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Section(StrictModel):
    """Base of the config sections: strict (:class:`~orchestrator.spec_files.StrictModel`), and an assignment is
    validated like a file's value."""

    model_config = ConfigDict(validate_assignment=True)


def absolute_path(value: str | Path) -> Path:
    """A path against the current folder (the config convention), so Ray workers with another cwd agree."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


#: a path field made absolute at validation (need not exist yet)
AbsolutePath = Annotated[Path, AfterValidator(absolute_path)]


def _storage(value: Any) -> Any:
    """A ``scheme://...`` URI kept as the string (object storage: ``orchestrator.storage``), else a local path."""
    if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return value.rstrip("/") if value.partition("?")[0].count("/") > 2 else value
    return absolute_path(value) if isinstance(value, (str, Path)) else value


#: a local folder (made absolute) or an object-storage URI such as ``s3://bucket/runs`` (kept as a string)
StorageLocation = Annotated[Path | str, BeforeValidator(_storage)]


def existing_path(value: Path | None, what: str) -> Path | None:
    """``value`` made absolute (:func:`absolute_path`); ValueError naming ``what`` when it does not exist."""
    if value is None:
        return None
    path = absolute_path(value)
    if not path.exists():
        raise ValueError(f"{what} does not exist: {path}")
    return path
