"""Snapshot real file metadata into a labelled data set for file classification.

The data set follows the setting of Stanojevic et al., "File classification based
on spiking neural networks" (ISCAS 2020): files in a storage system are classified
from key-value *metadata* only. This tool walks real directory trees and writes
one JSON object per regular file (gzip-compressed JSON Lines) with these keys:

``extension``
    lower-case text after the last dot of the name, skipping trailing purely
    numeric components (``libfoo.so.1.2`` -> ``so``); ``""`` if there is none.
    A leading dot does not start an extension (``.bashrc`` -> ``""``).
``size_bucket``
    ``floor(log2(size + 1))`` with the size in bytes.
``depth``
    number of path components below the root that was given (a file directly
    in the root has depth 1).
``parents``
    names of the (up to) 3 nearest parent directories, nearest first,
    lower-case; directories above the root are not included.
``name_tokens``
    lower-case tokens of the file name, split on non-alphanumerics and on
    letter/digit boundaries; digits-only tokens become ``"<num>"``; at most 8.
``mode``
    permission bits (``stat.S_IMODE``) as an octal string, e.g. ``"644"``.
``executable``
    whether any execute bit is set.
``owner``
    user name of the owner (``pwd``), or the uid as a string.
``links``
    hard-link count (``st_nlink``) capped at 10.
``age_bucket``
    ``floor(log2(1 + age_days))`` with ``age_days = (now - mtime) / 86400``,
    clamped at 0, where ``now`` is taken once when the run starts.
``label``
    content category from the first 4096 bytes, see :func:`content_label`.
    It is the only key that looks at file contents.

Empty files are labelled ``"empty"`` and are not written. ``--max-per-class N``
keeps a uniform random sample (one reservoir per class, seeded) of at most ``N``
files per class, so that no class dominates. Walking is deterministic
(directory entries are sorted), does not follow symlinks, skips everything that
is not a regular file or cannot be stat-ed or read, never enters ``/proc``,
``/sys``, ``/dev``, ``/run``, ``/tmp`` or ``.git`` directories, and walks each
directory at most once even if roots overlap.

``--check FILE`` evaluates an existing snapshot: for every key the accuracy of
the best single-key rule (majority label per value, learned on a stratified 70 %
training part, seed 0, evaluated on the held-out 30 %), then held-out accuracies
of scikit-learn baselines on one-hot features of all keys.

Usage, from the repository root::

    .venv/bin/python tools/snapshot_files.py ROOT [ROOT ...] \\
        --out neurodeploy/data/files_snapshot.jsonl.gz [--max-per-class N] [--seed S] [--now EPOCH]
    .venv/bin/python tools/snapshot_files.py --check neurodeploy/data/files_snapshot.jsonl.gz
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import math
import os
import pwd
import random
import re
import stat
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

SNIFF_BYTES = 4096
MAX_NAME_TOKENS = 8
MAX_PARENTS = 3
MAX_LINKS = 10
SECONDS_PER_DAY = 86400.0
EXCLUDED_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp")
EXCLUDED_DIR_NAMES = frozenset({".git"})
EMPTY_LABEL = "empty"
LABELS = ("elf", "bytecode", "image", "archive", "script", "text", "data")
FEATURE_KEYS = (
    "extension",
    "size_bucket",
    "depth",
    "parents",
    "name_tokens",
    "mode",
    "executable",
    "owner",
    "links",
    "age_bucket",
)
CHECK_TEST_FRACTION = 0.3
CHECK_SEED = 0

_NAME_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+")
# CPython .pyc magic numbers (little-endian uint16 before b"\r\n"):
# 1.5-2.7 used 20121..62211, 3.x uses 3000..3999.
_PYC_MAGIC_RANGES = ((20121, 62211), (3000, 3999))
# An SVG document starts with an XML declaration, a comment, an SVG doctype or <svg
# (HTML pages with inline <svg> elements are text).
_SVG_DOCUMENT_STARTS = ("<?xml", "<!--", "<!doctype svg", "<svg")
_BMP_DIB_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_ARCHIVE_MAGICS = (
    b"\x1f\x8b",  # gzip
    b"PK\x03\x04",  # zip, jar, whl, ...
    b"PK\x05\x06",  # empty zip
    b"PK\x07\x08",  # spanned zip
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"7z\xbc\xaf\x27\x1c",  # 7z
)
_IMAGE_MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


class UsageError(Exception):
    """A bad command-line argument; reported as one line with exit status 2."""


# --------------------------------------------------------------------------- labelling


def _decode_utf8_prefix(head: bytes, is_whole_file: bool) -> str | None:
    """Decode ``head`` as UTF-8, or return None if it is not NUL-free UTF-8.

    When ``head`` is only a prefix of the file, a multi-byte character cut off
    at the end is not an error.
    """
    if b"\x00" in head:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(head, final=is_whole_file)
    except UnicodeDecodeError:
        return None


def _is_pyc(head: bytes) -> bool:
    """CPython bytecode: a known 2-byte magic number, then ``b"\\r\\n"``, binary body."""
    if len(head) < 4 or head[2:4] != b"\r\n" or b"\x00" not in head:
        return False
    magic = int.from_bytes(head[:2], "little")
    return any(low <= magic <= high for low, high in _PYC_MAGIC_RANGES)


def _is_binary_image(head: bytes) -> bool:
    """PNG, JPEG, GIF, TIFF, BMP (with a valid DIB header size) or ICO."""
    if head.startswith(_IMAGE_MAGICS):
        return True
    if head.startswith(b"BM") and len(head) >= 18:
        return int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES
    if head.startswith(b"\x00\x00\x01\x00") and len(head) >= 6:  # ICO with >= 1 image
        return int.from_bytes(head[4:6], "little") > 0
    return False


def _is_archive(head: bytes) -> bool:
    """gzip, zip, bzip2, xz, zstd, 7z, or a POSIX tar (``ustar`` at offset 257)."""
    if head.startswith(_ARCHIVE_MAGICS):
        return True
    if (
        head.startswith(b"BZh")
        and len(head) >= 10
        and head[3:4] in b"123456789"
        and head[4:10] in (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
    ):
        return True
    return head[257:262] == b"ustar"


def content_label(head: bytes, is_whole_file: bool) -> str:
    """Return the content category of a file from its first (up to 4096) bytes.

    ``head`` is the start of the file; ``is_whole_file`` says whether it is the
    entire file (then a truncated UTF-8 sequence at the end is an error). The
    first matching rule wins:

    ``empty``     no bytes at all;
    ``elf``       starts with ``b"\\x7fELF"``;
    ``bytecode``  CPython ``.pyc``: 2 magic bytes (a CPython magic number) then
                  ``b"\\r\\n"``, and a NUL byte in ``head`` (a .pyc header has some);
    ``image``     PNG, JPEG, GIF, BMP, ICO or TIFF magic, or SVG/XML text: text
                  that starts (after blanks) with ``<?xml``, ``<!--``,
                  ``<!DOCTYPE svg`` or ``<svg`` and contains ``<svg``;
    ``archive``   gzip, zip/jar/whl, bzip2, xz, zstd, 7z magic, or ``ustar`` at
                  offset 257 (tar);
    ``script``    text (as below) starting with ``#!``;
    ``text``      NUL-free UTF-8;
    ``data``      anything else (binary).
    """
    if not head:
        return EMPTY_LABEL
    if head.startswith(b"\x7fELF"):
        return "elf"
    if _is_pyc(head):
        return "bytecode"
    if _is_binary_image(head):
        return "image"
    if _is_archive(head):
        return "archive"
    text = _decode_utf8_prefix(head, is_whole_file)
    if text is None:
        return "data"
    lowered = text.lstrip("\ufeff \t\r\n").lower()
    if lowered.startswith(_SVG_DOCUMENT_STARTS) and "<svg" in lowered:
        return "image"
    if text.startswith("#!"):
        return "script"
    return "text"


# --------------------------------------------------------------------------- metadata


def file_extension(name: str) -> str:
    """Lower-case extension: the last dot-separated component that is not all digits."""
    components = name.lower().lstrip(".").split(".")[1:]
    for component in reversed(components):
        if not component.isdigit():
            return component
    return ""


def name_tokens(name: str) -> list[str]:
    """Lower-case alphabetic / numeric runs of ``name``, numbers as ``<num>``, at most 8."""
    tokens = _NAME_TOKEN_RE.findall(name.lower())
    return ["<num>" if token.isdigit() else token for token in tokens[:MAX_NAME_TOKENS]]


def log2_bucket(value: float) -> int:
    """``floor(log2(1 + value))`` for ``value >= 0`` (negative values count as 0)."""
    return int(math.floor(math.log2(1.0 + max(0.0, value))))


class OwnerNames:
    """Cached uid -> user name lookup, falling back to the uid as a string."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, uid: int) -> str:
        if uid not in self._names:
            try:
                self._names[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._names[uid] = str(uid)
        return self._names[uid]


def metadata_row(
    relative_parts: tuple[str, ...], info: os.stat_result, now: float, owner_of: OwnerNames
) -> dict:
    """The metadata keys (everything but ``label``) of one file.

    ``relative_parts`` is the file's path below its root, split into components.
    """
    name = relative_parts[-1]
    permissions = stat.S_IMODE(info.st_mode)
    return {
        "extension": file_extension(name),
        "size_bucket": log2_bucket(info.st_size),
        "depth": len(relative_parts),
        "parents": [part.lower() for part in reversed(relative_parts[-1 - MAX_PARENTS : -1])],
        "name_tokens": name_tokens(name),
        "mode": format(permissions, "03o"),
        "executable": bool(permissions & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)),
        "owner": owner_of(info.st_uid),
        "links": min(info.st_nlink, MAX_LINKS),
        "age_bucket": log2_bucket((now - info.st_mtime) / SECONDS_PER_DAY),
    }


