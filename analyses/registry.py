"""The figures of the page and their verdicts: a small registry (see :mod:`analyses.index`).

An entry names a figure, quotes the paper's claim, states the criterion in words, lists its images and
judges the claim from the JSON its analysis wrote (``FIGURES/<name>.json``)::

    from analyses.registry import Verdict, figure

    @figure("fig16", "Fig. 16 — what it shows", claim="the paper's words",
            criterion="the test, in words, written from the claim before looking at any number")
    def fig16(data: dict) -> Verdict:
        held = data["x"] < 1.0
        return Verdict(held, "one sentence of why", {"x": data["x"]})

``held`` is True ("held"), False ("did not hold") or None ("not judged"); ``numbers`` maps a reader's
label to a value (formatted on the page). Entries appear on the page in the order they are registered;
the module that registers them must be listed in :data:`analyses.index.ENTRY_MODULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    """A claim's verdict: held (True), did not hold (False) or not judged (None), why, and the numbers."""

    held: bool | None
    why: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    """One figure of the page."""

    name: str
    title: str
    claim: str
    criterion: str
    judge: Callable[[dict], Verdict]
    images: tuple[str, ...]


REGISTRY: dict[str, Entry] = {}


def figure(name: str, title: str, *, claim: str, criterion: str,
           images: tuple[str, ...] | None = None) -> Callable[[Callable[[dict], Verdict]], Callable]:
    """Register ``judge(data) -> Verdict`` for figure ``name`` (images default to ``name.png``)."""

    def register(judge: Callable[[dict], Verdict]) -> Callable[[dict], Verdict]:
        REGISTRY[name] = Entry(name, title, claim, criterion, judge, images or (f"{name}.png",))
        return judge

    return register


def fmt(value: Any) -> str:
    """A number for a reader: integers with thousands separators, floats to 3 significant digits
    (scientific below 1e-3 and from 1e5), lists item by item, None as "—"."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if value.is_integer() and abs(value) < 1e9:
            return f"{int(value):,}"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)
