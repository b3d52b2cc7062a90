"""Reading untrusted HDF5 files: nothing outside the file, nothing unbounded, no libhdf5 hang.

Every curvlab reader (factor checkpoints, spectrum files) opens files with :func:`open_file`, walks
them with :func:`member`, reads attributes with :func:`attribute` and datasets with :func:`read_array`.
What each guards against (docs/reliability.md):

* **Files that are not files.** A named pipe blocks ``open``, a device is endless: both are refused
  before opening (:func:`curvlab.limits.check_regular_file`).
* **libhdf5's infinite loop on a damaged global heap** (HDFGroup/hdf5#1707, h5py#2088). Variable-length
  strings (every string attribute curvlab writes) live in global heap collections; libhdf5 decodes a
  collection object by object, advancing by each object's size, and a free-space object (index 0) of
  size 0 never advances: the read spins forever inside the C library, where no Python timeout can
  reach. :func:`check_global_heaps` walks every collection of the file the same way first and refuses
  one whose objects do not tile it (a zero-size object, or objects running past its end).
* **Reads outside the file.** External links, soft links whose path leaves the file through one,
  external storage (a dataset's bytes in another file, ``/dev/zero`` included) and virtual datasets
  are refused before they are followed (:func:`member`, :func:`read_array`): curvlab reads no byte
  outside the files the user named.
* **Memory and time bombs.** Before a dataset is read its declared size is checked against the
  machine's budget and against the bytes it stores (:class:`~curvlab.limits.ReadBudget`): storage
  never written (unallocated chunks), chunks pointing past the end of the file and more than
  ``MAX_EXPANSION``-fold compression are refused; attributes over ``MAX_ATTRIBUTE_BYTES`` too.

Errors are raised as the caller's :class:`~curvlab.errors.CurvlabError` subclass with a message that
does not name the file (the caller adds ``file: step S: layer L:`` once). h5py and numpy only.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import h5py
import numpy as np

from curvlab.errors import CurvlabError
from curvlab.limits import MAX_ATTRIBUTE_BYTES, ReadBudget, check_regular_file, check_size, format_bytes

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_LINK_HOPS = 16  # libhdf5's default limit on soft-link traversals (H5Pset_nlinks)
_HEAP_MAX_OBJECTS = 1 << 16  # a collection indexes its objects with 16 bits


class HeapError(CurvlabError):
    """A global heap collection that libhdf5 would loop on forever."""


# --------------------------------------------------------------------------------------------------
# Opening


def open_file(path: str, error: type[CurvlabError]) -> tuple[h5py.File, ReadBudget]:
    """Open ``path`` read-only after the checks of the module docstring; its read budget with it.

    A path that is not a regular file, not HDF5, truncated or with a damaged global heap raises
    ``error`` (one line naming the file).
    """
    size = check_regular_file(path, error)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        reason = " ".join(str(exc).split())
        if "signature" in reason:
            reason = "no HDF5 signature"
        elif "truncated" in reason:
            reason = f"truncated ({reason})"
        raise error(f"{path}: not a readable HDF5 file: {reason}") from None
    try:
        _check_heaps_once(path, size)
    except HeapError as exc:
        f.close()
        raise error(f"{path}: {exc}") from None
    except BaseException:
        f.close()
        raise
    return f, ReadBudget(path, size)


#: Files whose heaps were found sound in this process, by identity (device, inode, size, mtime): a
#: command opens its checkpoint several times and need not scan it each time.
_SOUND_FILES: set[tuple[int, int, int, int]] = set()


def _check_heaps_once(path: str, size: int) -> None:
    info = os.stat(path)
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _SOUND_FILES:
        check_global_heaps(path, size)
        _SOUND_FILES.add(key)


def _sizes_of_lengths(data: mmap.mmap | bytes) -> int | None:
    """The superblock's "size of lengths" (bytes of a length field), or None if not found."""
    offset = 0
    while offset + 16 <= len(data):
        if data[offset : offset + 8] == _SIGNATURE:
            version = data[offset + 8]
            size = data[offset + 14] if version <= 1 else data[offset + 10]
            return size if size in (2, 4, 8, 16) else None
        offset = 512 if offset == 0 else offset * 2  # the superblock sits at 0, 512, 1024, 2048, ...
    return None


