"""The ``webdataset`` format: training pairs streamed from tar shards (``data.shards``, read by
``orchestrator.data.shards.open_shards``, not by a map-style reader); its eval splits are ``karpathy`` where
``data.annotations`` is set, else ``captions_json`` (``DataConfig.split_format``)."""

from __future__ import annotations

from orchestrator.config.data_formats import declare_format

declare_format(
    "webdataset",
    requires=("shards",),
    needs="format webdataset needs data.shards (a pattern like train-{000000..000009}.tar)",
    detect=lambda cfg: cfg.shards is not None,
    detect_order=10,
)
