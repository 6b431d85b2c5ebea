"""Webdataset tar shards (the img2dataset / open_clip layout): the shard list, its sample count, its split over
ranks and loader workers, and the samples of one shard, streamed.

Layout: each shard is a plain (uncompressed) ``.tar`` whose members are grouped into samples by key, webdataset's
rule: the key is the member path up to the first ``.`` of its file name, and the members of one sample are
consecutive. A sample is one image, ``{key}.jpg`` (or ``.jpeg``, ``.png``, ``.webp``), with all its captions:
``{key}.json`` holding ``{"captions": [...]}`` or ``{"caption": "..."}``, else ``{key}.txt`` with one caption per
non-empty line. Other members (img2dataset's ``.json`` metadata fields, ``.cls``, ...) are ignored.

``data.shards`` is a brace pattern (``train-{000000..000099}.tar``, ``{a,b}``, bash's rules for these two forms)
or a list of patterns. Nothing holds an index of the items: a shard is read member by member.

Epoch length: ``data.train_samples`` when declared; else the per-shard counts of ``sizes.json`` in the shards'
folder (open_clip's file: shard file name -> samples) or img2dataset's ``<shard>_stats.json`` (``successes``);
shards without either are counted once (their tar headers read, the image bytes skipped) and their counts are
added to ``sizes.json`` (atomically), so later runs and every rank read them. A shard that holds another number of
samples than its recorded count when it is read stops the run (exit 2): it changed, or it was cut short.

Bad shards stop with exit 2 and one line naming the shard: a tar error, a shard cut short at a member boundary
(no end-of-archive blocks), or bytes that are not tar headers where the archive ends (Python's ``tarfile``
silently ends an archive there, so the rest of the file is checked to be the zero padding tar writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar

import numpy as np

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config import DataConfig

log = logging.getLogger(__name__)

FIELD = "data.shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("json", "txt"))
SIZES_FILE = "sizes.json"
#: The most names one brace range may expand to (a typo like ``{0..9999999999}`` fails instead of eating memory).
MAX_EXPANSION = 1_000_000
#: A tar archive ends with two zero blocks of 512 bytes.
END_OF_ARCHIVE = 1024
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ------------------------------------------------------------------------------------------ shard list
def expand_braces(pattern: str) -> list[str]:
    """Bash brace expansion of ``{lo..hi}`` integer ranges (zero-padded when an end has a leading zero) and
    ``{a,b,c}`` alternatives, nested and repeated: ``s-{00..02}.tar`` -> ``s-00.tar``, ``s-01.tar``, ``s-02.tar``.
    A brace group without a comma or a range stays literal; an unbalanced ``{`` raises ``ValueError``."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for pos in range(start, len(pattern)):
        if pattern[pos] == "{":
            depth += 1
        elif pattern[pos] == "}":
            depth -= 1
            if depth == 0:
                end = pos
                break
    if end < 0:
        raise ValueError(f"unbalanced '{{' in {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    options = _brace_options(body)
    if options is None:  # literal braces: keep them, expand what follows
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    tails = expand_braces(tail)
    return [head + o + t for option in options for o in expand_braces(option) for t in tails]


def _brace_options(body: str) -> list[str] | None:
    match = _RANGE.match(body)
    if match:
        a, b = match.groups()
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= MAX_EXPANSION:
            raise ValueError(f"{{{body}}} expands to more than {MAX_EXPANSION:,} names")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        return [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    parts, depth, last = [], 0, 0
    for pos, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[last:pos])
            last = pos + 1
    if not parts:
        return None
    return parts + [body[last:]]


def shard_paths(spec: str | Sequence[str]) -> list[Path]:
    """The shard files ``spec`` names (a pattern or a list of patterns; see :func:`expand_braces`), in order.
    Raises ``UserError`` (field ``data.shards``) for an empty list, a bad pattern or a shard named twice."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for pattern in patterns:
        try:
            paths.extend(Path(p) for p in expand_braces(str(pattern)))
        except ValueError as err:
            raise UserError(str(err), field=FIELD) from None
    if not paths:
        raise UserError("no shards listed", field=FIELD)
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise UserError("shard listed twice", path=str(path), field=FIELD)
        seen.add(path)
    return paths


@dataclass(frozen=True)
class ShardSet:
    """The training shards: ``paths`` in listed order, ``num_samples`` the epoch's sample count (declared or
    counted), ``counts`` the recorded per-shard sample counts where known (path -> count)."""

    paths: tuple[Path, ...]
    num_samples: int
    counts: dict[Path, int] = field(default_factory=dict)
    source: str = ""
    #: Streamed data knows no graded relevance (read where a ``DatasetIndex`` would be: ``soft_labels.BatchInputs``).
    relevance: ClassVar[None] = None

    @property
    def name(self) -> str:
        return f"webdataset:{self.source or self.paths[0]} ({len(self.paths)} shards)"


def open_shards(cfg: DataConfig, *, progress: bool = True) -> ShardSet:
    """The shards of ``cfg.shards``, each checked to be a file, with the epoch's sample count: declared
    (``data.train_samples``), recorded (``sizes.json`` / img2dataset stats) or counted here once and recorded."""
    assert cfg.shards is not None
    paths = shard_paths(cfg.shards)
    for path in paths:
        if not path.is_file():
            raise UserError(
                "shard not found" if not path.exists() else "shard is not a file", path=str(path), field=FIELD
            )
    counts = recorded_counts(paths)
    source = cfg.shards if isinstance(cfg.shards, str) else f"{cfg.shards[0]}, ..."
    if cfg.train_samples is not None:
        return ShardSet(tuple(paths), cfg.train_samples, counts, source)
    missing = [p for p in paths if p not in counts]
    if missing:
        counts.update(count_and_record(missing, progress=progress))
    return ShardSet(tuple(paths), sum(counts[p] for p in paths), counts, source)


def recorded_counts(paths: Sequence[Path]) -> dict[Path, int]:
    """Per-shard sample counts from ``sizes.json`` in each shard's folder, else img2dataset's
    ``<shard stem>_stats.json`` (``successes``); shards with neither are left out."""
    sizes: dict[Path, dict[str, int]] = {}
    out: dict[Path, int] = {}
    for path in paths:
        folder = path.parent
        if folder not in sizes:
            sizes[folder] = _read_sizes(folder / SIZES_FILE)
        count = sizes[folder].get(path.name)
        if count is None:
            count = _img2dataset_count(folder / f"{path.name.split('.')[0]}_stats.json")
        if count is not None:
            out[path] = count
    return out


def _read_sizes(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"not a readable shard sizes file ({err.__class__.__name__}: {err}); delete it to recount",
            path=str(path),
            field=FIELD,
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, int) and v >= 0 for v in data.values()):
        raise UserError(
            'not a shard sizes file (expected {"shard file name": sample count, ...}); delete it to recount',
            path=str(path),
            field=FIELD,
        )
    return data


def _img2dataset_count(path: Path) -> int | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("successes")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def bytes_writer(blob: bytes) -> Callable[[BinaryIO], None]:
    """A ``write(fh)`` for :func:`orchestrator.checkpoint.atomic_write` that writes ``blob``."""

    def write(fh: BinaryIO) -> None:
        fh.write(blob)

    return write


def make_readable(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the permissions a new file gets under the umask (temp files are created owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def count_and_record(paths: Sequence[Path], *, progress: bool = True) -> dict[Path, int]:
    """Count the samples of each shard (headers only) and add the counts to ``sizes.json`` in its folder."""
    from tqdm.auto import tqdm

    from orchestrator.checkpoint import atomic_write

    bar = tqdm(paths, desc="counting shard samples", unit="shard", disable=None if progress else True)  # None: a tty
    counts = {p: count_samples(p) for p in bar}
    total = sum(counts.values())
    log.info("counted %d samples in %d shards", total, len(paths))
    by_folder: dict[Path, dict[str, int]] = {}
    for path, count in counts.items():
        by_folder.setdefault(path.parent, {})[path.name] = count
    for folder, new in by_folder.items():
        sizes = {**_read_sizes(folder / SIZES_FILE), **new}
        blob = (json.dumps(dict(sorted(sizes.items())), indent=1) + "\n").encode()
        try:
            atomic_write(folder / SIZES_FILE, bytes_writer(blob), what="shard sizes")
            make_readable(folder / SIZES_FILE)
        except UserError as err:
            raise UserError(
                f"{err.detail}: counted {total} samples but cannot record them; set "
                f"data.train_samples: {total} (or make the folder writable)",
                path=err.path,
                field="data.train_samples",
            ) from None
    return counts


# ------------------------------------------------------------------------------------------ split
def check_split(num_shards: int, world_size: int, loader_workers: int) -> None:
    """Every loader worker of every rank needs a shard of its own: refuse fewer than ``world_size * workers``."""
    readers = world_size * max(1, loader_workers)
    if num_shards < readers:
        raise UserError(
            f"{num_shards} shards for {world_size} rank(s) x {max(1, loader_workers)} loader worker(s): "
            f"each reader needs a shard of its own (write more, smaller shards, or lower "
            f"data.loader_workers)",
            field=FIELD,
        )


def rank_shards(paths: Sequence[Path], *, seed: int, epoch: int, rank: int, world_size: int) -> list[Path]:
    """Rank ``rank``'s shards of ``epoch``: the list shuffled by ``(seed, epoch)`` (the same order on every rank),
    then every ``world_size``-th from ``rank``. The ranks' shares are disjoint and cover the list."""
    order = np.random.default_rng([seed, epoch]).permutation(len(paths))
    return [paths[i] for i in order[rank::world_size]]


def worker_shards(shards: Sequence[Path], worker: int, num_workers: int) -> list[Path]:
    """Loader worker ``worker``'s share of its rank's ``shards``: every ``num_workers``-th from ``worker``."""
    return list(shards[worker :: max(1, num_workers)])


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Sample:
    """One image with all its captions, as stored: ``image`` the encoded file bytes (member ``image_member``)."""

    key: str
    shard: Path
    image: bytes
    image_member: str
    captions: list[str]


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name by webdataset's rule (``a/b.seg.png`` -> ``a/b``, ``seg.png``);
    ``None`` for names without an extension or hidden files."""
    folder, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0:
        return None
    return posixpath.join(folder, base[:dot]), base[dot + 1 :].lower()


def iter_samples(path: Path, *, clean: bool = True, expected: int | None = None) -> Iterator[Sample]:
    """The samples of shard ``path`` in stored order (``clean``: CUSA's caption cleaning, as the map formats do).

    ``expected``: the shard's recorded sample count, checked once the shard is read to its end. Every problem
    raises ``UserError`` naming the shard."""
    group: list[tuple[str, tarfile.TarInfo, bytes]] = []
    key = ""  # the key of the members in ``group`` (no member has an empty key: see split_member)
    count = 0
    with _opened(path) as (raw, tar):
        for member in _members(tar, path):
            parts = split_member(member.name)
            if parts is None:
                continue
            if parts[0] != key and group:
                yield _sample(key, group, path, clean)
                count += 1
                group = []
            key = parts[0]
            if parts[1] in READ_EXTENSIONS:  # other members (img2dataset's .npy, .cls, ...) are skipped unread
                group.append((parts[1], member, _read(tar, member, path)))
        if group:
            yield _sample(key, group, path, clean)
            count += 1
        _check_end(raw, tar.offset, path)
    if expected is not None and count != expected:
        raise UserError(
            f"holds {count} samples but its recorded count ({SIZES_FILE} or stats file) is {expected}: "
            "it changed or was cut short (delete the record to recount)",
            path=str(path),
            field=FIELD,
        )


def count_samples(path: Path) -> int:
    """How many samples (keys with an image member) shard ``path`` holds; the image bytes are skipped."""
    count, key, has_image = 0, None, False
    with _opened(path) as (raw, tar):
        for member in _members(tar, path):
            parts = split_member(member.name)
            if parts is None:
                continue
            if parts[0] != key:
                count += has_image
                key, has_image = parts[0], False
            has_image = has_image or parts[1] in IMAGE_EXTENSIONS
        count += has_image
        _check_end(raw, tar.offset, path)
    return count


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, tarfile.TarFile]]:
    """``(raw file, TarFile)`` of shard ``path``; a failure to open it raises ``UserError`` naming the shard."""
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read shard ({err.strerror or err})", path=str(path), field=FIELD) from None
    with raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise _corrupt(path, err) from None
        with tar:
            yield raw, tar


def _corrupt(path: Path, err: BaseException) -> UserError:
    return UserError(f"corrupt or truncated shard ({err.__class__.__name__}: {err})", path=str(path), field=FIELD)


def _members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of ``tar`` in stored order, without keeping them (``TarFile.members`` is cleared)."""
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise _corrupt(path, err) from None
        # a shard's headers are not kept: memory stays flat however long the shard (typeshed's TarFile omits the
        # ``members`` list that tarfile fills as it reads)
        tar.members = []  # type: ignore[attr-defined]
        if member is None:
            return
        if member.isfile():
            yield member


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        handle = tar.extractfile(member)
        data = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _corrupt(path, err) from None
    if len(data) != member.size:
        raise _corrupt(path, EOFError(f"member {member.name} ends after {len(data)} of {member.size} bytes"))
    return data


def _check_end(raw: BinaryIO, offset: int, path: Path) -> None:
    """The bytes after the last member must be the end-of-archive zero blocks (and zero padding): else the
    shard was cut short at a member boundary, or garbage stands where a header should be."""
    raw.seek(offset)
    total = 0
    while chunk := raw.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise _corrupt(path, tarfile.ReadError(f"invalid tar header at byte {offset + total}"))
        total += len(chunk)
    if total < END_OF_ARCHIVE:
        raise _corrupt(path, EOFError(f"no end-of-archive marker after byte {offset} (cut short?)"))


def _sample(key: str, group: list[tuple[str, tarfile.TarInfo, bytes]], path: Path, clean: bool) -> Sample:
    parts = {ext: (member, data) for ext, member, data in reversed(group)}  # the first member of each extension
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if image is None:
        raise UserError(
            f"sample {key!r} has no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})",
            path=str(path),
            field=FIELD,
        )
    captions = _captions(key, parts, path)
    if clean:
        from orchestrator.data.formats import clean_caption

        captions = [clean_caption(c) for c in captions]
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise UserError(f"sample {key!r} has only empty captions", path=str(path), field=FIELD)
    return Sample(key=key, shard=path, image=image[1], image_member=image[0].name, captions=captions)


def _captions(key: str, parts: dict[str, tuple[tarfile.TarInfo, bytes]], path: Path) -> list[str]:
    """The captions of a sample: ``.json`` ``captions`` (a list of strings) or ``caption``, else ``.txt`` lines."""
    if "json" in parts:
        member, data = parts["json"]
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{member.name} is not valid JSON ({err})", path=str(path), field=FIELD) from None
        if isinstance(meta, dict):
            value = meta.get("captions", meta.get("caption"))
            if isinstance(value, str):
                return [value]
            if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
                return value
            if value is not None:
                raise UserError(
                    f"{member.name}: 'captions' must be a non-empty list of strings", path=str(path), field=FIELD
                )
    if "txt" in parts:
        member, data = parts["txt"]
        try:
            return data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{member.name} is not UTF-8 text", path=str(path), field=FIELD) from None
    raise UserError(
        f"sample {key!r} has no caption (.json with 'captions' or 'caption', or .txt)", path=str(path), field=FIELD
    )
