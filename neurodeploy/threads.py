"""BLAS threads: one while a result must be the same bits everywhere, and the blocks of a
convolution computed on the machine's cores by our own workers.

OpenBLAS splits a matrix product between its threads in a way that changes the
order of the additions, so 1 and 2 threads give different last bits (measured:
429 of the 540 x 128 elements of a 540x64 @ 64x128 float64 product on an AMD
EPYC with OpenBLAS's Haswell kernels). Code whose result is recorded - a sweep
task (neurodeploy.sweep), fine-tuning (neurodeploy.finetune) - computes inside
:func:`one_blas_thread`, so its bits do not depend on the machine's thread count
(``OPENBLAS_NUM_THREADS``), the executor or the number of workers.

Block workers (:func:`block_workers`, :func:`run_blocks`): ``ops.conv2d`` computes its
blocks (gather, product, elementwise finish) on as many threads as BLAS would use, each
block's product on one BLAS thread. Each core then works on the blocks in its own cache
(a two-thread product leaves half of its output in the other core's cache, where the
elementwise passes after it read it at memory speed), and a block's bits do not depend
on the thread count. Inside :func:`one_blas_thread` the blocks run in the calling thread
alone.

The limit: while any holder (of either kind) runs, every OpenBLAS library that was
loaded when this process first held it (numpy's, and scipy's own) computes in one
thread (and, in the thread of a :func:`one_blas_thread` holder, every OpenMP library
and other BLAS). It is process-wide, so holders in several threads of one process (a
dask worker with nthreads > 1, a simulation beside a sweep task) share it, reference
counted: the first sets it, the last one out restores each library's thread count.
Nothing global is left changed afterwards. The libraries are set through their own
``openblas_set_num_threads``: threadpoolctl (3.8) lets only one thread at a time change
OpenBLAS and silently ignores the others, and the last holder out may be any thread.

A thread limit does not make different BLAS kernels agree (OpenBLAS picks them
by CPU model): where a result must match across machines, the arithmetic itself
has to be order-fixed (as the file classifier's training is, see
neurodeploy.fileclass.model).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading
from contextlib import contextmanager

import numpy as np

_limit_lock = threading.Lock()
_limit_holders = 0  # every holder: one_blas_thread and block_workers
_serial_holders = 0  # one_blas_thread holders: block_workers give width 1 meanwhile
_originals: list = []  # (library, thread count) before the first holder, to restore
_width = 1  # block workers: numpy's OpenBLAS thread count before the first holder
_libraries = None  # the loaded OpenBLAS libraries (numpy's first); () where none


class _OpenBLAS:
    """One loaded OpenBLAS library's thread count, through its own C functions."""

    def __init__(self, path: str):
        library = ctypes.CDLL(path)  # the copy already loaded: dlopen gives its handle
        names = [f"{prefix}openblas_%s_num_threads{suffix}"
                 for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")]
        name = next((n for n in names if hasattr(library, n % "get")), None)
        if name is None:
            raise OSError(f"{path}: no openblas_get_num_threads")
        self.get = getattr(library, name % "get")
        self.get.restype, self.get.argtypes = ctypes.c_int, []
        self.set = getattr(library, name % "set")
        self.set.restype, self.set.argtypes = None, [ctypes.c_int]


def _openblas_libraries() -> tuple:
    """The OpenBLAS libraries loaded when first asked, numpy's first, or () where numpy's
    BLAS is no OpenBLAS of its wheel (the limit then leaves them alone and there are no
    block workers)."""
    global _libraries
    if _libraries is None:
        from threadpoolctl import threadpool_info

        paths = [lib["filepath"] for lib in threadpool_info()
                 if lib["internal_api"] == "openblas"]
        numpy_dir = os.path.dirname(np.__file__)  # its wheel's libraries: numpy.libs
        ours = [p for p in paths if os.path.dirname(p) in (numpy_dir, numpy_dir + ".libs")]
        _libraries = ()
        if ours:
            try:
                _libraries = tuple(_OpenBLAS(p) for p in ours[:1] + sorted(set(paths) - {ours[0]}))
            except OSError:  # an OpenBLAS without the usual entry points
                pass
    return _libraries


def _enter(serial: bool) -> int:
    """Register a holder (under the lock); returns the width block workers may use."""
    global _limit_holders, _serial_holders, _width
    if _limit_holders == 0:
        libraries = _openblas_libraries()
        _originals[:] = [(library, library.get()) for library in libraries]
        _width = _originals[0][1] if _originals else 1
        for library, _ in _originals:
            library.set(1)
    _limit_holders += 1
    _serial_holders += serial
    return 1 if _serial_holders else _width


def _leave(serial: bool) -> None:
    global _limit_holders, _serial_holders
    _limit_holders -= 1
    _serial_holders -= serial
    if _limit_holders == 0:
        for library, count in reversed(_originals):
            library.set(count)
        _originals.clear()


# Thread pools one_blas_thread limits through threadpoolctl, for the holder's thread:
# OpenMP (whose limits are per thread) and BLAS libraries other than OpenBLAS.
_OTHER_POOLS = {"openmp": 1, "mkl": 1, "blis": 1, "flexiblas": 1}


@contextmanager
def one_blas_thread():
    """OpenBLAS in one thread, and no block workers, for as long as any holder in this
    process runs; OpenMP and any other BLAS in one thread for this holder
    (``threadpool_limits``, undone by it)."""
    from threadpoolctl import threadpool_limits

    with _limit_lock:
        _enter(serial=True)
    try:
        with threadpool_limits(limits=_OTHER_POOLS):
            yield
    finally:
        with _limit_lock:
            _leave(serial=True)


def with_one_blas_thread(function):
    """Decorator: run ``function`` inside :func:`one_blas_thread`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return function(*args, **kwargs)

    return wrapper


@contextmanager
def block_workers():
    """Yields how many threads may compute blocks (:func:`run_blocks`): numpy's OpenBLAS
    thread count before the first holder entered (``OPENBLAS_NUM_THREADS``; 1 inside
    :func:`one_blas_thread` or where numpy's BLAS is not an OpenBLAS); meanwhile OpenBLAS
    computes in one thread."""
    with _limit_lock:
        width = _enter(serial=False)
    try:
        yield width
    finally:
        with _limit_lock:
            _leave(serial=False)


_scratch = threading.local()


def scratch(what: str, size: int, dtype) -> np.ndarray:
    """A 1-D buffer of ``size`` elements of ``dtype`` that this thread keeps for ``what``
    from call to call (grown when too small; not zeroed): block buffers are reused
    instead of allocated per call. Memory the allocator took back from a freed buffer
    comes back as fresh pages that fault on first touch (measured: simulate of ResNet-50
    at batch 2 spent 60 ms of system time in 21,000 page faults per call where the
    process held many 1 MB arrays); a kept buffer never does. One user per ``what``
    per thread at a time."""
    dtype = np.dtype(dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    nbytes = size * dtype.itemsize
    buf = buffers.get(what)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[what] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype)


class _Helper(threading.Thread):
    """A daemon thread that runs the blocks of one :class:`_Job` at a time."""

    def __init__(self):
        super().__init__(name="neurodeploy-blocks", daemon=True)
        self.wake = threading.Event()
        self.job = None

    def post(self, job: _Job) -> None:
        self.job = job
        self.wake.set()

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            job, self.job = self.job, None
            job.work(helper=True)


class _Job:
    def __init__(self, count: int, run, helpers: int):
        self.count = count
        self.run = run
        self.next = itertools.count()  # next() is atomic under the GIL
        self.error: BaseException | None = None
        self.pending = helpers
        self.done = threading.Event()
        self.lock = threading.Lock()

    def work(self, helper: bool) -> None:
        """Take blocks in order until none is left (or one failed); a helper signals."""
        try:
            while self.error is None:
                index = next(self.next)
                if index >= self.count:
                    break
                self.run(index)
        except BaseException as exc:  # re-raised in the caller by run_blocks
            self.error = self.error or exc
        finally:
            if helper:
                with self.lock:
                    self.pending -= 1
                    if not self.pending:
                        self.done.set()


_idle: list[_Helper] = []
_idle_lock = threading.Lock()


def _forget_helpers() -> None:  # a forked child has none of its parent's threads
    global _idle_lock, _limit_lock
    _idle.clear()
    _idle_lock = threading.Lock()
    _limit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def run_blocks(count: int, run, width: int) -> None:
    """run(index) for every index in range(count), on up to ``width`` threads: the calling
    thread and helpers, each taking the next index when it is done with one (per-thread
    buffers: :func:`scratch`). The first exception stops the others taking blocks and is
    raised here once all stopped."""
    helpers = max(0, min(width, count) - 1)
    if not helpers:
        for index in range(count):
            run(index)
        return
    with _idle_lock:
        taken = [_idle.pop() for _ in range(min(helpers, len(_idle)))]
    while len(taken) < helpers:
        helper = _Helper()
        helper.start()
        taken.append(helper)
    job = _Job(count, run, helpers)
    for helper in taken:
        helper.post(job)
    job.work(helper=False)
    job.done.wait()
    with _idle_lock:
        _idle.extend(taken)
    if job.error is not None:
        raise job.error


__all__ = ["block_workers", "one_blas_thread", "run_blocks", "scratch", "with_one_blas_thread"]
