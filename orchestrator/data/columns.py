"""Columns of a dataset index without one Python object per record: packed strings and root-relative paths.

``PackedStrings`` keeps ``N`` strings as one ``bytes`` buffer of their UTF-8 encodings (``surrogatepass``, so any
``str`` JSON can produce round-trips) and int64 offsets ``(N + 1,)``: string ``i`` is ``buf[off[i]:off[i+1]]``,
decoded on access. ``PathColumn`` is a ``PackedStrings`` of normalised paths relative to one root folder, joined
to the root on access (never resolved).

Memory is the text itself plus 8 bytes per string. Reading an item touches no per-item Python object, so forked
DataLoader workers that read every caption share the parent's pages instead of copying them (no refcount writes).
The set operations (``count_distinct``, ``is_in``) build a transient Python ``set`` (measured faster here than
Arrow's hash kernels on binary columns: 2.0 s against 4.5 s for 3.3M ids).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

#: Rows per chunk when items are gathered (``take``; bounds the temporary byte-index arrays).
CHUNK_ROWS = 65536
#: Rows decoded at a time by iteration (bounds the transient strings: a forked reader stays small).
ITER_ROWS = 1024
_ERRORS = "surrogatepass"


def _as_indices(indices: Any, n: int) -> np.ndarray:
    """int64 ``(k,)`` indices in ``[0, n)`` (negative ones counted from the end, as for a list)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size:
        idx = np.where(idx < 0, idx + n, idx)
        if idx.min() < 0 or idx.max() >= n:
            raise IndexError(f"index out of range for {n} items")
    return idx


