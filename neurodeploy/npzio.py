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
    path: str | Path, error: type[NeurodeployError], max_bytes: int = MAX_ARRAY_BYTES
) -> dict[str, np.ndarray]:
    """All arrays of the archive at ``path``, keyed by name (without ``.npy``).

    Raises ``error`` (one line naming the file, and the array where one is at
    fault) for a missing or unreadable file, a truncated or corrupt archive, an
    object (pickled) array, or a header that claims more bytes than the member
    holds or than ``max_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(path, archive, info, error, max_bytes)
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except NeurodeployError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise error(f"{path}: not a readable .npz archive ({' '.join(str(exc).split())})") from None


def _check_member(path: Path, archive, info: zipfile.ZipInfo, error, max_bytes: int) -> None:
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
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
