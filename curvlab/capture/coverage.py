"""Coverage: every trainable parameter of a model, covered by a factor entry or skipped with its reason.

Nothing is left out in silence: :func:`plan_layers` decides, for every module, which entries it gets
(:mod:`curvlab.capture.layers`) and, for every trainable Parameter no entry will cover, why; after
capture :func:`measure` adds what the forward passes showed (an entry never used gets no factors) and
returns a :class:`Coverage`:

* ``covered_parameters`` — how many scalar parameters have factors (an attention projection covers its
  rows of the packed ``in_proj_weight``/``in_proj_bias``);
* ``total_parameters`` — all trainable scalars (``requires_grad``; a Parameter shared by modules once);
* ``covered`` — ``{"name", "parameters", "entries"}`` for every covered Parameter (its ``named_parameters``
  name and the entries covering it);
* ``skipped`` — ``{"name", "parameters", "reason"}`` for the rest (a partly covered Parameter appears
  in both, with the counts of each part).

:meth:`Coverage.to_json` is the ``"coverage"`` object of ``curvlab factors --json`` and what a
checkpoint step records (:mod:`curvlab.io.checkpoint.coverage`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from curvlab.capture import attention as attention_math
from curvlab.capture import layers as layer_math
from curvlab.errors import OptionError

NOT_SELECTED = "not selected by --layers"
NOT_USED = "not used in the forward pass (no factors)"


@dataclass
class _Record:
    """Rows of one Parameter that one candidate entry would cover; ``reason`` why it does not."""

    param: Tensor
    rows: slice | None
    entry: str
    reason: str | None = None


@dataclass
class LayerPlan:
    """The entries of a model (by name: ``(source, adapter)``), and why the rest of its parameters get
    none."""

    selected: dict[str, tuple[Any, Any]]
    records: list[_Record] = field(default_factory=list)
    module_reasons: dict[int, str] = field(default_factory=dict)  # id(param) -> reason


@dataclass
class Coverage:
    """Which trainable parameters have factors (module docstring)."""

    covered_parameters: int
    total_parameters: int
    covered: list[dict[str, Any]]
    skipped: list[dict[str, Any]]

    @property
    def fraction(self) -> float:
        """``covered / total`` (1 for a model without trainable parameters)."""
        return self.covered_parameters / self.total_parameters if self.total_parameters else 1.0

    @property
    def complete(self) -> bool:
        return self.covered_parameters == self.total_parameters

    def to_json(self) -> dict[str, Any]:
        """``{"covered_parameters", "total_parameters", "skipped": [...], "covered": [...]}``."""
        return {
            "covered_parameters": self.covered_parameters,
            "total_parameters": self.total_parameters,
            "skipped": [dict(s) for s in self.skipped],
            "covered": [dict(c) for c in self.covered],
        }

    def record(self) -> dict[str, Any]:
        """What a checkpoint step stores (:mod:`curvlab.io.checkpoint.coverage`): counts and skipped."""
        return {
            "covered_parameters": self.covered_parameters,
            "total_parameters": self.total_parameters,
            "skipped": [dict(s) for s in self.skipped],
        }

    def summary(self, limit: int = 3) -> str:
        """One line: ``coverage 97.3 % of 1,234 trainable parameters; skipped: name (n, reason); ...``."""
        text = f"coverage {100 * self.fraction:.1f} % of {self.total_parameters:,} trainable parameters"
        if not self.skipped:
            return text
        shown = "; ".join(f"{s['name']} ({s['parameters']:,}: {s['reason']})" for s in self.skipped[:limit])
        more = f"; and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{text}; skipped: {shown}{more}"


def _numel(param: Tensor, rows: slice | None) -> int:
    if rows is None:
        return param.numel()
    return len(range(*rows.indices(param.shape[0]))) * math.prod(param.shape[1:])


def _own_weight(module: nn.Module) -> Tensor | None:
    """The module's own ``weight`` Parameter (``None`` when it is computed, e.g. by a parametrization)."""
    return dict(module.named_parameters(recurse=False)).get("weight")


def _tie(group: list[tuple[str, nn.Module]]) -> tuple[str, str] | None:
    """``(linear path, embedding path)`` if the modules sharing a weight are one Embedding and one Linear."""
    linears = [name for name, m in group if isinstance(m, nn.Linear)]
    embeddings = [name for name, m in group if isinstance(m, nn.Embedding)]
    if len(group) == 2 and len(linears) == 1 and len(embeddings) == 1:
        return linears[0], embeddings[0]
    return None


