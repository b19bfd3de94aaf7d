"""Writing files safely.

Atomic file writing: bad input or a crash never leaves a half-written file behind. Output
directories: a command never deletes or overwrites anything neurodeploy did not write
(:func:`claim_output_dir`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Like :func:`write_text_atomic`, for bytes."""
    return _write_atomic(path, data)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to a temporary file beside ``path`` and move it into place; returns the path.

    The file gets the permissions a plain ``open(path, "w")`` would give (mkstemp
    creates it private).
    """
    return _write_atomic(path, text)


def _write_atomic(path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_temporary(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (with the permissions a plain
    ``open(path, "w")`` would give); returns its path. Removes it again on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_files_atomic(directory: str | os.PathLike, files: dict) -> list[Path]:
    """Write several files of one result (name -> str or bytes) into ``directory``: all
    go to temporary names first and are renamed into place only when every one was
    written, so a failure leaves the previous files, all of them, as they were (and no
    temporary). Returns the paths, in the order given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    try:
        for name, data in files.items():
            written[name] = _write_temporary(directory / name, data)
        for name, tmp in written.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    return [directory / name for name in files]


# -- output directories: never delete or overwrite what neurodeploy did not write ------------
#
# Every command that writes into a directory first claims it with claim_output_dir. A file
# named like one of ours is overwritten only when neurodeploy wrote it: the directory's
# marker file MARKER_FILE lists the names neurodeploy wrote there (it is updated on every
# claim). A directory without a marker that holds nothing but names neurodeploy writes (one
# written by a version before the marker) counts as ours too. Files of other names are never
# touched, and nothing is ever removed, except our own temporary files and directories.

MARKER_FILE = ".neurodeploy"
LOCK_FILE = ".neurodeploy.lock"  # see output_lock
_MARKER_KIND = "neurodeploy output directory"

# Every name a neurodeploy command writes into an output or model directory.
OUR_FILE_NAMES = frozenset(
    {
        "network.yaml",
        "weights.npz",
        "finetune.json",
        "fileclass.json",
        "convert.json",
        "simulate.json",
        "run.json",
        "crosscheck.json",
        "crosscheck.html",
        "sweep.json",
        "results.jsonl",
        "report.html",
        "heatmap.png",
    }
)
_OUR_NAME_PATTERN = re.compile(r"accuracy_[A-Za-z0-9_]+\.png")
# a temporary file of write_text_atomic (mkstemp: "." + name + "." + 8 random characters)
# left behind by a kill
_TEMPORARY_PATTERN = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}")


_OUR_DOT_FILES = (MARKER_FILE, LOCK_FILE)


def is_our_name(name: str) -> bool:
    """True for a file name some neurodeploy command writes (or its temporary name)."""
    if name in OUR_FILE_NAMES or _OUR_NAME_PATTERN.fullmatch(name) or name in _OUR_DOT_FILES:
        return True
    temporary = _TEMPORARY_PATTERN.fullmatch(name)
    return bool(temporary) and is_our_name(temporary.group("name"))


def read_marker(directory: Path) -> frozenset[str] | None:
    """The names the marker of ``directory`` lists; None when there is no marker of ours."""
    path = Path(directory) / MARKER_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("kind") != _MARKER_KIND:
        return None
    files = doc.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return frozenset(files)


def owned_names(directory: Path) -> frozenset[str]:
    """Names of the entries of ``directory`` that neurodeploy wrote (see the section comment)."""
    directory = Path(directory)
    listed = read_marker(directory)
    if listed is not None:
        return listed
    if os.path.lexists(directory / MARKER_FILE):  # a foreign file of the marker's name
        return frozenset()
    entries = [entry.name for entry in os.scandir(directory)]
    if all(is_our_name(name) and not os.path.isdir(directory / name) for name in entries):
        return frozenset(entries)
    return frozenset()


def write_marker(directory: Path, names) -> None:
    """Record that neurodeploy wrote ``names`` in ``directory`` (beside those listed before)."""
    directory = Path(directory)
    listed = read_marker(directory) or frozenset()
    doc = {
        "kind": _MARKER_KIND,
        "note": "the files neurodeploy wrote here and may overwrite; it touches no other",
        "files": sorted(listed | set(names)),
    }
    write_text_atomic(directory / MARKER_FILE, json.dumps(doc, indent=2) + "\n")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) that is not a directory."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


def check_output_dir(
    path: str | os.PathLike,
    names,
    force: bool = False,
    what: str = "--out",
    exclusive: bool = False,
) -> Path:
    """Check, touching nothing, that neurodeploy may write the files ``names`` into ``path``.

    Refused with a :class:`UsageError` naming the path: ``path`` is a file, lies under a
    file, or cannot be created or written; one of ``names`` is a directory there; one of
    ``names`` exists there and neurodeploy did not write it (unless ``force``); with
    ``exclusive`` (a model directory), the directory holds anything neurodeploy did not
    write (unless ``force``). ``force`` lets our files be written beside the others (and
    over those named like ours) but nothing is ever removed. Commands call it before
    their work, so a refusal costs nothing, and :func:`claim_output_dir` when they write.
    """
    path = Path(path)
    names = tuple(names)
    blocking = _file_in_the_way(path)
    if blocking == path:
        raise UsageError(f"{what} {path}: is a file, not a directory")
    if blocking is not None:
        raise UsageError(f"{what} {path}: lies under {blocking}, which is a file")
    existing = next(p for p in (path, *path.parents) if p.is_dir())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: the directory {existing} is not writable")
    if existing != path:
        return path
    try:
        owned = owned_names(path)
        for name in names:
            if (path / name).is_dir() and not (path / name).is_symlink():
                raise UsageError(f"{what} {path / name}: is a directory; cannot write {name} there")
        foreign = sorted(
            name for name in names if os.path.lexists(path / name) and name not in owned
        )
        if exclusive:
            foreign = sorted(
                entry.name
                for entry in os.scandir(path)
                if entry.name not in owned and entry.name not in _OUR_DOT_FILES
            )
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read the directory ({exc.strerror})") from None
    if foreign and not force:
        listed = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        if exclusive:
            raise UsageError(
                f"{what} {path}: a directory holding files neurodeploy did not write "
                f"({listed}); give a new or empty directory, or --force to write the model "
                "beside them (nothing is removed)"
            )
        raise UsageError(
            f"{what} {path}: holds {listed}, not written by neurodeploy; give another "
            "directory, or --force to overwrite them (nothing else is touched)"
        )
    return path