def read_head(path: str) -> tuple[bytes, bool] | None:
    """First ``SNIFF_BYTES`` bytes of a regular file and whether that is all of it.

    Returns None if the file cannot be opened or is no longer a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        head = os.read(descriptor, SNIFF_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return head[:SNIFF_BYTES], len(head) <= SNIFF_BYTES


# --------------------------------------------------------------------------- walking


class WalkStats:
    """Counters for the summary."""

    def __init__(self) -> None:
        self.files_seen = 0
        self.skipped_not_regular = 0
        self.skipped_unreadable = 0
        self.seen_per_label: Counter[str] = Counter()


def _is_excluded(path: str, excluded: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in excluded)


def walk_rows(
    roots: list[str], now: float, excluded: tuple[str, ...], stats: WalkStats
) -> Iterator[dict]:
    """Yield one labelled row per non-empty regular file under ``roots``.

    Directories are visited in sorted order and at most once (by device and
    inode), symlinks are never followed, unreadable entries are skipped.
    """
    owner_of = OwnerNames()
    walked_dirs: set[tuple[int, int]] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda error: None):
            try:
                dir_info = os.lstat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            dir_key = (dir_info.st_dev, dir_info.st_ino)
            if dir_key in walked_dirs:
                dirnames[:] = []
                continue
            walked_dirs.add(dir_key)
            dirnames[:] = sorted(
                name
                for name in dirnames
                if name not in EXCLUDED_DIR_NAMES
                and not _is_excluded(os.path.join(dirpath, name), excluded)
            )
            relative_dir = os.path.relpath(dirpath, root)
            dir_parts = () if relative_dir == "." else tuple(Path(relative_dir).parts)
            for filename in sorted(filenames):
                yield from _row_for_file(dirpath, dir_parts, filename, now, owner_of, stats)


def _row_for_file(
    dirpath: str,
    dir_parts: tuple[str, ...],
    filename: str,
    now: float,
    owner_of: OwnerNames,
    stats: WalkStats,
) -> Iterator[dict]:
    """Yield the row of one directory entry, or nothing if it is skipped or empty."""
    path = os.path.join(dirpath, filename)
    try:
        info = os.lstat(path)
    except OSError:
        stats.skipped_unreadable += 1
        return
    if not stat.S_ISREG(info.st_mode):
        stats.skipped_not_regular += 1
        return
    stats.files_seen += 1
    sniffed = read_head(path)
    if sniffed is None:
        stats.skipped_unreadable += 1
        return
    label = content_label(*sniffed)
    stats.seen_per_label[label] += 1
    if label == EMPTY_LABEL:
        return
    row = metadata_row((*dir_parts, filename), info, now, owner_of)
    row["label"] = label
    yield row


class PerClassReservoir:
    """Uniform random sample of at most ``capacity`` rows per label (Algorithm R)."""

    def __init__(self, capacity: int | None, rng: random.Random) -> None:
        self.capacity = capacity
        self.rng = rng
        self.samples: dict[str, list[dict]] = defaultdict(list)
        self.offered: Counter[str] = Counter()

    def offer(self, row: dict) -> None:
        label = row["label"]
        self.offered[label] += 1
        sample = self.samples[label]
        if self.capacity is None or len(sample) < self.capacity:
            sample.append(row)
            return
        slot = self.rng.randrange(self.offered[label])
        if slot < self.capacity:
            sample[slot] = row

    def rows(self) -> list[dict]:
        """All kept rows, shuffled with the reservoir's generator."""
        kept = [row for label in sorted(self.samples) for row in self.samples[label]]
        self.rng.shuffle(kept)
        return kept