def check_global_heaps(path: str, size: int) -> None:
    """Walk every global heap collection of the file as libhdf5 does; refuse one it would loop on.

    A collection is ``"GCOL"``, version 1, 3 reserved bytes, its size (L bytes, the superblock's size
    of lengths), then objects: index (2 bytes), reference count (2), reserved (4), size (L), data
    padded to 8 bytes; the free space is the object of index 0, whose size counts its header. libhdf5
    advances by each object's size: a free-space object of size 0 never advances (an endless loop),
    and objects that run past the end are read out of bounds. Every ``GCOL`` signature in the file is
    walked (libhdf5 checks the signature before it decodes, so each collection it can decode is among
    them; a chance match in raw data is skipped unless it looks like a collection).
    """
    if size < 16:
        return
    with open(path, "rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty or unmappable: h5py has read it already
            return
    with data:
        length = _sizes_of_lengths(data)
        if length is None:
            return
        header = 8 + length
        obj_header = 8 + length
        walked = 0
        budget = size // 16 + _HEAP_MAX_OBJECTS
        start = data.find(b"GCOL\x01")
        while start != -1:
            total = _unpack(data, start + 8, length)
            if header <= total <= size - start:  # looks like a collection (else libhdf5 refuses it)
                walked += _walk_collection(data, start, total, header, obj_header, length)
                if walked > budget:
                    raise HeapError("global heap collections overlap (damaged file?)")
            start = data.find(b"GCOL\x01", start + 1)


def _unpack(data: Any, offset: int, length: int) -> int:
    """A little-endian unsigned field of ``length`` bytes."""
    return int.from_bytes(data[offset : offset + length], "little")


def _walk_collection(data: Any, start: int, total: int, header: int, obj_header: int, length: int) -> int:
    end = start + total
    p = start + header
    objects = 0
    while p < end:
        if p + obj_header > end:  # a tail too small for a header: free space, libhdf5 stops here
            break
        (index,) = struct.unpack_from("<H", data, p)
        obj_size = _unpack(data, p + 8, length)
        need = obj_header + (obj_size + 7) // 8 * 8 if index > 0 else obj_size
        if need == 0:
            raise HeapError(
                f"damaged global heap collection at byte {start}: a free-space object of size 0 at "
                f"byte {p} (libhdf5 would loop on it forever)"
            )
        p += need
        objects += 1
        if objects > _HEAP_MAX_OBJECTS:
            raise HeapError(f"damaged global heap collection at byte {start}: more than 65536 objects")
    if p > end:
        raise HeapError(f"damaged global heap collection at byte {start}: objects run past its end")
    return objects


# --------------------------------------------------------------------------------------------------
# Links


def member(group: h5py.Group, name: str, error: type[CurvlabError]) -> Any:
    """``group[name]`` (a group or dataset) or None when absent, following only links inside the file.

    Hard links are followed; a soft link is resolved here, component by component, and refused if its
    path goes through an external link, loops, or names nothing; an external link is refused.
    """
    try:
        link = group.get(name, getlink=True)
        if link is None:
            return None
        return _follow(group, name, link, [0])
    except _LinkProblem as exc:
        raise error(f"{name} {exc}") from None
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
        raise error(f"{name}: cannot follow the link ({' '.join(str(exc).split())})") from None


class _LinkProblem(Exception):
    """Why a link is not followed (the message reads after the link's name)."""


def _follow(group: h5py.Group, name: str, link: Any, hops: list[int]) -> Any:
    """The object ``link`` (named ``name`` in ``group``) points to, through links inside the file only."""
    if isinstance(link, h5py.HardLink):
        return group[name]
    if isinstance(link, h5py.ExternalLink):
        raise _LinkProblem(
            f"is an external link to {link.filename}:{link.path} (curvlab reads nothing outside the file "
            "it is given)"
        )
    if not isinstance(link, h5py.SoftLink):
        raise _LinkProblem("is a link of an unknown kind")
    hops[0] += 1
    if hops[0] > _MAX_LINK_HOPS:
        raise _LinkProblem(f"is a soft link in a loop (more than {_MAX_LINK_HOPS} links in a row)")
    target = link.path
    current = group.file["/"] if target.startswith("/") else group
    for part in (p for p in target.split("/") if p and p != "."):
        inner = current.get(part, getlink=True) if isinstance(current, h5py.Group) else None
        if inner is None:
            raise _LinkProblem(f"is a soft link to {target}, which names nothing")
        try:
            current = _follow(current, part, inner, hops)
        except _LinkProblem as exc:
            if "loop" in str(exc):
                raise
            raise _LinkProblem(f"is a soft link to {target}, where {part} {exc}") from None
    return current


# --------------------------------------------------------------------------------------------------
# Attributes and datasets


def attribute(attrs: h5py.AttributeManager, key: str, error: type[CurvlabError]) -> Any:
    """``attrs[key]`` after checking that its declared size is that of metadata."""
    try:
        aid = attrs.get_id(key)
        shape = aid.shape or ()
        nbytes = math.prod(shape) * aid.dtype.itemsize
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
        raise error(f"attribute {key}: cannot read it ({' '.join(str(exc).split())})") from None
    if nbytes > MAX_ATTRIBUTE_BYTES:
        raise error(
            f"attribute {key} declares {format_bytes(nbytes)} (at most {format_bytes(MAX_ATTRIBUTE_BYTES)}"
            " for metadata)"
        )
    return attrs[key]


def scalar(value: Any) -> Any:
    """An attribute as a Python scalar: size-1 arrays unwrapped, numpy scalars converted, bytes decoded
    as UTF-8 (kept as bytes when they are not UTF-8, so that a check refuses them by type)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return value


def declared_bytes(ds: h5py.Dataset) -> int:
    """Bytes the dataset's shape and dtype declare (an exact Python int: no overflow)."""
    return math.prod(int(n) for n in ds.shape) * ds.dtype.itemsize if ds.shape is not None else 0


def check_storage(ds: h5py.Dataset, name: str, budget: ReadBudget, error: type[CurvlabError]) -> int:
    """The dataset's stored bytes, after refusing what the module docstring lists; reads no data."""
    declared = declared_bytes(ds)
    check_size(f"{name} ({_shape_text(ds)} {ds.dtype})", declared, error)
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise error(f"{name} is a virtual dataset (its data would come from other files)")
    if dcpl.get_external_count():
        source = dcpl.get_external(0)[0].decode("utf-8", "replace")
        raise error(f"{name} keeps its data in the external file {source} (outside the file)")
    stored = int(ds.id.get_storage_size())
    if declared == 0:
        return stored
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        if offset is None or stored == 0:
            raise error(f"{name} was never written (no storage allocated for its {_shape_text(ds)} values)")
        if stored < declared or offset + stored > budget.file_size:
            raise error(f"{name}: its data runs past the end of the file (truncated?)")
    elif layout == h5py.h5d.CHUNKED:
        chunk = dcpl.get_chunk()
        needed = math.prod(-(-int(n) // int(c)) for n, c in zip(ds.shape, chunk, strict=True))
        have = int(ds.id.get_num_chunks())
        if have < needed:
            raise error(f"{name} was never fully written ({have} of its {needed} chunks are stored)")
        if stored > budget.file_size:
            raise error(f"{name} claims {format_bytes(stored)} of chunks in a file of "
                        f"{format_bytes(budget.file_size)} (damaged chunk index)")
        _check_chunk_extents(ds, name, budget.file_size, error)
    budget.check_array(name, declared, stored, error)
    return stored


def _check_chunk_extents(ds: h5py.Dataset, name: str, file_size: int, error: type[CurvlabError]) -> None:
    """Every stored chunk lies inside the file (h5py >= 3.8 with HDF5 >= 1.14: one pass)."""
    if not hasattr(ds.id, "chunk_iter"):
        return
    bad: list[int] = []

    def visit(info: Any) -> None:
        if not bad and (info.byte_offset is None or info.byte_offset + info.size > file_size):
            bad.append(int(info.byte_offset or 0))

    try:
        ds.id.chunk_iter(visit)
    except (RuntimeError, OSError, ValueError) as exc:
        raise error(f"{name}: cannot read its chunk index ({' '.join(str(exc).split())})") from None
    if bad:
        raise error(f"{name}: a chunk at byte {bad[0]} runs past the end of the file (truncated?)")


def read_array(ds: h5py.Dataset, name: str, budget: ReadBudget, error: type[CurvlabError]) -> np.ndarray:
    """The dataset's values in native byte order, read after :func:`check_storage` and charged to
    the budget."""
    check_storage(ds, name, budget, error)
    budget.charge(name, declared_bytes(ds), error)
    arr = ds[()]
    if not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _shape_text(ds: h5py.Dataset) -> str:
    return "x".join(str(n) for n in ds.shape) if ds.shape else "scalar"

