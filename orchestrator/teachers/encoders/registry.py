"""Teacher kinds registered by spec scheme: ``build_teacher("timm:resnet18@w.pth", "image")`` calls the builder
registered for ``("timm", "image")``.

A kind module registers a builder, a function of a :class:`TeacherRequest` that returns an unloaded
:class:`~orchestrator.teachers.encoders.base.TeacherEncoder`::

    @register_teacher("timm", "image", forms=("timm:<name>[@<weights>]",))
    def build_timm(request: TeacherRequest) -> TeacherEncoder:
        ...

The ``forms`` are the spec forms as a user writes them; when a spec names a scheme of the other side, the error
lists the forms this side accepts, in registration order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.errors import UserError
from orchestrator.teachers.encoders.base import Modality, TeacherEncoder
from orchestrator.teachers.hashing import FileHashMemo

MODALITIES: tuple[Modality, ...] = ("image", "text")


@dataclass(frozen=True)
class TeacherRequest:
    """What a builder gets: the spec split at its first ``:`` and the options every encoder takes.

    Attributes:
        spec: the whole spec string, e.g. ``"timm:resnet18@/w/resnet18.pth"``.
        scheme: the part before the colon, stripped and lower-cased (``"timm"``).
        value: the part after it, stripped (``"resnet18@/w/resnet18.pth"``).
        modality: the side the teacher encodes.
        cache_dir: the teachers cache folder (``None``: none configured).
    """

    spec: str
    scheme: str
    value: str
    modality: Modality
    cache_dir: Path | None
    device: str | None
    batch_size: int
    memo: FileHashMemo

    @property
    def field(self) -> str:
        """The config field a ``UserError`` names: ``teachers.image`` or ``teachers.text``."""
        return f"teachers.{self.modality}"

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of every :class:`TeacherEncoder` constructor: ``device``, ``batch_size``, ``memo``."""
        return {"device": self.device, "batch_size": self.batch_size, "memo": self.memo}


TeacherBuilder = Callable[[TeacherRequest], TeacherEncoder]
B = TypeVar("B", bound=TeacherBuilder)


@dataclass(frozen=True)
class _Kind:
    builder: TeacherBuilder
    forms: tuple[str, ...]


_KINDS: dict[tuple[str, Modality], _Kind] = {}


def register_teacher(scheme: str, *modalities: Modality, forms: Sequence[str]) -> Callable[[B], B]:
    """Register the decorated builder for specs ``<scheme>:...`` on each of ``modalities``.

    ``forms``: the spec forms it accepts, as a user writes them (``"timm:<name>[@<weights>]"``).
    ``ValueError`` for a scheme registered twice on one side, or for no or unknown modalities.
    """
    key = scheme.lower()
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise ValueError(f"teacher scheme {scheme!r}: modalities must be among {MODALITIES}, got {modalities}")

    def wrap(builder: B) -> B:
        for modality in modalities:
            if (key, modality) in _KINDS:
                raise ValueError(f"{modality} teacher scheme {key!r} registered twice")
            _KINDS[(key, modality)] = _Kind(builder, tuple(forms))
        return builder

    return wrap


def teacher_forms(modality: Modality) -> list[str]:
    """The spec forms registered for ``modality``, in registration order."""
    return [form for (_, side), kind in _KINDS.items() if side == modality for form in kind.forms]


def build_teacher(
    spec: str,
    modality: Modality,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    *,
    batch_size: int = 64,
    memo: FileHashMemo | None = None,
) -> TeacherEncoder:
    """The ``modality`` teacher named by ``spec`` (model not loaded yet).

    ``UserError`` (field ``teachers.<modality>``) for a malformed, unknown or unavailable spec. ``cache_dir``: the
    teachers cache (mpnet unpacks there; file hashes are memoised there, unless ``memo`` is given).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    field = f"teachers.{modality}"
    memo = memo or _memo_for(cache_dir)
    scheme, value = _split_spec(spec, field)
    kind = _KINDS.get((scheme, modality))
    if kind is None:
        raise _unknown_scheme(spec, scheme, modality)
    request = TeacherRequest(
        spec=spec,
        scheme=scheme,
        value=value,
        modality=modality,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        device=device,
        batch_size=batch_size,
        memo=memo,
    )
    return kind.builder(request)


def build_text_teacher(
    spec: str,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    *,
    batch_size: int = 64,
    memo: FileHashMemo | None = None,
) -> TeacherEncoder:
    """``build_teacher(spec, "text", ...)``: the text teacher named by ``spec`` (model not loaded yet)."""
    return build_teacher(spec, "text", cache_dir, device, batch_size=batch_size, memo=memo)


def build_image_teacher(
    spec: str,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    *,
    batch_size: int = 64,
    memo: FileHashMemo | None = None,
) -> TeacherEncoder:
    """``build_teacher(spec, "image", ...)``: the image teacher named by ``spec`` (model not loaded yet)."""
    return build_teacher(spec, "image", cache_dir, device, batch_size=batch_size, memo=memo)


# ------------------------------------------------------------------------------------ helpers for builders
def existing_file(text: str, what: str, field: str) -> Path:
    """The absolute, resolved path ``text`` (relative to the working folder); ``UserError`` "<what> not found"."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise UserError(f"{what} not found", path=str(path), field=field)
    return path


def import_package(module: str, pip_name: str, spec: str, field: str) -> Any:
    """The module ``module``; ``UserError`` naming the ``pip install`` that provides it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{spec} needs the package {pip_name.split('==')[0]}: pip install {pip_name}", field=field
        ) from None


# ------------------------------------------------------------------------------------------------ private
def _split_spec(spec: str, field: str) -> tuple[str, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(
            f"teacher spec {spec!r} is not of the form scheme:value (e.g. packaged:all-MiniLM-L6-v2, "
            "timm:<name>@<weights>, file:<features.npz>)",
            field=field,
        )
    scheme, rest = spec.split(":", 1)
    if not rest:
        raise UserError(f"teacher spec {spec!r} has nothing after {scheme}:", field=field)
    return scheme.strip().lower(), rest.strip()


def _memo_for(cache_dir: Path | str | None) -> FileHashMemo:
    return FileHashMemo(Path(cache_dir) / "file-hashes.json" if cache_dir is not None else None)


def _article(modality: str) -> str:
    return "an" if modality == "image" else "a"


def _unknown_scheme(spec: str, scheme: str, modality: Modality) -> UserError:
    """The error for a scheme with no builder on ``modality``: names the side it belongs to, if any."""
    field = f"teachers.{modality}"
    other_sides = [side for (known, side) in _KINDS if known == scheme and side != modality]
    if not other_sides:
        return UserError(f"unknown {modality} teacher scheme {scheme!r} in {spec!r}", field=field)
    forms = teacher_forms(modality)
    listed = forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"
    other = other_sides[0]
    return UserError(
        f"{scheme}: is {_article(other)} {other} teacher; {_article(modality)} {modality} teacher is {listed}",
        field=field,
    )