def write_jsonl_gz_atomically(rows: list[dict], out: Path) -> None:
    """Write ``rows`` as gzip JSON Lines to ``out`` via a temporary file and ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle, gzip.GzipFile(fileobj=handle, mode="wb", mtime=0, filename="") as packed:
            for row in rows:
                packed.write(json.dumps(row, ensure_ascii=False, sort_keys=False).encode())
                packed.write(b"\n")
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, out)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def snapshot(roots: list[str], out: Path, max_per_class: int | None, seed: int, now: float) -> None:
    """Walk ``roots``, sample per class, write ``out`` and print a summary."""
    stats = WalkStats()
    reservoir = PerClassReservoir(max_per_class, random.Random(seed))
    started = time.monotonic()
    for row in walk_rows(roots, now, EXCLUDED_DIRS, stats):
        reservoir.offer(row)
    rows = reservoir.rows()
    write_jsonl_gz_atomically(rows, out)
    written = Counter(row["label"] for row in rows)
    now_text = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")
    print(f"now: {now:.0f} ({now_text})")
    print(f"roots: {' '.join(roots)}")
    print(
        f"files seen: {stats.files_seen} (regular); skipped: {stats.skipped_unreadable} "
        f"unreadable, {stats.skipped_not_regular} not regular"
    )
    print(f"{'class':<10} {'seen':>8} {'written':>8}")
    for label in (*LABELS, EMPTY_LABEL):
        print(f"{label:<10} {stats.seen_per_label[label]:>8} {written[label]:>8}")
    print(
        f"rows written: {len(rows)} to {out} ({out.stat().st_size} bytes) "
        f"in {time.monotonic() - started:.1f} s"
    )


# --------------------------------------------------------------------------- checking


def load_rows(path: Path) -> list[dict]:
    """Read a gzip JSON Lines snapshot."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def single_key_rule_accuracy(train_rows: list[dict], test_rows: list[dict], key: str) -> float:
    """Held-out accuracy of "predict the training majority label of this key's value".

    List values count as one value (the whole tuple). Values never seen in
    training get the overall training majority label.
    """
    by_value: dict[object, Counter[str]] = defaultdict(Counter)
    for row in train_rows:
        by_value[_hashable(row[key])][row["label"]] += 1
    overall_majority = Counter(row["label"] for row in train_rows).most_common(1)[0][0]
    rule = {value: counts.most_common(1)[0][0] for value, counts in by_value.items()}
    hits = sum(rule.get(_hashable(row[key]), overall_majority) == row["label"] for row in test_rows)
    return hits / len(test_rows)


