"""Write a map-style split (captions_json, karpathy or the synthetic set) as webdataset tar shards, the layout
:mod:`orchestrator.data.shards` streams: ``itr write-shards`` (the example shards of the tests and the README).

Each image becomes one sample: ``{key}.jpg`` (or ``.png`` / ``.webp``: the file's own bytes, not re-encoded;
other formats and generated images are written as PNG) and ``{key}.json`` with ``{"captions": [...], "image_id":
...}`` (or ``{key}.txt``, one caption per line). Keys are the zero-padded image positions in the split. Captions
are stored as the annotation file has them; the reader cleans them (``data.clean_captions``) as the map formats
do. Each shard is written to a temp file and renamed, then ``sizes.json`` (sample count per shard) is written, so
the shard set is never half-written under its final names.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from orchestrator.data.images import to_rgb
from orchestrator.data.index import DatasetIndex
from orchestrator.data.shards import SIZES_FILE, bytes_writer, make_readable
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: PIL format -> the extension its bytes are stored under (anything else is re-encoded as PNG).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class WrittenShards:
    """What :func:`write_shards` wrote: the shard files, ``pattern`` (for ``data.shards``), samples per shard."""

    paths: list[Path]
    pattern: str
    counts: list[int]


def write_shards(
    index: DatasetIndex,
    out: Path,
    *,
    shard_size: int,
    prefix: str = "train",
    captions: Literal["json", "txt"] = "json",
    progress: bool = True,
) -> WrittenShards:
    """Write every image of ``index`` with all its captions into ``ceil(num_images / shard_size)`` shards
    ``out/<prefix>-NNNNNN.tar``. Refuses (``UserError``) a folder that already holds shards of that prefix."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise UserError("must be at least 1", field="--shard-size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing:
        raise UserError(
            f"already holds shards ({existing[0].name}, ...): write into an empty folder or use another --prefix",
            path=str(out),
            field="--out",
        )
    num_shards = math.ceil(index.num_images / shard_size)
    width = max(6, len(str(num_shards - 1)))
    key_width = max(9, len(str(index.num_images - 1)))
    paths, counts = [], []
    bar = tqdm(
        total=index.num_images, desc="writing shards", unit="image", disable=None if progress else True
    )  # None: only on a terminal
    for shard in range(num_shards):
        path = out / f"{prefix}-{shard:0{width}d}.tar"
        images = range(shard * shard_size, min((shard + 1) * shard_size, index.num_images))
        _write_shard(path, index, images, key_width, captions)
        paths.append(path)
        counts.append(len(images))
        bar.update(len(images))
    bar.close()
    from orchestrator.checkpoint import atomic_write

    blob = (json.dumps({p.name: n for p, n in zip(paths, counts, strict=True)}, indent=1) + "\n").encode()
    atomic_write(out / SIZES_FILE, bytes_writer(blob), what="shard sizes")
    make_readable(out / SIZES_FILE)
    pattern = str(out / f"{prefix}-{{{0:0{width}d}..{num_shards - 1:0{width}d}}}.tar")
    log.info("wrote %d samples in %d shards: %s", index.num_images, num_shards, pattern)
    return WrittenShards(paths=paths, pattern=pattern, counts=counts)


def _write_shard(path: Path, index: DatasetIndex, images: range, key_width: int, captions: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp: str | None = tmp_name  # None once renamed into place
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for i in images:
                    key = f"{i:0{key_width}d}"
                    data, ext = image_bytes(index, i)
                    _add(tar, f"{key}.{ext}", data)
                    texts = [str(index.captions[int(c)]) for c in index.captions_of(i)]
                    if captions == "json":
                        meta = {"captions": texts, "image_id": str(index.image_ids[i])}
                        _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
                    else:
                        _add(tar, f"{key}.txt", "\n".join(" ".join(t.split()) for t in texts).encode())
            fh.flush()
            os.fsync(fh.fileno())
        make_readable(tmp_name)
        os.replace(tmp_name, path)
        tmp = None
    except OSError as err:
        raise UserError(f"cannot write shard ({err.strerror or err})", path=str(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible shards: no times, no owners
    tar.addfile(info, io.BytesIO(data))


def image_bytes(index: DatasetIndex, i: int) -> tuple[bytes, str]:
    """(encoded bytes, extension) of image ``i``: a JPEG/PNG/WebP file as it is; others (and generated images)
    as PNG of the 8-bit RGB image ``DatasetIndex.load_image`` gives."""
    if index.image_paths is not None:
        path = Path(index.image_paths[i])
        try:
            with Image.open(path) as img:
                kind = img.format
            if kind in KEPT_FORMATS:
                return path.read_bytes(), KEPT_FORMATS[kind]
        except OSError as err:
            raise UserError(f"cannot read image ({err.__class__.__name__}: {err})", path=str(path)) from None
    buffer = io.BytesIO()
    to_rgb(index.load_image(i)).save(buffer, format="PNG")
    return buffer.getvalue(), "png"
