"""Atomic output files: write to a temp file in the target folder, fsync, rename into place.

A reader never sees a half-written output: either the old file (or none) or the complete new one.
Temp files are named ``.<name>.tmp-<pid>-<random>`` next to the target; one left behind by a killed
process is recognisable by that name and can be deleted. Inside :func:`all_or_nothing` (a command's
run) the outputs of :func:`atomic_output` are renamed into place together when the block succeeds,
and none is when it fails: a command that fails after writing its result file but before its plot
leaves neither.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
from collections.abc import Iterator

#: The outputs written inside :func:`all_or_nothing`, waiting to be renamed: ``(temp, target)``.
_PENDING: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "curvlab_pending_outputs", default=None
)


def temp_path(path: str | os.PathLike) -> str:
    """``<folder>/.<name>.tmp-<pid>-<random>``: a recognisable temp file next to ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    """Make a rename durable; silently skipped where directories cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def commit(tmp: str, path: str | os.PathLike) -> None:
    """fsync the finished temp file, rename it onto ``path`` atomically, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same path, or two names (links) of one existing file: an output must never be its input."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def derived_path(source: str | os.PathLike, suffix: str) -> str:
    """``x.h5`` -> ``x<suffix>`` next to the input (``.hdf5``/``.hdf`` too; other names get it appended)."""
    path = os.fspath(source)
    base, ext = os.path.splitext(path)
    if ext.lower() not in (".h5", ".hdf5", ".hdf"):
        base = path
    return base + suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path to write; on success it replaces ``path``, on any exception it is removed.

    >>> with atomic_output("plot.png") as tmp:      # doctest: +SKIP
    ...     figure.savefig(tmp, format="png")
    """
    tmp = temp_path(path)
    pending = _PENDING.get()
    try:
        yield tmp
        if pending is None:
            commit(tmp, path)
        else:
            fsync_file(tmp)
            pending.append((tmp, os.fspath(path)))
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Defer the renames of :func:`atomic_output` inside the block: all happen when it succeeds, and
    every temp file is removed when it fails (module docstring)."""
    pending: list[tuple[str, str]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            remove_quietly(tmp)
        raise
    finally:
        _PENDING.reset(token)
    for i, (tmp, path) in enumerate(pending):
        try:
            commit(tmp, path)
        except BaseException:
            for later, _ in pending[i:]:
                remove_quietly(later)
            raise
