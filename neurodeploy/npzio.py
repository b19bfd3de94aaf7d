"""Reading .npz archives that may come from anyone: checked before anything is allocated.

``np.load`` trusts each member's .npy header: a few hundred bytes can claim a
26 GiB array, and numpy allocates it before it finds the data missing. Here
every header is read first and its claimed size compared with the bytes the
member really holds (and with a limit), so a bad file is one error naming the
file and the array, and nothing large is allocated.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import NeurodeployError

# Largest array read from one archive member: 4 GiB, beyond the weights of
# VGG-16 in float64 (1.1 GB) and any data set slice a user passes with --data.
MAX_ARRAY_BYTES = 4 * 2**30


def read_npz(
    path: str | Path,
    error: type[NeurodeployError],
    max_bytes: int = MAX_ARRAY_BYTES,
    mmap: bool = False,
) -> dict[str, np.ndarray]:
    """All arrays of the archive at ``path``, keyed by name (without ``.npy``).

    mmap: uncompressed ("stored") members come back as read-only ``np.memmap`` views of
    the file instead of copies (compressed members are read as usual): a caller that
    converts them (float32 -> float64) reads the page cache once, with no intermediate
    copy. The zip CRC of mapped members is not checked (as with ``np.load(mmap_mode)``);
    sizes are.

    Raises ``error`` (one line naming the file, and the array where one is at
    fault) for a missing or unreadable file, a truncated or corrupt archive, an
    object (pickled) array, or a header that claims more bytes than the member
    holds or than ``max_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file does not exist")
    try:
        mapped = {}
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                layout = _check_member(path, archive, info, error, max_bytes)
                if mmap and info.compress_type == zipfile.ZIP_STORED:
                    mapped[info.filename.removesuffix(".npy")] = _map_member(path, info, layout)
        if len(mapped) == len(archive.infolist()):
            return mapped
        with np.load(path, allow_pickle=False) as npz:
            return {key: mapped[key] if key in mapped else npz[key] for key in npz.files}
    except NeurodeployError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise error(f"{path}: not a readable .npz archive ({' '.join(str(exc).split())})") from None


def _map_member(path: Path, info: zipfile.ZipInfo, layout) -> np.ndarray:
    """Read-only memmap of a stored member's array; layout from :func:`_check_member`."""
    shape, fortran, dtype, header_bytes = layout
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        local = file.read(30)  # zip local file header: fixed part (APPNOTE 4.3.7)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename} has no local header")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header_bytes
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _check_member(path: Path, archive, info: zipfile.ZipInfo, error, max_bytes: int):
    """Check one member's .npy header against its size; returns (shape, fortran, dtype,
    header bytes)."""
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            header_bytes = member.tell()
        except ValueError as exc:
            raise error(f"{path}: array '{name}' has no valid .npy header ({exc})") from None
    if dtype.hasobject:
        raise error(f"{path}: array '{name}' holds Python objects; only numeric arrays load")
    claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if claimed > max_bytes:
        raise error(
            f"{path}: array '{name}' claims {claimed} bytes {tuple(shape)}, more than the "
            f"limit of {max_bytes}"
        )
    held = info.file_size - header_bytes
    if claimed > held:
        raise error(
            f"{path}: array '{name}' claims {claimed} bytes {tuple(shape)} but holds {held} "
            "(truncated or forged header)"
        )
    return shape, fortran, dtype, header_bytes