def claim_output_dir(
    path: str | os.PathLike,
    names,
    force: bool = False,
    what: str = "--out",
    exclusive: bool = False,
) -> Path:
    """:func:`check_output_dir`, then create the directory and record ``names`` in its
    marker (so the next claim of the same names succeeds); returns the path."""
    path = check_output_dir(path, names, force=force, what=what, exclusive=exclusive)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if read_marker(path) is not None or not os.path.lexists(path / MARKER_FILE):
            write_marker(path, names)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def check_output_file(path: str | os.PathLike, force: bool, what: str, ours) -> Path:
    """Check, touching nothing, that neurodeploy may write the single file ``path``.

    ``ours(path) -> bool`` tells whether an existing file is one neurodeploy wrote (e.g.
    an ONNX file it exported); any other existing file is refused unless ``force``. A
    directory there, a parent that is a file, or an unwritable directory is refused
    always, with a :class:`UsageError` naming the path.
    """
    path = Path(path)
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        raise UsageError(f"{what} {path}: lies under {blocking}, which is a file")
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory")
    if os.path.lexists(path) and not force and not ours(path):
        raise UsageError(
            f"{what} {path}: exists and was not written by neurodeploy; give another name, "
            "or --force to overwrite it"
        )
    existing = next(p for p in path.parents if p.is_dir())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: the directory {existing} is not writable")
    return path


def write_directory(
    path: str | os.PathLike, writers: dict, force: bool = False, what: str = "--out"
) -> Path:
    """Write a model directory: ``writers`` maps each file name to ``write(file_path)``.

    The directory is claimed first (exclusive: see :func:`claim_output_dir`). Every file is
    written into a temporary directory beside ``path``; when all are complete, a new
    directory is moved into place whole, and into an existing one (ours, empty, or with
    ``force``) the files are moved one by one with :func:`os.replace`. Nothing else in the
    directory is touched; a failure leaves no temporary behind.
    """
    target = Path(path)
    names = tuple(writers)
    check_output_dir(target, names, force=force, what=what, exclusive=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise UsageError(f"{what} {target}: cannot write there ({exc.strerror})") from None
    try:
        for name, write in writers.items():
            write(tmp / name)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a model directory is shared
        if not os.path.lexists(target):
            write_marker(tmp, names)
            try:
                os.rename(tmp, target)
                return target
            except OSError:  # created meanwhile: move the files in one by one
                (tmp / MARKER_FILE).unlink()
        claim_output_dir(target, names, force=force, what=what, exclusive=True)
        for name in names:
            os.replace(tmp / name, target / name)
    finally:
        remove_own_temporary(tmp, (*names, MARKER_FILE))
    return target


def remove_own_temporary(directory: Path, names) -> None:
    """Remove a temporary directory neurodeploy made, holding at most the files ``names``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in names:
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
    for leftover in directory.glob(".*"):  # temporaries of write_text_atomic
        if leftover.is_file() and _TEMPORARY_PATTERN.fullmatch(leftover.name):
            leftover.unlink()
    directory.rmdir()


# -- one writer per output directory ------------------------------------------------------------
_held_locks: dict[str, list] = {}  # real path -> [open lock file, depth] of this process
_held_locks_guard = threading.Lock()


@contextmanager
def output_lock(directory: str | os.PathLike, what: str = "--out", timeout_s: float = 0.0):
    """Hold the output directory's lock (an ``fcntl.flock`` on DIR/.neurodeploy.lock).

    Two commands writing into one directory (two sweeps, two deploys) must not run at
    once: the second waits up to ``timeout_s`` seconds, then is refused with a
    :class:`UsageError` naming the directory. The lock is the kernel's, so it is released
    when its holder exits however it ends (also by kill -9); the lock file stays (its
    content is never written). Re-entrant within one process. Creates the directory.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(directory)
    except OSError as exc:
        raise UsageError(f"{what} {directory}: cannot write there ({exc.strerror})") from None
    with _held_locks_guard:
        held = _held_locks.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        handle = _acquire(directory, what, timeout_s)
        with _held_locks_guard:
            _held_locks[key] = held = [handle, 1]
    try:
        yield directory
    finally:
        with _held_locks_guard:
            held[1] -= 1
            if held[1] == 0:
                del _held_locks[key]
                held[0].close()  # closing the file releases the flock


def _acquire(directory: Path, what: str, timeout_s: float):
    try:
        handle = open(directory / LOCK_FILE, "a")  # noqa: SIM115 - held beyond this function
    except OSError as exc:
        raise UsageError(f"{what} {directory}: cannot create its lock ({exc.strerror})") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise UsageError(
                    f"{what} {directory}: another neurodeploy command is writing into this "
                    "directory (it holds its lock); wait for it to finish or give another "
                    "directory"
                ) from None
            time.sleep(0.05)
