"""One BLAS thread while a result must be the same bits everywhere.

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

A thread limit does not make different BLAS kernels agree (OpenBLAS picks them
by CPU model): where a result must match across machines, the arithmetic itself
has to be order-fixed (as the file classifier's training is, see
neurodeploy.fileclass.model).
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

_limit_lock = threading.Lock()
_limit_holders = 0
_limiter = None


@contextmanager
def one_blas_thread():
    """Hold ``threadpool_limits(1)`` for as long as any holder in this process runs."""
    global _limit_holders, _limiter
    from threadpoolctl import threadpool_limits

    with _limit_lock:
        if _limit_holders == 0:
            _limiter = threadpool_limits(limits=1)
        _limit_holders += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_holders -= 1
            if _limit_holders == 0:
                _limiter.restore_original_limits()
                _limiter = None


def with_one_blas_thread(function):
    """Decorator: run ``function`` inside :func:`one_blas_thread`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return function(*args, **kwargs)

    return wrapper


__all__ = ["one_blas_thread", "with_one_blas_thread"]
