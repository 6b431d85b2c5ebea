"""The names ``data.format`` may take, and what each format declares to the config: the ``data`` fields it needs
and how ``auto`` recognises it.

Light on purpose (no reader, no numpy): the config validates a name against it without importing a reader. A
format module declares itself when it is imported -- through
:func:`orchestrator.data.formats.register_split_format`, which also registers its reader, or through
:func:`declare_format` for a format read another way (``webdataset``: streamed) -- so the declarations live with
the readers. The format modules of :data:`FORMATS_PACKAGE` are imported on the first lookup of a name not
declared yet (``synthetic``, the fallback of ``auto``, is declared here: a default config imports nothing).
A format registered later (a plugin, a test) is accepted from then on, as a loss section registered later is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config.data import DataConfig

#: the package whose import declares every built-in format (each module declares one)
FORMATS_PACKAGE = "orchestrator.data.formats"
#: ``data.format: auto``: the format follows from the data fields that are set
AUTO = "auto"
#: what ``auto`` is when no declared format recognises the data (no root, annotations or shards set)
FALLBACK_FORMAT = "synthetic"
#: the fields that say where data lives; with none set, ``auto`` is the fallback without asking any format
LOCATION_FIELDS = ("shards", "annotations", "root")

Detector = Callable[["DataConfig"], bool]


@dataclass(frozen=True)
class FormatDeclaration:
    """What a format tells the config.

    Attributes:
        name: the ``data.format`` value.
        requires: ``data`` fields that must be set (not None) for it, in the order they are blamed.
        needs: the error for an unset one (default ``format <name> needs data.<a> and data.<b>``).
        detect: ``auto`` picks this format when ``detect(data_config)`` holds (None: never picked by ``auto``).
        detect_order: detectors are asked in increasing order (built-ins: webdataset 10, karpathy 20,
            captions_json 30); ties in declaration order.
    """

    name: str
    requires: tuple[str, ...] = ()
    needs: str | None = None
    detect: Detector | None = None
    detect_order: int = 100

    def missing_field(self, cfg: DataConfig) -> str | None:
        """The first field of :attr:`requires` that ``cfg`` leaves unset, or None."""
        return next((name for name in self.requires if getattr(cfg, name) is None), None)

    @property
    def needs_message(self) -> str:
        if self.needs is not None:
            return self.needs
        return f"format {self.name} needs " + " and ".join(f"data.{name}" for name in self.requires)


_DECLARED: dict[str, FormatDeclaration] = {}
_loaded = False


def declare_format(
    name: str,
    *,
    requires: tuple[str, ...] = (),
    needs: str | None = None,
    detect: Detector | None = None,
    detect_order: int = 100,
) -> FormatDeclaration:
    """Make ``name`` a ``data.format`` value. Declaring a name again with the same declaration is a no-op;
    ``ValueError`` for another declaration of a declared name, or for the reserved name ``auto``."""
    if not name or name != name.strip() or name == AUTO:
        raise ValueError(f"a dataset format needs a name other than {AUTO!r}, without surrounding spaces: {name!r}")
    declaration = FormatDeclaration(name, tuple(requires), needs, detect, detect_order)
    known = _DECLARED.get(name)
    if known is not None and known != declaration:
        raise ValueError(f"dataset format {name!r} declared twice, differently")
    _DECLARED[name] = declaration
    return declaration


def format_declaration(name: str) -> FormatDeclaration:
    """The declaration of the format ``name`` (the format modules imported first where it is not declared yet);
    ``KeyError`` for a name no format declares."""
    if name not in _DECLARED:
        _load_format_modules()
    return _DECLARED[name]


def format_names() -> tuple[str, ...]:
    """The values ``data.format`` accepts: ``auto``, then every declared format in declaration order."""
    _load_format_modules()
    return (AUTO, *_DECLARED)


def check_format_name(value: object) -> str:
    """``value`` when it is ``auto`` or a declared format; else ``ValueError`` listing the accepted values (in
    the words pydantic uses for a fixed set of choices)."""
    if isinstance(value, str) and (value == AUTO or value in _DECLARED):
        return value
    names = format_names()
    if isinstance(value, str) and value in names:
        return value
    quoted = [repr(name) for name in names]
    raise ValueError(f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}")


def detect_format(cfg: DataConfig) -> str:
    """``auto``'s format for ``cfg``: the first declared format (by ``detect_order``) whose detector holds, else
    :data:`FALLBACK_FORMAT`; with no location field set, the fallback without importing any format."""
    if all(getattr(cfg, name) is None for name in LOCATION_FIELDS):
        return FALLBACK_FORMAT
    _load_format_modules()
    detectors = sorted((d for d in _DECLARED.values() if d.detect is not None), key=lambda d: d.detect_order)
    return next((d.name for d in detectors if d.detect is not None and d.detect(cfg)), FALLBACK_FORMAT)


def _load_format_modules() -> None:
    """Import :data:`FORMATS_PACKAGE` once: its modules declare the built-in formats."""
    global _loaded
    if not _loaded:
        _loaded = True  # first: a format module that validates a config while it loads does not recurse
        try:
            importlib.import_module(FORMATS_PACKAGE)
        except BaseException:
            _loaded = False
            raise


declare_format(FALLBACK_FORMAT)  # the synthetic shapes (orchestrator.data.formats.synthetic reads them)
