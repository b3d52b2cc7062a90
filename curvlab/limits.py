"""Budgets: how much memory and how many bytes untrusted input may make curvlab allocate or read.

Every size a user's file or option can set (a dataset's declared shape, an attribute, an ``.npz``
member, a model's width, the number of classes, the NQM's dimension) is checked against a budget
*before* anything of that size is allocated, and refused with one line that says the size and the
limit. Two budgets (docs/reliability.md):

* **The machine.** :func:`memory_limit` is the memory this process may plan for: the smallest of the
  physical memory, the cgroup limit (containers) and ``RLIMIT_AS``, or ``CURVLAB_MAX_MEMORY`` (bytes,
  or with a ``K``/``M``/``G``/``T`` suffix) when set. One array read from a file, and one model's
  parameters, may take at most :func:`array_limit` = a :data:`ARRAY_SHARE` of it: the commands hold a
  few copies of the largest array at once (``spectrum``'s ``eigh`` holds the factor, its eigenvectors
  and LAPACK's workspace; ``info`` the factor and ``|X − Xᵀ|``).
* **The file.** Compressed data can declare far more than it stores. A dataset may declare at most
  :data:`MAX_EXPANSION` times the bytes it stores (datasets up to :data:`SMALL_ARRAY` are exempt: their
  storage overhead dominates), and one reader may read at most :data:`MAX_EXPANSION` times the file's
  size in all (:class:`ReadBudget`; hard links can make one stored dataset appear many times). So a
  file of 1 MB can make a command hold at most ~128 MB per array, whatever it declares.

Files are refused before they are opened when they are not regular files (:func:`check_regular_file`):
a named pipe would block the open, a device (``/dev/zero``) is endless.

No torch, numpy or h5py here.
"""

from __future__ import annotations

import os
import resource
import stat

from curvlab.errors import CurvlabError, where

#: Largest ratio of declared to stored bytes of one dataset. deflate reaches ~1000x on constant data
#: and real factors (float mantissas) compress by less than 2x; a factor that compresses by more than
#: 128x is almost all repeats: a decompression bomb, or a factor not worth its memory.
MAX_EXPANSION = 128
#: Datasets up to this many declared bytes are read without the expansion check.
SMALL_ARRAY = 1 << 20
#: Share of :func:`memory_limit` that one array (or one model's parameters) may take.
ARRAY_SHARE = 8
#: Largest attribute curvlab reads (its own are under 16 KiB; HDF5's compact storage stops at 64 KiB).
MAX_ATTRIBUTE_BYTES = 1 << 20

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: int | float) -> str:
    """``3.2 GB``: a byte count for a message (decimal units, 2 significant digits or more)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"  # pragma: no cover - the loop returns at PB


def _parse_bytes(text: str) -> int | None:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SUFFIXES and text[-1:] else ""
    number = text[: len(text) - len(unit)]
    try:
        value = float(number) * _SUFFIXES[unit]
    except ValueError:
        return None
    return int(value) if value >= 1 and value == value and value != float("inf") else None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _cgroup_memory() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read(64).strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _address_space_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def memory_limit() -> int:
    """Bytes this process may plan for (module docstring); ``CURVLAB_MAX_MEMORY`` overrides."""
    override = os.environ.get("CURVLAB_MAX_MEMORY")
    if override:
        value = _parse_bytes(override)
        if value is None:
            raise CurvlabError(f"CURVLAB_MAX_MEMORY={override!r}: expected a number of bytes like 8G")
        return value
    known = [v for v in (_physical_memory(), _cgroup_memory(), _address_space_limit()) if v]
    return min(known) if known else 8 << 30


def array_limit() -> int:
    """Bytes one array read from a file (or one model's parameters) may take."""
    return memory_limit() // ARRAY_SHARE


def limit_text() -> str:
    """How :func:`array_limit` came about, for messages."""
    source = "CURVLAB_MAX_MEMORY" if os.environ.get("CURVLAB_MAX_MEMORY") else "this machine's memory"
    return f"{format_bytes(array_limit())}, 1/{ARRAY_SHARE} of {source} {format_bytes(memory_limit())}"


def check_size(what: str, nbytes: int, error: type[CurvlabError] = CurvlabError,
               limit: int | None = None) -> None:
    """Refuse ``nbytes`` (exact Python int, never overflowing) above ``limit`` (default: one array's)."""
    cap = array_limit() if limit is None else limit
    if nbytes > cap:
        text = limit_text() if limit is None else format_bytes(cap)
        raise error(f"{what} would take {format_bytes(nbytes)}, more than the limit {text}")


class ReadBudget:
    """What one open file may make a reader read, in bytes: per array and in total (module docstring)."""

    def __init__(self, path: str, file_size: int) -> None:
        self.path = path
        self.file_size = file_size
        self.total_limit = max(SMALL_ARRAY, MAX_EXPANSION * file_size)
        self.used = 0

    def check_array(self, what: str, declared: int, stored: int, error: type[CurvlabError]) -> None:
        """Refuse an array before it is read: over the machine's limit, or expanding too much."""
        check_size(what, declared, error)
        if declared > SMALL_ARRAY and declared > MAX_EXPANSION * stored:
            raise error(
                f"{what} declares {format_bytes(declared)} but stores {format_bytes(stored)} "
                f"(more than {MAX_EXPANSION}x expansion: a decompression bomb?)"
            )

    def charge(self, what: str, nbytes: int, error: type[CurvlabError]) -> None:
        """Count ``nbytes`` read; refuse once the file has made us read :data:`MAX_EXPANSION` x its size."""
        if self.used + nbytes > self.total_limit:
            raise error(
                f"{what}: reading it would bring the data read from this file to "
                f"{format_bytes(self.used + nbytes)}, more than {MAX_EXPANSION}x the file's size "
                f"{format_bytes(self.file_size)} (objects linked many times?)"
            )
        self.used += nbytes


def check_regular_file(path: str, error: type[CurvlabError] = CurvlabError, what: str = "file") -> int:
    """Refuse a missing path, a folder, a pipe, a device or a socket before anything opens it.

    Returns the file's size. ``os.stat`` follows symbolic links (a link to a regular file is fine) and
    never blocks, unlike opening a named pipe.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        missing = "no such file" if what == "file" else f"{what} not found"
        raise error(f"{where(path)}: {missing}") from None
    except OSError as exc:
        raise error(f"{where(path)}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{where(path)}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a named pipe" if stat.S_ISFIFO(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket" if stat.S_ISSOCK(info.st_mode)
            else "not a regular file"
        )
        raise error(f"{where(path)}: is {kind}, not a regular {what}")
    return info.st_size