def _candidates(model: nn.Module, reasons: dict[int, str]) -> list[tuple[str, list[str], Any, Any]]:
    """``(entry name, module paths a glob may match, source, adapter)`` of every possible entry, in
    module order; the trainable Parameters of modules without one get their reason in ``reasons``."""
    modules = dict(model.named_modules())
    attention_parts: set[int] = set()
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            attention_parts.add(id(module.out_proj))
        elif layer_math.adapter_for(module) is not None:
            weight = _own_weight(module)
            if weight is not None:
                users.setdefault(id(weight), []).append((name, module))
    out = []
    for name, module in modules.items():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, nn.MultiheadAttention):
            reason = attention_math.unsupported(module)
            if reason is not None:
                for p in module.parameters():
                    reasons.setdefault(id(p), f"{name}: {reason}")
                continue
            for suffix, projection in attention_math.projections(module):
                entry = f"{name}.{suffix}" if name else suffix
                out.append((entry, [entry, name], projection, layer_math.ProjectionAdapter()))
            for extra in ("bias_k", "bias_v"):
                if getattr(module, extra, None) is not None:
                    reasons[id(getattr(module, extra))] = (
                        "a learned key/value row of add_bias_kv (not a projection of an input): no factors"
                    )
            continue
        if id(module) in attention_parts:
            continue
        adapter = layer_math.adapter_for(module)
        if adapter is None:
            for p in own:
                reasons.setdefault(id(p), layer_math.why_not(module))
            continue
        weight = _own_weight(module)
        group = users.get(id(weight), []) if weight is not None else []
        source: Any = module
        paths = [name]
        if len(group) > 1:
            tie = _tie(group)
            if tie is None:
                shared = ", ".join(n for n, _ in group)
                for p in own:
                    reasons.setdefault(id(p), f"one weight shared by layers {shared} (only an Embedding tied "
                                              "to a pre-softmax Linear is supported)")
                continue
            if tie[0] != name:
                continue  # the tied entry is named after the Linear and placed where it is
            paths = list(tie)
            source = layer_math.TiedPair(linear=modules[tie[0]], embedding=modules[tie[1]])
            adapter = layer_math.TiedEmbeddingAdapter()
        out.append((name, paths, source, adapter))
    return out


def plan_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> LayerPlan:
    """The model's entries, filtered by fnmatch globs of their names or module paths (each glob must
    match one), and the reason for every trainable Parameter (or rows of one) that none covers."""
    reasons: dict[int, str] = {}
    plan = LayerPlan(selected={}, module_reasons=reasons)
    matched: set[str] = set()
    for entry, paths, source, adapter in _candidates(model, reasons):
        weight, bias = adapter.parameters(source)
        weight_rows, bias_rows = adapter.rows(source)
        pieces = [(weight, weight_rows)] + ([(bias, bias_rows)] if bias is not None else [])
        reason = None
        hits = [p for p in patterns or () if any(fnmatch.fnmatchcase(n, p) for n in paths)]
        matched.update(hits)
        if patterns is not None and not hits:
            reason = NOT_SELECTED
        else:
            why = adapter.supports(source)
            if why is not None:
                reason = f"{entry}: {why}"
        for param, rows in pieces:
            if param.requires_grad:
                plan.records.append(_Record(param, rows, entry, reason))
        if reason is None:
            plan.selected[entry] = (source, adapter)
    for pattern in patterns or ():
        if pattern not in matched:
            raise OptionError(f"layer pattern {pattern!r} matches no layer of the model with K-FAC factors")
    return plan


def measure(
    model: nn.Module, plan: LayerPlan, used: set[str], extra: dict[str, str] | None = None
) -> Coverage:
    """The coverage of the entries in ``used`` (those that got factors); ``extra`` gives entries that
    were selected but set aside, with the reason (e.g. batch norm in training mode in the optimizer)."""
    extra = extra or {}
    by_param: dict[int, list[_Record]] = {}
    for record in plan.records:
        by_param.setdefault(id(record.param), []).append(record)
    covered_total = total = 0
    covered, skipped = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        total += param.numel()
        records = by_param.get(id(param), [])
        rows_done = [r for r in records if r.reason is None and r.entry in used]
        count = param.numel() if any(r.rows is None for r in rows_done) else min(
            param.numel(), sum(_numel(param, r.rows) for r in rows_done)
        )
        if count:
            entries = sorted({r.entry for r in rows_done})
            covered.append({"name": name, "parameters": count, "entries": entries})
            covered_total += count
        if count == param.numel():
            continue
        why = []
        for r in records:
            if r in rows_done:
                continue
            text = r.reason or extra.get(r.entry) or NOT_USED
            text = text if text.startswith(r.entry) else f"{r.entry}: {text}"
            if text not in why:
                why.append(text)
        if not why:
            why.append(plan.module_reasons.get(id(param), "used by no layer with K-FAC factors"))
        skipped.append({"name": name, "parameters": param.numel() - count, "reason": "; ".join(why)})
    return Coverage(covered_total, total, covered, skipped)
