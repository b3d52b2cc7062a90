"""``curvlab sweep``: steps to a target vs batch size, each (optimizer, batch size) tuned by a quasi-random
search on Optuna (:mod:`curvlab.sweep`, docs/sweep.md).

``-o SWEEP/`` holds ``study.db`` (the SQLite study database unless ``--storage URL``), ``results.json``
and ``steps.png``. ``--resume`` continues a killed sweep; ``--worker`` joins one through its storage;
``--workers N`` runs N processes on this machine. torch and optuna are imported only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES, FISHER_TYPES, OPTIMIZERS
from curvlab.commands.common import (
    _add_model_options,
    _check_plot,
    _parse_model_args,
    _positive_int,
    dump_json,
)
from curvlab.errors import OptionError

#: Options that make up a :class:`curvlab.sweep.config.SweepConfig` (None: not given).
_CONFIG_FIELDS = ("model", "data", "examples", "target", "eval_split", "eval_every", "trials", "max_steps",
                  "seeds", "seed", "fisher", "inverse_update_every", "factor_examples")
_REQUIRED = ("model", "optimizers", "batch_sizes", "target", "trials", "max_steps")


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sweep",
        help="steps to a target vs batch size, every (optimizer, batch size) tuned (Optuna, resumable)",
        description="For every optimizer and batch size, a quasi-random search over the F.3 schedule (α0, γ, "
        "T of the linear decay) and the F.4 hyper-parameters, each trial trained until the target holds "
        "or --max-steps is spent; the best configuration re-run at --seeds fresh seeds; S(B) = S_min (1 + "
        "B_crit/B) fitted. Writes SWEEP/results.json and SWEEP/steps.png; the trials live in an Optuna "
        "study database (SWEEP/study.db, or --storage URL) that --worker processes share and that "
        "--resume continues after a kill.",
    )
    _add_model_options(p, required=False, rebuild="required, no default; with --resume or --worker: the "
                       "sweep's model (a factory must be named again, docs/models.md)")
    p.add_argument("--data", default=None, help=f"data source: {DATA_SOURCES} (default: digits for the image "
                   "models, pystdlib for transformer_shallow)")
    p.add_argument("--examples", type=_positive_int, default=None,
                   help="train on the first N examples only (default: all)")
    p.add_argument("--optimizers", default=None, metavar="LIST",
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (required, no default)")
    p.add_argument("--batch-sizes", default=None, metavar="LIST",
                   help="comma-separated, e.g. 16,32,64,128 (required, no default)")
    p.add_argument("--target", default=None, metavar="METRIC=VALUE",
                   help="loss=X (mean training objective) or error=X (classification error); required, "
                   "no default")
    p.add_argument("--eval-split", choices=("train", "test"), default=None,
                   help="split the target is measured on (default: train for loss, test for error)")
    p.add_argument("--eval-every", default=None, metavar="K|R%",
                   help="check the target every K steps, or on a geometric grid R%% apart (default: 5%%)")
    p.add_argument("--trials", type=_positive_int, default=None,
                   help="search trials per (optimizer, batch size) (required, no default)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="step budget of every trial (required, no default)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="re-runs of the best trial (default: 3)")
    p.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="seed of the search trials; the re-runs use seed+1..seed+K (default: 0)")
    p.add_argument("--space", action="append", default=[], metavar="[OPT.]NAME=LOW:HIGH|VALUE",
                   help="replace a search range or fix a parameter (repeatable; names in docs/sweep.md; "
                   "default: the documented ranges)")
    p.add_argument("--fisher", choices=FISHER_TYPES, default=None, help="K-FAC's Fisher type (default: mc)")
    p.add_argument("--inverse-update-every", type=_positive_int, default=None, help="K-FAC (default: 10)")
    p.add_argument("--factor-examples", type=_positive_int, default=None,
                   help="K-FAC's initial factor set (default: 512)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna RDB URL shared by workers on several machines (default: sqlite in SWEEP/)")
    p.add_argument("--worker", action="store_true",
                   help="join the sweep recorded in --storage (or -o) and run its trials; writes no results")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes on this machine (default: 1)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per worker (default: this machine's cores / --workers)")
    p.add_argument("--heartbeat", type=_positive_int, default=None, metavar="SECONDS",
                   help="trial heartbeat; a trial silent for twice this is failed and retried (default: 30)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in SWEEP/ (or --storage)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
    p.add_argument("--plot", default=None, metavar="PNG", help="the figure (default: SWEEP/steps.png)")
    p.add_argument("-o", "--output", default=None, metavar="SWEEP/",
                   help="the sweep folder (default: none; --worker may name the sweep by --storage instead)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=run_sweep)


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _space(items: list[str]) -> dict[str, str]:
    space: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--space {item!r}: expected [OPT.]NAME=LOW:HIGH or [OPT.]NAME=VALUE")
        space[key.strip()] = value.strip()
    return space


def _given(args: argparse.Namespace) -> dict:
    """The sweep options given on the command line (parsed, not yet checked)."""
    from curvlab.sweep.config import parse_list

    given = {name: getattr(args, name) for name in _CONFIG_FIELDS if getattr(args, name) is not None}
    if args.optimizers is not None:
        given["optimizers"] = parse_list("--optimizers", args.optimizers)
    if args.batch_sizes is not None:
        given["batch_sizes"] = parse_list("--batch-sizes", args.batch_sizes, int)
    model_args = _parse_model_args(args.model, args.model_arg)
    if model_args is not None:
        given["model_args"] = model_args
    if args.space:
        given["space"] = _space(args.space)
    return given


def _config(given: dict):
    from curvlab.sweep.config import SweepConfig

    missing = [name for name in _REQUIRED if name not in given]
    if missing:
        return None, missing
    if "data" not in given:
        from curvlab.optim.train import default_data

        given["data"] = default_data(given["model"], given.get("model_args"))
    return SweepConfig(**given).check(), []


def run_sweep(args: argparse.Namespace) -> int:
    from curvlab.device import resolve_device
    from curvlab.sweep import study as st

    device = str(resolve_device(args.device))
    heartbeat = args.heartbeat or st.DEFAULT_HEARTBEAT
    progress = not args.quiet and sys.stderr.isatty()
    given = _given(args)
    if args.worker:
        if args.storage is None and args.output is None:
            raise OptionError("--worker needs --storage URL or -o SWEEP/ to find the sweep")
        named = {k: given.pop(k) for k in ("model", "model_args", "data") if k in given}
        if given:
            raise OptionError("--worker takes the sweep's options from its storage; give only --storage/-o, "
                              "--workers, --threads, --heartbeat, --device, and --model/--model-arg/--data "
                              "to name a factory the sweep records")
        from curvlab.sweep.run import join

        url = args.storage or st.default_storage(args.output)
        if args.storage is None and not os.path.exists(os.path.join(args.output, st.STUDY_FILE)):
            raise OptionError(f"{args.output}: holds no sweep ({st.STUDY_FILE} is missing)")
        done = join(url, workers=args.workers, heartbeat=heartbeat, device=device, progress=progress,
                    threads=args.threads, named=named)
        if args.json:
            print(dump_json({"worker": True, "trials_done": done.done, "running": done.running,
                              "cells_done": done.cells_done, "cells": done.cells}))
        else:
            print(f"worker finished: {done.line()}")
        return 0
    if args.output is None:
        raise OptionError("-o SWEEP/ is required (the sweep folder)")
    config, missing = _config(dict(given))
    if config is None and not args.resume:
        raise OptionError(f"--{missing[0].replace('_', '-')} is required (unless --resume finds a sweep)")
    if config is None and given:
        raise OptionError(f"--resume with some of the sweep's options: give all of them or none "
                          f"(--{missing[0].replace('_', '-')} is missing)")
    plot = args.plot or os.path.join(args.output, "steps.png")
    _check_plot(args.plot)
    from curvlab.sweep.results import summary
    from curvlab.sweep.run import sweep

    results = sweep(config, args.output, storage_url=args.storage, resume=args.resume, workers=args.workers,
                    heartbeat=heartbeat, device=device, plot=plot, progress=progress, threads=args.threads)
    if args.json:
        print(dump_json(summary(results)))
        return 0
    print(f"sweep {'complete' if results['complete'] else 'incomplete'}: wrote "
          f"{os.path.join(args.output, 'results.json')} and {plot}")
    for opt, r in results["optimizers"].items():
        steps = ", ".join(f"B={c['batch_size']}: {c['steps'] if c['steps'] is not None else '-'} "
                          f"({c['reached']}/{c['trials']})" for c in r["cells"])
        fit = r["fit"]
        crit = (f"B_crit {fit['b_crit']:.3g}" if fit.get("b_crit") is not None else fit.get("error", ""))
        print(f"  {opt}: {steps}; {crit}")
    return 0
