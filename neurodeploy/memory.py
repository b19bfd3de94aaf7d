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

import os

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
