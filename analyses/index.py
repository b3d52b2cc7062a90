"""``figures/index.html`` and ``figures/summary.json``: every figure with the paper's claim, the criterion
that judges it, the verdict with its numbers and one sentence of why.

The page is built from a registry (:mod:`analyses.registry`): one entry per figure, registered with
``@figure(name, title, claim=..., criterion=...)`` on a function that judges the figure's JSON and
returns a :class:`~analyses.registry.Verdict`. **To add a figure** (e.g. ``curvlab sweep``'s, or an
operator comparison), write its analysis so that it leaves ``FIGURES/<name>.png`` and ``<name>.json``,
register an entry in a few lines in :mod:`analyses.criteria` (or in a module of your own listed in
:data:`ENTRY_MODULES`), and add its PNG to the Makefile's ``FIGURE_PNGS``. Every number on the page is
read from those JSON files; the only constants are the criteria, printed with each verdict.

The page opens with an introduction (scale, data, models, steps, batch sizes, augmentation, wall times
from ``FIGURES/timings.json`` and the runs' ``config.json``/``metrics.jsonl``) and a table of all
verdicts.
"""

from __future__ import annotations

import html
import importlib
import json
from pathlib import Path
from typing import Any

from analyses.config import FIGURES, SCALE, SETTINGS, write_json
from analyses.registry import REGISTRY, Entry, Verdict, fmt

#: Modules whose import registers the page's entries, in page order.
ENTRY_MODULES = ("analyses.criteria", "analyses.kfac_vs_ggn", "analyses.sweep", "analyses.predict_cells")

VERDICT_WORDS = {True: "held", False: "did not hold", None: "not judged"}
VERDICT_COLOURS = {True: "#1a7f37", False: "#b3261e", None: "#6e6e6e"}


def _load(name: str) -> dict[str, Any] | None:
    path = FIGURES / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def judge(entry: Entry) -> tuple[bool, Verdict]:
    """``(produced, verdict)`` of one entry: not produced when its first image or its JSON is missing."""
    data = _load(entry.name)
    if data is None or not (FIGURES / entry.images[0]).exists():
        return False, Verdict(None, "not produced in this run")
    try:
        return True, entry.judge(data)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return True, Verdict(None, f"the figure's numbers could not be judged ({type(exc).__name__}: {exc})")


def _run_facts(name: str) -> dict[str, Any]:
    """What a training run was: its options, examples, final loss and wall time."""
    folder = FIGURES / "data" / "runs" / name
    facts: dict[str, Any] = {}
    config = folder / "config.json"
    if config.exists():
        stored = json.loads(config.read_text())
        train = stored.get("train", {})
        facts.update({k: train.get(k) for k in ("model", "data", "steps", "batch_size", "optimizer", "lr",
                                                 "momentum", "damping", "kl_clip", "factor_decay", "augment",
                                                 "save_steps")})
        facts["model_args"] = train.get("model_args")
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            facts["final batch loss"] = lines[-1].get("loss")
            facts["training time (s)"] = lines[-1].get("time")
    return facts


def introduction() -> dict[str, Any]:
    """The facts the page opens with."""
    timings_path = FIGURES / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    return {
        "scale": SCALE,
        "runs": {name: _run_facts(name) for name in ("resnet8", "transformer")},
        "gradcov examples": {name: SETTINGS[name]["gradcov_examples"] for name in ("resnet8", "transformer")},
        "nqm mode": SETTINGS.get("nqm_mode"),
        "wall time of each part (s)": timings,
        "wall time, sum of the parts (s)": round(sum(timings.values()), 1) if timings else None,
    }


def _numbers_table(numbers: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>"
                   for k, v in numbers.items())
    return f"<table class='numbers'>{rows}</table>" if rows else ""


def _verdict_html(held: bool | None) -> str:
    return f"<b style='color:{VERDICT_COLOURS[held]}'>{VERDICT_WORDS[held]}</b>"


