"""Progress bars on stderr (tqdm: count, rate, elapsed time and ETA).

Whether bars are shown is one decision per command (:func:`wanted`): never with
``--quiet``, always with ``--progress``, otherwise only when stderr is a terminal (a
log file or a pipe gets no carriage-return lines). A bar that is not shown costs
nothing and tqdm is then not even imported. tqdm reads its own ``TQDM_*``
environment variables for the settings neurodeploy leaves at their defaults
(e.g. ``TQDM_NCOLS``); neurodeploy itself reads none.

The library's long calls take a ``progress`` callback; :func:`counter` turns a bar
into the ``progress(done, total)`` form the Lava backend and the sweep call.
"""

from __future__ import annotations

import sys

# tqdm redraws at most this often (s): a bar on a terminal costs nothing measurable.
MIN_INTERVAL_S = 0.2


def wanted(quiet: bool = False, forced: bool = False, stream=None) -> bool:
    """Whether to show bars: ``forced`` (--progress) wins over a non-terminal stderr,
    ``quiet`` (--quiet) over everything."""
    if quiet:
        return False
    if forced:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Silent:
    """A bar that shows nothing (the interface of the tqdm calls used here)."""

    n = 0
    total = None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def reset(self, total=None) -> None:
        self.n, self.total = 0, total

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(
    description: str,
    total: int | None,
    unit: str,
    enabled: bool,
    position: int = 0,
    leave: bool = True,
):
    """A tqdm bar on stderr (or a silent stand-in when not ``enabled``).

    description: what is counted, e.g. "lava fixed_pt"; total: the count at the end
    (None: unknown, the bar shows the count and rate only); unit: of one step, e.g.
    "samples"; position: 0 for the outer bar, 1 for a bar nested under it; leave: keep
    the finished bar on screen (nested bars vanish when done).
    """
    if not enabled:
        silent = _Silent()
        silent.total = total
        return silent
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit=f" {unit}" if unit else " it",
        file=sys.stderr,
        position=position,
        leave=leave,
        dynamic_ncols=True,
        # tqdm's default, with the rate always as units per second ("0.13 seeds/s",
        # not "7.96s/ seeds") and the unit after the count
        bar_format=(
            "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} "
            "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
        ),
        mininterval=MIN_INTERVAL_S,
        smoothing=0.1,
        disable=False,
    )


def counter(progress_bar):
    """``progress(done, total)`` that moves ``progress_bar`` to ``done`` of ``total``."""

    def progress(done: int, total: int) -> None:
        if progress_bar.total != total:
            progress_bar.total = total
        if done != progress_bar.n:
            progress_bar.update(done - progress_bar.n)

    return progress


def write(text: str, enabled: bool) -> None:
    """Print a line on stdout without tearing the bars on stderr."""
    if enabled:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(text, flush=True)


__all__ = ["bar", "counter", "wanted", "write"]
