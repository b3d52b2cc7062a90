"""Progress bars on stderr, shown only when stderr is a terminal.

Long work (factor capture, eigendecompositions, training, sweeps) reports its progress with a tqdm bar
on stderr — when a person is watching. When stderr is a file or a pipe (a log, ``make figures``, a
test) nothing is written: a bar's carriage returns and cursor movements would fill the log (a 300-step
training run wrote 46 KB of them) and leave escape sequences behind. :func:`progress_bar` gives the
bar, or a silent stand-in with the same methods. Nothing here imports torch; tqdm is imported only when
a bar is shown.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def stderr_is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class SilentBar:
    """What :func:`progress_bar` gives when no bar is shown: iterates like the iterable, does nothing else."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> SilentBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
) -> Any:
    """A tqdm bar on stderr if ``enabled`` and stderr is a terminal, else a :class:`SilentBar`.

    The bar is cleared when it closes (``leave=False``), so a terminal keeps only the command's own
    lines. Show one bar at a time: nested bars move the cursor up (``ESC[A``).
    """
    if not enabled or not stderr_is_terminal():
        return SilentBar(iterable)
    from tqdm import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, leave=False,
                dynamic_ncols=True)
