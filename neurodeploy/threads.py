"""BLAS threads: one while a result must be the same bits everywhere, and the blocks of a
convolution computed on the machine's cores by our own workers.

OpenBLAS splits a matrix product between its threads in a way that changes the
order of the additions, so 1 and 2 threads give different last bits (measured:
429 of the 540 x 128 elements of a 540x64 @ 64x128 float64 product on an AMD
EPYC with OpenBLAS's Haswell kernels). Code whose result is recorded - a sweep
task (neurodeploy.sweep), fine-tuning (neurodeploy.finetune) - computes inside
:func:`one_blas_thread`, so its bits do not depend on the machine's thread count
(``OPENBLAS_NUM_THREADS``), the executor or the number of workers.

The limit is ``threadpoolctl.threadpool_limits(1)`` on every BLAS and OpenMP
library loaded when the first holder enters; it is process-wide, so holders in
several threads of one process (a dask worker with nthreads > 1) share one
limiter, reference counted: the first sets it, the last one out restores the
original limits. Nothing global is left changed afterwards.

Block workers (:func:`block_workers`, :func:`run_blocks`): ``ops.conv2d`` computes its
blocks (gather, product, elementwise finish) on as many threads as BLAS would use, each
block's product on one BLAS thread. Each core then works on the blocks in its own cache
(a two-thread product leaves half of its output in the other core's cache, where the
elementwise passes after it read it at memory speed), and a block's bits do not depend
on the thread count. While a holder runs, OpenBLAS computes in one thread (the same
reference-counted limit); inside :func:`one_blas_thread` the blocks run in the calling
thread alone.

A thread limit does not make different BLAS kernels agree (OpenBLAS picks them
by CPU model): where a result must match across machines, the arithmetic itself
has to be order-fixed (as the file classifier's training is, see
neurodeploy.fileclass.model).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from contextlib import contextmanager

import numpy as np

_limit_lock = threading.Lock()
_limit_holders = 0  # every holder: one_blas_thread and block_workers
_serial_holders = 0  # one_blas_thread holders: block_workers give width 1 meanwhile
_restores: list = []  # undo steps of the holders that changed limits, run by the last out
_width = 1  # block workers: OpenBLAS's thread count before the first holder entered
_openblas = None  # threadpoolctl's OpenBLAS controllers, numpy's first (): none


def _openblas_controllers() -> tuple:
    """threadpoolctl's controllers of the OpenBLAS libraries loaded, numpy's first (scipy
    loads one of its own), or () where no OpenBLAS inside numpy's wheel is found."""
    global _openblas
    if _openblas is None:
        from threadpoolctl import ThreadpoolController

        found = ThreadpoolController().select(internal_api="openblas").lib_controllers
        numpy_dir = os.path.dirname(np.__file__)  # its wheel's libraries: numpy.libs
        ours = [c for c in found
                if os.path.dirname(c.filepath) in (numpy_dir, numpy_dir + ".libs")]
        _openblas = (ours[0], *(c for c in found if c is not ours[0])) if ours else ()
    return _openblas


def _enter(serial: bool) -> int:
    """Register a holder (under the lock); returns the width block workers may use."""
    global _limit_holders, _serial_holders, _width
    if _limit_holders == 0:
        blas = _openblas_controllers()
        _width = blas[0].get_num_threads() if blas else 1
        if not serial and _width > 1:
            for lib in blas:
                _restores.append(functools.partial(lib.set_num_threads, lib.get_num_threads()))
                lib.set_num_threads(1)
    if serial and _serial_holders == 0:
        from threadpoolctl import threadpool_limits

        _restores.append(threadpool_limits(limits=1).restore_original_limits)
    _limit_holders += 1
    _serial_holders += serial
    return 1 if _serial_holders else _width


def _leave(serial: bool) -> None:
    global _limit_holders, _serial_holders
    _limit_holders -= 1
    _serial_holders -= serial
    if _limit_holders == 0:
        while _restores:
            _restores.pop()()


@contextmanager
def one_blas_thread():
    """Hold ``threadpool_limits(1)`` for as long as any holder in this process runs."""
    with _limit_lock:
        _enter(serial=True)
    try:
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
    """Yields how many threads may compute blocks (:func:`run_blocks`): OpenBLAS's thread
    count before the first holder entered (``OPENBLAS_NUM_THREADS``; 1 inside
    :func:`one_blas_thread` or where numpy's BLAS is not an OpenBLAS threadpoolctl
    controls); meanwhile OpenBLAS computes in one thread."""
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
