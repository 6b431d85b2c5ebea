"""Decoding image files to 8-bit RGB, by value range for the modes PIL's ``convert("RGB")`` gets wrong.

PIL clips 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images to 0..255 when converting to RGB,
so a 16-bit PNG comes out almost all white. Here they are scaled by their range instead:

* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: ``v >> 8`` (0..65535 -> 0..255);
* ``I``: the same, for values in 0..65535 (how 16-bit PNGs and TIFFs often decode); other values are refused;
* ``F``: ``round(v * 255)`` for values in [0, 1]; other values (or NaN) are refused.

Refusals raise ``ValueError``; the callers turn it into a ``UserError`` naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.errors import UserError

#: Modes PIL opens 16-bit single-channel images in.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new, loaded 8-bit RGB image (safe to use after the file is closed); wide grey modes are
    scaled by their value range (see the module docstring)."""
    mode = image.mode
    if mode not in SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        return image.convert("RGB")
    values = np.asarray(image)
    if mode == "F":
        lo, hi = float(np.min(values)), float(np.max(values))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"32-bit float image with values in [{lo:g}, {hi:g}]; only [0, 1] is understood")
        grey = np.round(values.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        values = values.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 0xFFFF:
            raise ValueError(f"32-bit integer image with values {lo}..{hi}, outside 0..65535")
        grey = (values >> 8).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def open_failure(err: OSError) -> str:
    """A short reason for an ``OSError`` opening an image file (a symlink loop says so)."""
    if err.errno == errno.ELOOP:
        return "image is a symlink loop (too many levels of symbolic links)"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return "image file not found"
    return f"cannot read image ({err.strerror or err})"


def check_image_file(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (``None`` if it is one): one ``stat``, no ``resolve``."""
    try:
        st = os.stat(path)
    except OSError as err:
        return open_failure(err)
    if stat.S_ISDIR(st.st_mode):
        return "image path is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "image file not found"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """The 8-bit RGB image in the file ``path`` (wide modes scaled by range: ``to_rgb``), decoded in
    full; an unreadable file raises ``UserError`` naming it."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except OSError as err:
        if isinstance(err.errno, int):  # the file itself: missing, a symlink loop, no permission
            raise UserError(open_failure(err), path=str(path)) from None
        raise UserError(f"cannot read image ({err.__class__.__name__}: {err})", path=str(path)) from None
    except (ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image ({err.__class__.__name__}: {err})", path=str(path)) from None
