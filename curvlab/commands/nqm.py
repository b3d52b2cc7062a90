"""``curvlab nqm``: the noisy quadratic model (seed appendices B-E; docs/nqm.md).

``nqm steps``: steps to reach expected risk below a target per batch size (bisection on ``t`` over the
exact second-moment dynamics of SGD, heavy-ball momentum or iterate averaging, with preconditioner
``H^-p``), minimised over a learning-rate grid and, with ``tuned``, a decay grid
(:mod:`curvlab.nqm.analysis`). ``nqm figure N``: the numbers and plot of Fig. 11, 13, 14 (a, b, c) or 15
(:mod:`curvlab.nqm.figures`), written atomically as ``fig<N>.png`` and ``fig<N>.json``. The options are
parsed here, as text, so that every bad value is one ``curvlab: error:`` line; the problem is the
default ``h_i = 1/i`` in ``d`` dimensions, exact or in geometric bins (:mod:`curvlab.nqm.problem`).
Runs in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from curvlab.commands.common import _check_writable, _write, dump_json
from curvlab.errors import OptionError


def _add_nqm(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "nqm",
        help="noisy quadratic model: steps to target, optimal learning rates, Figs. 11, 13, 14, 15",
        description="The noisy quadratic model (seed appendices B-E): exact second-moment dynamics of "
        "SGD, heavy-ball momentum and iterate averaging; see docs/nqm.md.",
    )
    actions = p.add_subparsers(dest="nqm_command", required=True, metavar="ACTION")
    s = actions.add_parser(
        "steps",
        help="steps to a target risk per batch size, with the best hyper-parameters",
        description="Steps to reach expected risk < C per batch size (bisection on t), minimised over a "
        "learning-rate grid and, with --momentum tuned / --ema tuned, a decay grid.",
    )
    s.add_argument("--target", metavar="C", help="target expected risk (required, no default; the default "
                   "problem starts at 4.89)")
    s.add_argument("--batch-sizes", metavar="LIST", help="comma-separated batch sizes; items may be "
                   "powers (2^10) or power-of-two ranges (2^2..2^20) (required, no default)")
    s.add_argument("--precond", default="0", metavar="P", help="preconditioner power p in [0, 1]: H^-p")
    s.add_argument("--momentum", default="none", metavar="none|tuned|BETA", help="heavy-ball momentum")
    s.add_argument("--ema", default="none", metavar="none|tuned|GAMMA", help="iterate averaging decay")
    s.add_argument("--mode", default="exact", metavar="exact|binned", help="all d dimensions, or 100 "
                   "geometric bins with counts (default: exact)")
    s.add_argument("--d", default="10000", metavar="D", help="dimensions of the default problem h_i = 1/i")
    s.add_argument("--bins", default="100", metavar="N", help="bins in binned mode")
    s.add_argument("--lr-grid", default="100", metavar="N", help="learning rates in the log grid")
    s.add_argument("--lr-min", default=None, metavar="LR", help="smallest rate (default 1e-5 for SGD, "
                   "1e-8 with momentum or averaging)")
    s.add_argument("--lr-max", default=None, metavar="LR", help="largest rate (default 10^0.5 for SGD, "
                   "10 with momentum or averaging)")
    s.add_argument("--decay-grid", default="20", metavar="N", help="tuned decays: 1 - logspace(-5, 0, N)")
    s.add_argument("--t-max", default=str(10**9), metavar="T", help="give up beyond T steps")
    s.add_argument("--json", action="store_true", help="print one JSON list")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(handler=run_nqm_steps)
    f = actions.add_parser(
        "figure",
        help="the numbers and plot of Fig. 11, 13, 14 (a, b, c) or 15",
        description="Write fig<N>.png and fig<N>.json (the numbers behind it) into DIR, atomically.",
    )
    f.add_argument("number", metavar="N", help="11, 13, 14 (all of 14a, 14b, 14c), 14a, 14b, 14c or 15")
    f.add_argument("--out", metavar="DIR", help="output folder (required, no default; created if missing)")
    f.add_argument("--mode", default=None, metavar="exact|binned", help="problem mode (default: exact, "
                   "binned for Fig. 15)")
    f.add_argument("--d", default="10000", metavar="D", help="dimensions of the default problem")
    f.add_argument("--bins", default="100", metavar="N", help="bins in binned mode")
    f.add_argument("--json", action="store_true", help="print one JSON object: the files written, per figure")
    f.add_argument("--quiet", action="store_true", help="no progress on stderr")
    f.set_defaults(handler=run_nqm_figure)


def _parse_float(text: str | None, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    import math

    if text is None:
        raise OptionError(f"{name} is required")
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"{name} must be a number, got {text!r}") from None
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo}, {hi}" if low is not None or high is not None else ""
        raise OptionError(f"{name} must be a finite number{where}, got {text}")
    return value


def _parse_count(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"{name} must be a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise OptionError(f"{name} must be a positive integer up to 2^62, got {text}")
    return value


def _check_memory(d: int, points: int = 0) -> None:
    """Refuse before any work a problem or sweep whose arrays would not fit the memory budget."""
    from curvlab.limits import check_size

    check_size(f"the NQM in d = {d} dimensions (about {BYTES_PER_DIMENSION} bytes each)",
               d * BYTES_PER_DIMENSION, OptionError)
    if points:
        check_size(f"a sweep of {points} (batch size, grid point) pairs (about {BYTES_PER_POINT} bytes each)",
                   points * BYTES_PER_POINT, OptionError)


#: Largest batch size, step count and grid: the sweeps hold them in int64 arrays.
MAX_COUNT = 2**62
#: Memory of the sweep, at most (measured: ~110 bytes per dimension at d = 1e6, ~20 per batch size and
#: grid point): per dimension of the problem, and per (batch size, grid point) pair.
BYTES_PER_DIMENSION = 256
BYTES_PER_POINT = 64


def _parse_batch_item(item: str) -> int:
    if "^" in item:
        base, _, power = item.partition("^")
        b, p = int(base), int(power)
        if b < 1 or p < 0 or p * max(b.bit_length() - 1, 0) > 62:  # checked before the power is taken
            raise ValueError
        value = b**p
    else:
        value = int(item)
    if not 1 <= value <= MAX_COUNT:
        raise ValueError
    return value


def _parse_batch_sizes(text: str | None) -> list[int]:
    """``4,16,64``, ``2^10`` and power-of-two ranges ``2^2..2^20``."""
    if text is None:
        raise OptionError("--batch-sizes is required (e.g. 4,16,64 or 2^2..2^20)")
    sizes: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            if ".." in item:
                first, _, last = item.partition("..")
                a, b = _parse_batch_item(first), _parse_batch_item(last)
                if a & (a - 1) or b & (b - 1) or a > b:
                    raise ValueError
                sizes.extend(2**k for k in range(a.bit_length() - 1, b.bit_length()))
            else:
                sizes.append(_parse_batch_item(item))
        except ValueError:
            raise OptionError(f"--batch-sizes: {item!r} is not a positive integer up to 2^62, a power like "
                              "2^10 or a power-of-two range like 2^2..2^20") from None
    return sizes


def _parse_decay(text: str, name: str) -> str | float:
    word = text.strip().lower()
    if word in ("none", "tuned"):
        return word
    return _parse_float(text, name, low=0.0, high=1.0, high_open=True)


def _nqm_problem(args: argparse.Namespace, default_mode: str = "exact"):
    from curvlab.nqm.problem import default_problem

    mode = (args.mode or default_mode).lower()
    if mode not in ("exact", "binned"):
        raise OptionError(f"--mode must be exact or binned, got {args.mode!r}")
    d = _parse_count(args.d, "--d")
    bins = _parse_count(args.bins, "--bins")
    _check_memory(max(d, bins))
    return default_problem(d=d, mode=mode, bins=bins)


def run_nqm_steps(args: argparse.Namespace) -> int:
    import numpy as np

    from curvlab.nqm.analysis import Grid, paper_decay_grid, steps_to_target

    target = _parse_float(args.target, "--target", low=0.0, low_open=True)
    batch = _parse_batch_sizes(args.batch_sizes)
    precond = _parse_float(args.precond, "--precond", low=0.0, high=1.0)
    momentum = _parse_decay(args.momentum, "--momentum")
    ema = _parse_decay(args.ema, "--ema")
    if momentum != "none" and ema != "none":
        raise OptionError("--momentum and --ema cannot be combined; choose one")
    kind = "momentum" if momentum != "none" else "ema" if ema != "none" else "sgd"
    decay = momentum if kind == "momentum" else ema
    lr_num = _parse_count(args.lr_grid, "--lr-grid")
    lr_min = _parse_float(args.lr_min or ("1e-5" if kind == "sgd" else "1e-8"), "--lr-min", low=0.0,
                          low_open=True)
    lr_max = _parse_float(args.lr_max or (str(10**0.5) if kind == "sgd" else "10"), "--lr-max", low=0.0,
                          low_open=True)
    if lr_max < lr_min:
        raise OptionError(f"--lr-max ({lr_max:g}) is below --lr-min ({lr_min:g})")
    decays = np.zeros(1)
    if kind != "sgd" and decay == "tuned":
        decays = paper_decay_grid(_parse_count(args.decay_grid, "--decay-grid"))
    elif kind != "sgd":
        decays = np.array([float(decay)])
    t_max = _parse_count(args.t_max, "--t-max")
    _check_memory(1, len(batch) * lr_num * len(decays))
    problem = _nqm_problem(args)
    grid = Grid(kind, np.geomspace(lr_min, lr_max, lr_num), decays, precond)
    result = steps_to_target(problem, target, batch, grid, t_max=t_max, progress=not args.quiet)
    records = result.records()
    if args.json:
        print(dump_json(records))
        return 0
    print(f"NQM ({problem.mode} mode, d={problem.d}), {kind}"
          + (f" (decay {decay})" if kind != "sgd" else "") + f", precond p={precond:g}, target {target:g}")
    for rec in records:
        if rec["steps"] is None:
            print(f"  batch {rec['batch_size']:>8}: never reaches the target within {t_max} steps")
            continue
        line = f"  batch {rec['batch_size']:>8}: {rec['steps']:>10} steps, lr {rec['lr']:.4g}"
        if kind == "momentum":
            line += f", momentum {rec['momentum']:.6g}, effective lr {rec['effective_lr']:.4g}"
        if kind == "ema":
            line += f", ema decay {rec['ema_decay']:.6g}"
        print(line)
    return 0


def _nqm_figure_names(text: str) -> list[str]:
    from curvlab.nqm.figures import FIGURES

    name = text.strip().lower().removeprefix("fig").removeprefix(".").strip()
    names = ["14a", "14b", "14c"] if name == "14" else [name]
    if names[0] not in FIGURES:
        raise OptionError(f"unknown figure {text!r}: choose 11, 13, 14, 14a, 14b, 14c or 15")
    return names


def run_nqm_figure(args: argparse.Namespace) -> int:
    from curvlab.io.atomic import atomic_output
    from curvlab.nqm import figures
    from curvlab.plots import save_figure
    from curvlab.plots.nqm import plot_figure

    names = _nqm_figure_names(args.number)
    if not args.out:
        raise OptionError("--out DIR is required")
    needs_problem = [n for n in names if n != "11"]
    problem = _nqm_problem(args, "binned" if names == ["15"] else "exact") if needs_problem else None
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"{args.out}: cannot create the output folder: {exc.strerror or exc}") from None
    _check_writable(os.path.join(args.out, "fig.png"))

    def log(text: str) -> None:
        if not args.quiet and not args.json:
            print(text, file=sys.stderr, flush=True)

    from curvlab.progress import progress_bar

    written = []
    entries = []
    reference = None
    for name in names:
        log(f"[nqm figure {name}] computing ({problem.mode + ' mode' if problem else 'closed forms'})")
        # one bar at a time: Fig. 15's bisection shows its own (a second, outer bar would nest)
        bar = None
        if name in ("13", "14a", "14b", "14c"):
            total = len(figures.FIG13_THRESHOLDS) if name == "13" else len(figures.FIG14_POWERS)
            bar = progress_bar(total=total, desc=f"fig {name}", unit="sweep", enabled=not args.quiet)
        try:
            if name == "11":
                data = figures.fig11_data()
            elif name == "13":
                data = figures.fig13_data(problem, progress=bar)
            elif name == "15":
                data = figures.fig15_data(problem, progress=not args.quiet)
            else:
                data = figures.fig14_data(name[-1], problem, progress=bar, reference=reference)
                if name == "14a":
                    reference = data
        finally:
            if bar is not None:
                bar.close()
        png = os.path.join(args.out, f"fig{name}.png")
        js = os.path.join(args.out, f"fig{name}.json")

        def write_json(path: str = js, payload: dict = data) -> None:
            with atomic_output(path) as tmp, open(tmp, "w") as fh:
                json.dump(payload, fh, indent=1, allow_nan=False)
                fh.write("\n")

        _write(write_json, js)
        _write(lambda path=png, payload=data: save_figure(plot_figure(payload), path), png)
        written += [png, js]
        entries.append({"figure": name, "png": png, "json": js,
                        "mode": problem.mode if problem and name != "11" else "closed forms",
                        "d": problem.d if problem and name != "11" else None})
        log(f"[nqm figure {name}] wrote {png} and {js}")
    if args.json:
        print(dump_json({"out": args.out, "figures": entries}))
    else:
        print("wrote " + ", ".join(written))
    return 0
