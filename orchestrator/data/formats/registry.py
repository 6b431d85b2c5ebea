"""Map-style split readers registered by format name: ``load_split`` calls the reader registered for the config's
split format.

A format module registers a reader, a function of (the ``data`` config, the split's role, the split's name) that
returns the split's :class:`~orchestrator.data.index.DatasetIndex`, and declares with it what the config must
know about the format (:class:`~orchestrator.config.data_formats.FormatDeclaration`)::

    @register_split_format("captions_json", requires=("root",), detect=lambda cfg: cfg.root is not None)
    def load_captions_json(cfg: DataConfig, role: SplitRole, split: str) -> DatasetIndex:
        ...

``data.format: captions_json`` then validates (``data.root`` unset: an error naming it), ``auto`` picks it where
``detect`` holds, and ``load_split`` reads with it. ``max_train_images`` and the image verification are applied by
``load_split`` to whatever the reader returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

from orchestrator.config.data_formats import Detector, declare_format

if TYPE_CHECKING:
    from orchestrator.config.data import DataConfig
    from orchestrator.data.index import DatasetIndex

SplitRole = Literal["train", "val", "test"]
SplitReader = Callable[["DataConfig", SplitRole, str], "DatasetIndex"]
R = TypeVar("R", bound=SplitReader)

_READERS: dict[str, SplitReader] = {}


def register_split_format(
    name: str,
    *,
    requires: tuple[str, ...] = (),
    needs: str | None = None,
    detect: Detector | None = None,
    detect_order: int = 100,
) -> Callable[[R], R]:
    """Register the decorated reader for ``data.format: <name>`` and declare the format to the config.

    ``requires``: ``data`` fields that must be set (the first unset one is blamed, with ``needs`` as the message);
    ``detect``: ``auto`` picks the format where it holds, asked in increasing ``detect_order`` (built-ins:
    webdataset 10, karpathy 20, captions_json 30). ``ValueError`` for a name registered twice.
    """

    def wrap(reader: R) -> R:
        if name in _READERS:
            raise ValueError(f"split format {name!r} registered twice")
        declare_format(name, requires=requires, needs=needs, detect=detect, detect_order=detect_order)
        _READERS[name] = reader
        return reader

    return wrap


def split_reader(name: str) -> SplitReader:
    """The reader registered for ``name``; ``KeyError`` naming the formats that have one otherwise."""
    try:
        return _READERS[name]
    except KeyError:
        raise KeyError(f"no split reader for format {name!r}; registered: {', '.join(_READERS)}") from None


def split_formats() -> tuple[str, ...]:
    """The formats with a registered map-style reader, in registration order."""
    return tuple(_READERS)