def _intro_html(intro: dict[str, Any]) -> str:
    parts = [f"<p>Scale <b>{html.escape(intro['scale'])}</b>. Every figure below is recomputed by "
             "<code>make figures</code> from the repository alone; its verdict follows from the criterion "
             "printed with it, written from the paper's words before any number was seen.</p><ul>"]
    for facts in intro["runs"].values():
        if not facts:
            continue
        args = facts.get("model_args") or {}
        parts.append(
            f"<li><b>{html.escape(str(facts.get('model')))}</b> "
            f"({html.escape(', '.join(f'{k}={v}' for k, v in args.items())) or 'default size'}) on "
            f"<b>{html.escape(str(facts.get('data')))}</b>: {fmt(facts.get('steps'))} "
            f"{html.escape(str(facts.get('optimizer')))} "
            f"steps of batch {fmt(facts.get('batch_size'))}, lr {fmt(facts.get('lr'))}, momentum "
            f"{fmt(facts.get('momentum'))}, damping {fmt(facts.get('damping'))}, "
            f"KL clip {fmt(facts.get('kl_clip'))}, "
            f"factor average {fmt(facts.get('factor_decay'))}, augmentation "
            f"{html.escape(', '.join(facts.get('augment') or []) or 'none')}; factors saved at steps "
            f"{fmt(facts.get('save_steps'))}; final batch loss {fmt(facts.get('final batch loss'))}, "
            f"{fmt(facts.get('training time (s)'))} s of training.</li>")
    parts.append(f"<li>gradcov on {fmt(intro['gradcov examples'])} training examples; the NQM in "
                 f"{html.escape(str(intro['nqm mode']))} mode.</li></ul>")
    if intro["wall time of each part (s)"]:
        parts.append(f"<p>Wall time: {fmt(intro['wall time, sum of the parts (s)'])} s in all ("
                     + html.escape(fmt(intro["wall time of each part (s)"])) + ").</p>")
    return "".join(parts)


def build() -> dict[str, Any]:
    for module in ENTRY_MODULES:
        importlib.import_module(module)
    intro = introduction()
    summary: dict[str, Any] = {"scale": SCALE, "introduction": intro, "figures": {}}
    rows, sections = [], []
    for entry in REGISTRY.values():
        produced, verdict = judge(entry)
        summary["figures"][entry.name] = {
            "produced": produced, "images": list(entry.images), "claim": entry.claim,
            "criterion": entry.criterion, "held": verdict.held, "verdict": VERDICT_WORDS[verdict.held],
            "why": verdict.why, "measured": verdict.numbers,
        }
        anchor = html.escape(entry.name)
        rows.append(f"<tr><td><a href='#{anchor}'>{html.escape(entry.title.split(' — ')[0])}</a></td>"
                    f"<td>{html.escape(entry.title.split(' — ')[-1])}</td>"
                    f"<td>{_verdict_html(verdict.held)}</td>"
                    f"<td>{html.escape(verdict.why)}</td></tr>")
        images = "".join(f'<img src="{html.escape(img)}" alt="{html.escape(entry.title)}">'
                         for img in entry.images if (FIGURES / img).exists())
        sections.append(
            f"<section id='{anchor}'><h2>{html.escape(entry.title)}</h2>{images}"
            f"<p><b>Paper:</b> {html.escape(entry.claim)}</p>"
            f"<p><b>Criterion:</b> {html.escape(entry.criterion)}</p>"
            f"<p><b>Verdict:</b> {_verdict_html(verdict.held)} — {html.escape(verdict.why)}</p>"
            f"{_numbers_table(verdict.numbers)}</section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>curvlab — appendix figures</title>"
        "<style>body{font-family:sans-serif;max-width:64em;margin:auto;line-height:1.4}img{max-width:100%}"
        "section{border-top:1px solid #ccc;padding:1em 0}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ddd;padding:.25em .5em;vertical-align:top;font-size:.92em}"
        "table.numbers td:last-child{font-family:monospace}</style></head><body>"
        f"<h1>Zhang et al. 2019, appendix figures, recomputed</h1>{_intro_html(intro)}"
        "<h2>Verdicts</h2><table><tr><th>figure</th><th>what</th><th>verdict</th><th>why</th></tr>"
        + "".join(rows) + "</table>" + "".join(sections) + "</body></html>"
    )
    from curvlab.io.atomic import atomic_output

    with atomic_output(FIGURES / "index.html") as tmp:
        Path(tmp).write_text(page)
    write_json(FIGURES / "summary.json", summary)
    return summary


if __name__ == "__main__":
    build()
