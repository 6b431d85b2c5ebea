"""Reading pickled ``.npy`` feature dicts without running code from the file.

The CUSA authors ship their Unicom image features as ``np.save(path, {image_id: array})``: a ``.npy``
whose payload is a 0-d object array, i.e. a pickle. ``np.load(allow_pickle=True)`` would unpickle it
with the full :mod:`pickle` machinery, so a crafted file runs any callable it names (``os.system``...).

Here the ``.npy`` header is read with :mod:`numpy.lib.format` and the pickle that follows is run through
:class:`RestrictedUnpickler`, whose ``find_class`` hands out only the few numpy callables that rebuild
plain numeric arrays, dtypes and scalars. Dicts, lists, tuples, str, int, float and bytes need no global
at all. Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) raises
:class:`RefusedPickle` before it is called, and the loaded object is then checked to hold nothing but
those types. This is the only module of the project that unpickles anything (``tests`` audit it).
"""

from __future__ import annotations

import builtins
import importlib
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list, or rebuilds an object of a refused type."""


def _numpy_global(name: str) -> Any:
    """``numpy._core.multiarray.<name>`` (numpy 2) or ``numpy.core.multiarray.<name>`` (numpy 1)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no multiarray.{name}")  # pragma: no cover - every numpy has both


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: what numpy's own array / dtype / scalar pickles reference, under the
    module names numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write."""
    reconstruct, scalar = _numpy_global("_reconstruct"), _numpy_global("scalar")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for name in ("dict", "list", "str", "int"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_allowed_globals`; everything else raises :class:`RefusedPickle`.

    ``persistent_load`` is refused too (the default already raises; this names the reason).
    """

    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle's hook
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refused to unpickle {module}.{name}: a feature file may only hold numpy "
                "arrays, dicts, lists, str and int"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused a persistent id in the pickle")


#: Leaf types a loaded feature pickle may contain.
_PLAIN = (str, int, float, bytes, type(None))


def check_plain(obj: Any, depth: int = 0) -> None:
    """:class:`RefusedPickle` unless ``obj`` is made of dicts, lists, tuples, str, int, float, bytes and
    numeric (non-object) numpy arrays / scalars only."""
    if depth > 64:
        raise RefusedPickle("the pickle nests deeper than 64 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for item in obj.ravel(order="K"):
                check_plain(item, depth + 1)
        return
    if isinstance(obj, np.generic):
        if obj.dtype.hasobject:
            raise RefusedPickle("refused a numpy object scalar")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(key, depth + 1)
            check_plain(value, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            check_plain(item, depth + 1)
        return
    if not isinstance(obj, _PLAIN):
        raise RefusedPickle(f"refused an object of type {type(obj).__name__} in the pickle")


def read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``fh``, leaving it at the start of the payload.

    Raises ``ValueError`` for a file that is not a ``.npy`` (numpy's own message).
    """
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fh)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")


def npy_holds_pickle(path: Path | str) -> bool:
    """Whether the ``.npy`` at ``path`` stores an object array (a pickle); reads only its header."""
    with open(path, "rb") as fh:
        return bool(read_npy_header(fh)[2].hasobject)


def load_npy_restricted(path: Path | str) -> Any:
    """The object stored in the ``.npy`` at ``path``, unpickled with :class:`RestrictedUnpickler`.

    A 0-d object array (``np.save(path, some_dict)``) gives back the dict itself; an object array of
    another shape comes back as that array; a numeric ``.npy`` is read with ``allow_pickle=False``.
    Raises :class:`RefusedPickle` (nothing from the file was called), ``ValueError`` / ``EOFError`` /
    ``pickle.UnpicklingError`` for a damaged file, ``OSError`` for an unreadable one.
    """
    with open(path, "rb") as fh:
        shape, _fortran, dtype = read_npy_header(fh)
        if not dtype.hasobject:
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        obj = RestrictedUnpickler(fh).load()
    check_plain(obj)
    if not isinstance(obj, np.ndarray) or tuple(obj.shape) != tuple(shape):
        raise pickle.UnpicklingError(
            f"the pickle holds a {type(obj).__name__}, not the {shape} array the .npy header announces"
        )
    return obj.item() if obj.ndim == 0 else obj


__all__ = [
    "RefusedPickle",
    "RestrictedUnpickler",
    "check_plain",
    "load_npy_restricted",
    "npy_holds_pickle",
    "read_npy_header",
]
