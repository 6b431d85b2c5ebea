"""Dataset formats, one module per format, each registering its map-style split reader by name
(:func:`register_split_format`) with what the config needs to know of it: the ``data`` fields it requires and
how ``data.format: auto`` recognises it (:mod:`orchestrator.config.data_formats`, the light name registry the
config validates against).

Layout: :mod:`.registry` (``register_split_format`` / ``split_reader``), :mod:`.common` (caption cleaning, JSON,
ids, paths inside a root), and :mod:`.synthetic`, :mod:`.captions_json`, :mod:`.karpathy`, :mod:`.webdataset`
(declared only: its train split is streamed). A new format is one more module, imported below (the import
registers it; the import order is the order an unknown ``data.format``'s error lists the formats).
"""

# isort: off
# each import registers its format; in this order an unknown data.format's error lists them
from orchestrator.data.formats import synthetic, captions_json, karpathy, webdataset  # noqa: F401

# isort: on
from orchestrator.data.formats.captions_json import load_captions_json, read_captions_json
from orchestrator.data.formats.common import (
    caption_text,
    clean_caption,
    escapes_root,
    is_plain_relative,
    outside_root,
    read_json,
    text_id,
)
from orchestrator.data.formats.karpathy import KARPATHY_SPLITS, load_karpathy, read_karpathy
from orchestrator.data.formats.registry import (
    SplitReader,
    SplitRole,
    register_split_format,
    split_formats,
    split_reader,
)
from orchestrator.data.formats.synthetic import load_synthetic

__all__ = [
    "KARPATHY_SPLITS",
    "SplitReader",
    "SplitRole",
    "caption_text",
    "clean_caption",
    "escapes_root",
    "is_plain_relative",
    "load_captions_json",
    "load_karpathy",
    "load_synthetic",
    "outside_root",
    "read_captions_json",
    "read_json",
    "read_karpathy",
    "register_split_format",
    "split_formats",
    "split_reader",
    "text_id",
]
