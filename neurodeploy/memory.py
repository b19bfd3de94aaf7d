"""Memory budget for streaming large batches: how many samples one chunk may hold.

``simulate`` and ``Network.forward`` run a batch in chunks of samples whose working set
(the live activations of one chunk) fits a budget in bytes: by default
:data:`DEFAULT_FRACTION` of the machine's available memory, settable per call
(``memory_budget=``), process-wide (:func:`set_memory_budget`) or by the environment
variable ``NEURODEPLOY_MEMORY_BUDGET`` (bytes; suffixes K, M, G = 2^10, 2^20, 2^30).
Every sample is computed by the same kernels whatever chunk it falls in, so results
do not depend on the chunk size.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import weakref

import numpy as np

from .errors import UsageError

# Share of the available memory one call may use by default: the rest stays for the
# caller's own arrays (inputs, the returned trace) and for other processes.
DEFAULT_FRACTION = 0.5
ENV_VARIABLE = "NEURODEPLOY_MEMORY_BUDGET"
_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}
_budget: int | None = None


def parse_bytes(text: str, what: str = ENV_VARIABLE) -> int:
    """``"8G"``, ``"512M"``, ``"1000000"`` -> bytes; raises UsageError naming ``what``."""
    raw = str(text).strip().upper().removesuffix("B")
    scale = _SUFFIXES.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in _SUFFIXES else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise UsageError(f"{what}: expected bytes such as 8G or 512M, got {text!r}") from None
    if not value >= 1:
        raise UsageError(f"{what}: the memory budget must be at least 1 byte, got {text!r}")
    return int(value)


def available_bytes() -> int:
    """Memory available to new allocations (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def set_memory_budget(budget: int | str | None) -> None:
    """Set the process-wide budget (bytes, or text such as ``"8G"``); None: the default."""
    global _budget
    _budget = None if budget is None else _as_bytes(budget, "set_memory_budget")


def memory_budget(budget: int | str | None = None) -> int:
    """The budget in bytes: ``budget`` if given, else the process-wide one, else the
    environment variable, else DEFAULT_FRACTION of the available memory."""
    if budget is not None:
        return _as_bytes(budget, "memory_budget")
    if _budget is not None:
        return _budget
    env = os.environ.get(ENV_VARIABLE)
    if env:
        return parse_bytes(env)
    return int(DEFAULT_FRACTION * available_bytes())


def _as_bytes(budget, what: str) -> int:
    if isinstance(budget, str):
        return parse_bytes(budget, what)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UsageError(f"{what}: expected a positive number of bytes, got {budget!r}")
    return budget


def chunk_samples(per_sample_bytes: int, budget: int | str | None = None) -> int:
    """Samples per chunk whose working set (per_sample_bytes each) fits the budget; >= 1."""
    return max(1, memory_budget(budget) // max(1, int(per_sample_bytes)))


def chunks(n: int, per_chunk: int):
    """(lo, hi) sample ranges of at most per_chunk samples covering range(n)."""
    return [(lo, min(n, lo + per_chunk)) for lo in range(0, max(n, 1), per_chunk)] if n else []


# -- reused output arrays ---------------------------------------------------------------
# Large arrays (the maps a forward or simulation writes and returns) come from a pool of
# blocks that earlier, dropped results gave back, instead of fresh memory. Memory the C
# allocator hands back to the system between calls faults its pages in again on first
# touch, and with two threads working each fault and unmap interrupts both cores:
# measured on ResNet-50 at batch 2 (float64 simulate, 178 MB of spike times per call),
# 15,800 page faults and 72-150 ms of system time per call in a benchmark process whose
# allocator had returned that memory, 190-196 ms instead of 220-311 ms without them.
# A block is a private anonymous memory map (outside the C heap; transparent huge pages
# asked for) that goes back to the pool when the last array using it is dropped, and is
# reused for an array of exactly its size (a network's layers ask for the same sizes
# each call); the pool keeps at most POOL_FRACTION of the memory budget, as measured
# when the pool first fills (release_pool() empties it).
POOL_FRACTION = 0.1
POOL_MIN_BYTES = 1 << 20  # smaller arrays come from the allocator as usual
_pool: dict[int, list] = {}
_pool_bytes = 0
_pool_cap: int | None = None
_pool_lock = threading.Lock()

# tracemalloc sees a block while an array uses it, as it sees numpy's own buffers (the
# memory tests measure with it): numpy's trace domain, through Python's C API.
_TRACE_DOMAIN = 389047  # NPY_TRACE_DOMAIN (numpy/core/src/multiarray/alloc.c)
_TRACK = ctypes.pythonapi.PyTraceMalloc_Track
_TRACK.argtypes, _TRACK.restype = [ctypes.c_uint, ctypes.c_size_t, ctypes.c_size_t], ctypes.c_int
_UNTRACK = ctypes.pythonapi.PyTraceMalloc_Untrack
_UNTRACK.argtypes, _UNTRACK.restype = [ctypes.c_uint, ctypes.c_size_t], ctypes.c_int


def reusable_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty(shape, dtype), from the pool of dropped blocks when one of its size is
    there (see above): uninitialised, C-contiguous, writeable, the caller's."""
    global _pool_bytes
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < POOL_MIN_BYTES:
        return np.empty(shape, dtype)
    with _pool_lock:
        blocks = _pool.get(nbytes)
        block = blocks.pop() if blocks else None
        if block is not None:
            _pool_bytes -= nbytes
    if block is None:
        # Private: mmap(-1, n) alone shares its pages with every forked child (a sweep's
        # worker processes), which would then write into the parent's arrays.
        block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            block.madvise(mmap.MADV_HUGEPAGE)
    # Views of the array keep ``flat`` alive (numpy stops collapsing a view's base at an
    # array whose base is not an array), so the block returns only when all are gone.
    flat = np.frombuffer(block, dtype, count)
    address = flat.__array_interface__["data"][0]
    _TRACK(_TRACE_DOMAIN, address, nbytes)
    weakref.finalize(flat, _give_back, block, nbytes, address).atexit = False
    return flat.reshape(shape)


def _give_back(block, nbytes: int, address: int) -> None:
    global _pool_bytes, _pool_cap
    _UNTRACK(_TRACE_DOMAIN, address)
    with _pool_lock:
        if _pool_cap is None:
            _pool_cap = int(POOL_FRACTION * memory_budget())
        if _pool_bytes + nbytes <= _pool_cap:
            _pool.setdefault(nbytes, []).append(block)
            _pool_bytes += nbytes


def release_pool() -> int:
    """Give every pooled block back to the system; returns the bytes released."""
    global _pool_bytes, _pool_cap
    with _pool_lock:
        released, _pool_bytes, _pool_cap = _pool_bytes, 0, None
        _pool.clear()
    return released


def _forget_pool() -> None:
    """In a forked child: a lock the parent may have held mid-call, and no blocks (the
    child's copies of the parent's free blocks are its own, but need not be kept)."""
    global _pool_lock, _pool_bytes
    _pool_lock = threading.Lock()
    _pool.clear()
    _pool_bytes = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
