"""Atomic file writing: bad input or a crash never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Like :func:`write_text_atomic`, for bytes."""
    return _write_atomic(path, data, "wb")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to a temporary file beside ``path`` and move it into place; returns the path.

    The file gets the permissions a plain ``open(path, "w")`` would give (mkstemp
    creates it private).
    """
    return _write_atomic(path, text, "w")


def _write_atomic(path, data, mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