def one_hot_features(row: dict) -> dict[str, object]:
    """DictVectorizer input: every key categorical; list keys become ``key=token`` features."""
    return {
        key: [str(item) for item in row[key]] if isinstance(row[key], list) else str(row[key])
        for key in FEATURE_KEYS
    }


def check(path: Path) -> None:
    """Print single-key-rule and baseline held-out accuracies for a snapshot."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC, LinearSVC

    rows = load_rows(path)
    labels = [row["label"] for row in rows]
    train_rows, test_rows = train_test_split(
        rows, test_size=CHECK_TEST_FRACTION, random_state=CHECK_SEED, stratify=labels
    )
    print(f"{path}: {len(rows)} rows, train {len(train_rows)}, test {len(test_rows)}")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(labels).items())))
    print("single-key rule, held-out accuracy:")
    accuracies = {key: single_key_rule_accuracy(train_rows, test_rows, key) for key in FEATURE_KEYS}
    for key, accuracy in accuracies.items():
        print(f"  {key:<12} {accuracy:.4f}")
    best_key = max(accuracies, key=accuracies.get)
    print(f"  best: {best_key} {accuracies[best_key]:.4f}")

    vectorizer = DictVectorizer()
    train_x = vectorizer.fit_transform([one_hot_features(row) for row in train_rows])
    test_x = vectorizer.transform([one_hot_features(row) for row in test_rows])
    train_y = [row["label"] for row in train_rows]
    test_y = [row["label"] for row in test_rows]
    print(f"baselines on {train_x.shape[1]} one-hot features, held-out accuracy:")
    models = {
        "LogisticRegression(max_iter=2000)": LogisticRegression(max_iter=2000),
        "LinearSVC()": LinearSVC(),
        'SVC(kernel="rbf")': SVC(kernel="rbf"),
    }
    for name, model in models.items():
        started = time.monotonic()
        model.fit(train_x, train_y)
        accuracy = model.score(test_x, test_y)
        print(f"  {name:<34} {accuracy:.4f}  ({time.monotonic() - started:.1f} s)")


# --------------------------------------------------------------------------- command line


class _OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="snapshot_files.py",
        description="Snapshot file metadata with content labels, or check a snapshot.",
    )
    parser.add_argument("roots", nargs="*", metavar="ROOT", help="directory trees to walk")
    parser.add_argument("--out", type=Path, help="output .jsonl.gz file")
    parser.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        metavar="N",
        help="keep a uniform random sample of at most N files per class (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--now",
        type=float,
        default=None,
        metavar="EPOCH",
        help="reference time for age_bucket in seconds since the epoch (default: start time)",
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="print single-key-rule and baseline accuracies of an existing snapshot",
    )
    return parser


def validated_roots(roots: list[str]) -> list[str]:
    """Absolute, normalised roots; raises UsageError for bad or excluded ones."""
    resolved = []
    for root in roots:
        absolute = os.path.abspath(root)
        if not os.path.isdir(absolute):
            raise UsageError(f"root is not a directory: {root}")
        if _is_excluded(os.path.realpath(absolute), EXCLUDED_DIRS):
            excluded = ", ".join(EXCLUDED_DIRS)
            raise UsageError(f"root is inside an excluded tree ({excluded}): {root}")
        resolved.append(absolute)
    return resolved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.check is not None:
            if args.roots or args.out is not None:
                raise UsageError("--check takes no ROOT and no --out")
            if not args.check.is_file():
                raise UsageError(f"no such snapshot file: {args.check}")
            check(args.check)
            return 0
        if not args.roots:
            raise UsageError("give at least one ROOT (or --check FILE)")
        if args.out is None:
            raise UsageError("--out is required when walking ROOTs")
        if args.max_per_class is not None and args.max_per_class < 1:
            raise UsageError(f"--max-per-class must be at least 1, got {args.max_per_class}")
        roots = validated_roots(args.roots)
        now = time.time() if args.now is None else args.now
        snapshot(roots, args.out, args.max_per_class, args.seed, now)
    except UsageError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