class PackedStrings(Sequence[str]):
    """An immutable sequence of ``str``: one UTF-8 ``bytes`` buffer + int64 offsets ``(N + 1,)``.

    ``ps[i]`` -> ``str``; ``ps[a:b]`` and ``ps[[i, j, ...]]`` -> ``list[str]``; iteration decodes in chunks.
    Compares equal to another ``PackedStrings`` with the same content, or to a list/tuple of the same strings.
    """

    __slots__ = ("_buf", "_offsets")

    def __init__(self, buf: bytes, offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0 or offsets[-1] != len(buf):
            raise ValueError("offsets must be 1-D, start at 0 and end at the buffer length")
        if offsets.size > 1 and (np.diff(offsets) < 0).any():
            raise ValueError("offsets must not decrease")
        self._buf = bytes(buf)
        self._offsets = offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> PackedStrings:
        """Pack ``strings`` (any iterable of ``str``; one pass, no per-item objects kept)."""
        items = strings if isinstance(strings, (list, tuple)) else list(strings)
        joined = "".join(items)  # TypeError naming the first item that is not a str
        buf = joined.encode("utf-8", _ERRORS)
        if len(buf) == len(joined):  # all ASCII: byte lengths are the string lengths
            lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        else:
            lengths = np.fromiter((len(s.encode("utf-8", _ERRORS)) for s in items), dtype=np.int64, count=len(items))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(buf, offsets)

    # ------------------------------------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return self._offsets.size - 1

    @overload
    def __getitem__(self, key: int | np.integer) -> str: ...

    @overload
    def __getitem__(self, key: slice) -> list[str]: ...

    @overload
    def __getitem__(self, key: Sequence[int] | np.ndarray) -> list[str]: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} out of range for {n} strings")
            off = self._offsets
            return self._buf[off[i] : off[i + 1]].decode("utf-8", _ERRORS)
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._decode_range(start, max(start, stop))
            return [self[i] for i in range(start, stop, step)]
        return [self[int(i)] for i in _as_indices(key, len(self))]

    def _decode_range(self, start: int, stop: int) -> list[str]:
        bounds = self._offsets[start : stop + 1].tolist()
        buf = self._buf
        return [buf[a:b].decode("utf-8", _ERRORS) for a, b in zip(bounds[:-1], bounds[1:])]

    def __iter__(self) -> Iterator[str]:
        n = len(self)
        for start in range(0, n, ITER_ROWS):
            yield from self._decode_range(start, min(n, start + ITER_ROWS))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return self._buf == other._buf and np.array_equal(self._offsets, other._offsets)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"PackedStrings({len(self)} items: [{head}{', ...' if len(self) > 3 else ''}], {self.nbytes} bytes)"

    def __reduce__(self) -> tuple[Any, ...]:
        return PackedStrings, (self._buf, self._offsets)

    # ------------------------------------------------------------------------------------------ columns
    @property
    def buffer(self) -> bytes:
        """The concatenated UTF-8 bytes of all items."""
        return self._buf

    @property
    def offsets(self) -> np.ndarray:
        """int64 ``(N + 1,)`` (do not write): item ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``."""
        return self._offsets

    @property
    def byte_lengths(self) -> np.ndarray:
        """int64 ``(N,)``: the UTF-8 length of each item."""
        return np.diff(self._offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held: the text buffer plus the offsets."""
        return len(self._buf) + self._offsets.nbytes

    def take(self, indices: Sequence[int] | np.ndarray) -> PackedStrings:
        """Items ``indices`` (in that order, repeats allowed) as a new ``PackedStrings``; vectorised, in chunks of
        ``CHUNK_ROWS`` rows so the temporary byte index stays small."""
        idx = _as_indices(indices, len(self))
        starts = self._offsets[idx]
        lengths = self._offsets[idx + 1] - starts
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.frombuffer(self._buf, dtype=np.uint8)
        out = np.empty(int(offsets[-1]), dtype=np.uint8)
        for lo in range(0, idx.size, CHUNK_ROWS):
            hi = min(idx.size, lo + CHUNK_ROWS)
            count = lengths[lo:hi]
            total = int(count.sum())
            if not total:
                continue
            begin = int(offsets[lo])
            # byte k of row r (local) comes from starts[r] + k - (offsets[r] - begin)
            shift = np.repeat(starts[lo:hi] - (offsets[lo:hi] - begin), count)
            out[begin : begin + total] = src[shift + np.arange(total, dtype=np.int64)]
        return PackedStrings(out.tobytes(), offsets)

    def count_distinct(self) -> int:
        """How many different items there are."""
        return len(set(self))

    def is_in(self, other: PackedStrings) -> np.ndarray:
        """bool ``(N,)``: whether item ``i`` is also an item of ``other``."""
        if not len(self) or not len(other):
            return np.zeros(len(self), dtype=bool)
        values = set(other)
        return np.fromiter((s in values for s in self), dtype=bool, count=len(self))


def as_packed(values: Sequence[str] | PackedStrings) -> PackedStrings:
    """``values`` as a ``PackedStrings`` (returned as is when it is one)."""
    return values if isinstance(values, PackedStrings) else PackedStrings.from_strings(values)


def as_path_column(paths: Sequence[os.PathLike[str] | str] | PathColumn) -> PathColumn:
    """``paths`` as a ``PathColumn`` (returned as is when it is one; else a column of whole paths)."""
    return paths if isinstance(paths, PathColumn) else PathColumn.from_paths(paths)


class PathColumn(Sequence[Path]):
    """Image paths as one root folder (``str``, absolute, resolved once by the reader; ``""`` when the paths were
    given whole) and ``relative``, a ``PackedStrings`` of lexically normalised paths relative to it (absolute for
    the files outside the root that ``data.allow_outside_root`` admits).

    ``col[i]`` -> ``Path(root, relative[i])``, joined on access and not resolved; slices and index lists -> lists.
    Compares equal to another column with the same root and items, or to a list of the same paths.
    """

    __slots__ = ("root", "relative")

    def __init__(self, root: str | os.PathLike[str], relative: Sequence[str] | PackedStrings) -> None:
        self.root = os.fspath(root)
        self.relative = as_packed(relative)

    @classmethod
    def from_paths(cls, paths: Iterable[os.PathLike[str] | str]) -> PathColumn:
        """A column of whole paths (root ``""``): each item is ``str(path)``."""
        return cls("", [os.fspath(p) for p in paths])

    def __len__(self) -> int:
        return len(self.relative)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return Path(self.root, self.relative[key])
        return [Path(self.root, r) for r in self.relative[key]]

    def __iter__(self) -> Iterator[Path]:
        root = self.root
        for r in self.relative:
            yield Path(root, r)

    def strings(self) -> Iterator[str]:
        """The joined paths as ``str`` (``os.path.join(root, relative)``), without building ``Path`` objects."""
        root = self.root
        if not root:
            yield from self.relative
            return
        join = os.path.join
        for r in self.relative:
            yield join(root, r)

    def has_absolute(self) -> bool:
        """Whether some item is absolute (a file outside the root, admitted by ``data.allow_outside_root``)."""
        rel = self.relative
        starts = rel.offsets[:-1][rel.byte_lengths > 0]
        return bool(starts.size) and bool((np.frombuffer(rel.buffer, dtype=np.uint8)[starts] == ord(os.sep)).any())

    def full(self) -> PackedStrings:
        """The joined paths packed (``strings()`` in one column), for set operations across columns."""
        return self.relative if not self.root else PackedStrings.from_strings(list(self.strings()))

    def take(self, indices: Sequence[int] | np.ndarray) -> PathColumn:
        """Rows ``indices`` (in that order) under the same root."""
        return PathColumn(self.root, self.relative.take(indices))

    @property
    def nbytes(self) -> int:
        return self.relative.nbytes + len(self.root)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathColumn):
            if other.root == self.root:
                return self.relative == other.relative
            return len(self) == len(other) and list(self.strings()) == list(other.strings())
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and list(self) == [Path(p) for p in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PathColumn(root={self.root!r}, {len(self)} paths)"

    def __reduce__(self) -> tuple[Any, ...]:
        return PathColumn, (self.root, self.relative)
