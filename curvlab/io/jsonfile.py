"""Strict JSON files written by curvlab and read back from the user (sweep results, predictions).

A file is read only if it is a regular file (no pipe or device: :func:`curvlab.limits.check_regular_file`)
of at most ``max_bytes``, and only as strict JSON (RFC 8259): ``NaN``, ``Infinity`` and ``-Infinity``
are refused, as curvlab never writes them. Every failure is one :class:`~curvlab.errors.CurvlabError`
line naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

from curvlab.errors import CurvlabError
from curvlab.limits import check_regular_file


def refuse_constant(name: str) -> NoReturn:
    """``parse_constant`` for :func:`json.load`: a non-finite number is not JSON."""
    raise ValueError(f"non-finite number {name}")


def read_json_file(path: str | os.PathLike, *, max_bytes: int, what: str) -> Any:
    """The strict JSON value in ``path`` (``what`` names the kind of file in the size error)."""
    path = os.fspath(path)
    size = check_regular_file(path, CurvlabError)
    if size > max_bytes:
        raise CurvlabError(f"{path}: {size} bytes, more than {what} ({max_bytes})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=refuse_constant)
    except OSError as exc:
        raise CurvlabError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CurvlabError(f"{path}: not JSON ({exc})") from None
