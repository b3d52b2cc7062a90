"""``curvlab predict``: a network's steps to a target against the batch size, predicted from one checkpoint.

Gradcov's machinery (:mod:`curvlab.analysis.gradcov_run`) measures along every direction of the
checkpoint's Kronecker-factored eigenbasis the curvature ``h``, the per-example gradient variance ``c``
and the mean gradient ``g``; :mod:`curvlab.analysis.predict` builds the noisy quadratic model from them
(``θ(0) = g/h``, the target a fraction of its initial risk) and, exactly as ``curvlab nqm steps`` does,
tunes each optimizer per batch size; the ``S(B) = S_min (1 + B_crit/B)`` fits, ``B_simple``, ``B_noise``,
the ingredient swaps and the paper's ``1/i`` NQM come with it. The prediction file records the
checkpoint's sha256, the options and the time (docs/predict.md). ``--sweep RESULTS.json`` compares with a
measured sweep (:mod:`curvlab.analysis.predict_check`). Accepts every checkpoint ``curvlab gradcov``
accepts (a model built by a factory with ``--model`` naming it). Runs in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES
from curvlab.commands.common import (
    _add_loss_options,
    _add_model_options,
    _check_writable,
    _load_data,
    _on_data,
    _parse_model_args,
    _positive_int,
    _refuse_input_as_output,
    _write,
)
from curvlab.errors import OptionError
from curvlab.io.atomic import derived_path

DEFAULT_OPTIMIZERS = "sgd,momentum,kfac,ema"
DEFAULT_BATCH_SIZES = "2^2..2^10"
#: Bounds on what options may ask of the NQM sweep (grid points × batch sizes × directions).
MAX_LR_GRID = 10_000
MAX_DECAY_GRID = 1_000
MAX_BATCH_SIZES = 64


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="steps to a target vs batch size predicted from one checkpoint's curvature and noise (NQM)",
        description="Measure the curvature, gradient variance and mean gradient along the checkpoint's "
        "Kronecker-factored eigenbasis, build the noisy quadratic model from them and predict, per "
        "optimizer tuned at every batch size, the steps to a target and the critical batch size, with "
        "B_simple, B_noise and the paper's 1/i NQM beside it (docs/predict.md).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    _add_model_options(
        p,
        required=False,
        rebuild="default: the checkpoint's model; a model built by a "
        "factory is rebuilt only with --model (and --model-arg) naming it",
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"data source: {DATA_SOURCES}, or your own PATH.py:FUNC "
        "(default: the checkpoint's; a recorded factory must be named again)",
    )
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=None,
        help="training examples measured (default: the whole training split)",
    )
    p.add_argument(
        "--population",
        default=None,
        metavar="N|inf",
        help="training examples the batches are drawn from, without replacement (default: the "
        "training split's size); inf: an unlimited stream",
    )
    p.add_argument("--batch-size", type=_positive_int, default=128, help="examples per measuring batch")
    p.add_argument(
        "--target",
        default=None,
        metavar="fraction=F|loss=X",
        help="required, no default: a fraction of the NQM's initial risk, or a training loss "
        "(mapped with the loss at the checkpoint and --loss-floor)",
    )
    p.add_argument(
        "--loss-floor",
        type=float,
        default=0.0,
        metavar="L",
        help="the lowest training loss, for --target loss=X (default 0)",
    )
    p.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        metavar="LIST",
        help="sgd, momentum, kfac (the NQM's preconditioning power 1, momentum tuned), ema "
        f"(default: {DEFAULT_OPTIMIZERS})",
    )
    p.add_argument(
        "--batch-sizes",
        default=DEFAULT_BATCH_SIZES,
        metavar="LIST",
        help=f"comma-separated, powers 2^k or ranges 2^a..2^b (default: {DEFAULT_BATCH_SIZES})",
    )
    p.add_argument(
        "--variants",
        default="all",
        metavar="LIST",
        help="NQMs: nqm (measured), nqm_isotropic_theta, nqm_c_prop_h, nqm_1_over_i (default: all)",
    )
    p.add_argument(
        "--curvature",
        choices=("auto", "exact", "mc"),
        default="auto",
        help="all-direction curvature route, as gradcov's (default: auto = exact for up to 100 "
        "backward passes per batch, else mc)",
    )
    p.add_argument(
        "--mc-samples", type=_positive_int, default=4, help="labels per example for mc (default 4)"
    )
    p.add_argument("--directions", type=int, default=2, help="jvp-checked directions per layer (default 2)")
    _add_loss_options(p, "the loss the checkpoint step records, else cross-entropy")
    p.add_argument(
        "--layers",
        action="append",
        default=None,
        metavar="GLOB",
        help="layers, repeatable (default: every layer of the checkpoint)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the mc labels (default 0)")
    p.add_argument(
        "--dtype", choices=("float64", "float32"), default="float64", help="model precision (default float64)"
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
    p.add_argument(
        "--mode",
        choices=("exact", "binned"),
        default="exact",
        help="NQM over every direction, or 100 geometric bins of h (default: exact)",
    )
    p.add_argument("--bins", type=_positive_int, default=100, help="bins in binned mode (default 100)")
    p.add_argument("--lr-grid", type=_positive_int, default=100, help="learning rates (default 100)")
    p.add_argument(
        "--decay-grid",
        type=_positive_int,
        default=20,
        help="momentum / averaging decays 1 - logspace(-5, 0, N) (default 20)",
    )
    p.add_argument("--t-max", type=_positive_int, default=10**9, help="give up beyond T steps (default 10^9)")
    p.add_argument(
        "--sweep",
        default=None,
        metavar="RESULTS.json",
        help="compare with a curvlab sweep's results.json (default: no comparison)",
    )
    p.add_argument("-o", "--output", default=None, metavar="PRED.json", help="default: CKPT.predict.json")
    p.add_argument("--plot", default=None, metavar="P.png", help="the predicted curves (default: no plot)")
    p.add_argument(
        "--json", action="store_true", help="print the prediction file's summary as one JSON object"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_predict)


def _names(text: str, option: str, choices) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OptionError(f"{option}: expected at least one name")
    for name in names:
        if name not in choices:
            raise OptionError(f"{option}: unknown name {name!r} (choose from {', '.join(choices)})")
    if len(set(names)) != len(names):
        raise OptionError(f"{option}: a name is listed twice")
    return names


def _population(text: str | None, split_size: int, examples: int) -> int | None:
    if text is None:
        return split_size
    if text.strip().lower() in ("inf", "infinite", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"--population must be a positive integer or inf, got {text!r}") from None
    if value < examples:
        raise OptionError(f"--population {value} is below the {examples} examples measured")
    return value


def _check_options(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    from curvlab.analysis.predict import OPTIMIZERS, VARIANTS, target_fraction
    from curvlab.commands.nqm import _parse_batch_sizes

    if args.target is None:
        raise OptionError("--target is required: fraction=F or loss=X")
    kind = args.target.partition("=")[0].strip().lower()
    if kind == "error":
        raise OptionError(
            f"--target {args.target}: the NQM predicts a loss, not a classification error; "
            "use loss=X or fraction=F"
        )
    if kind == "fraction":
        target_fraction(args.target)  # checked now; a loss target needs the loss at the checkpoint
    elif kind != "loss":
        raise OptionError(f"--target {args.target!r}: expected fraction=F or loss=X")
    optimizers = _names(args.optimizers, "--optimizers", OPTIMIZERS)
    variants = (
        list(VARIANTS) if args.variants.strip() == "all" else _names(args.variants, "--variants", VARIANTS)
    )
    batch_sizes = _parse_batch_sizes(args.batch_sizes)
    if len(batch_sizes) > MAX_BATCH_SIZES or max(batch_sizes) > 2**40:
        raise OptionError(f"--batch-sizes: at most {MAX_BATCH_SIZES} sizes, each at most 2^40")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise OptionError("--batch-sizes: a batch size is listed twice")
    if args.lr_grid > MAX_LR_GRID or args.decay_grid > MAX_DECAY_GRID:
        raise OptionError(f"--lr-grid is at most {MAX_LR_GRID} and --decay-grid at most {MAX_DECAY_GRID}")
    if args.directions < 0:
        raise OptionError(f"--directions must be >= 0, got {args.directions}")
    return optimizers, variants, sorted(batch_sizes)


def run_predict(args: argparse.Namespace) -> int:
    import fnmatch
    import json
    import time

    import torch

    from curvlab import __version__
    from curvlab.analysis.gradcov_run import bases_from_checkpoint
    from curvlab.analysis.predict_run import run_predict as predict
    from curvlab.capture.task import Task
    from curvlab.commands.gradcov import _checkpoint_layers, _checkpoint_loss
    from curvlab.device import resolve_device
    from curvlab.io.data import iterate_batches
    from curvlab.io.restore import rebuild_model
    from curvlab.models import data_options
    from curvlab.usercode import file_sha256, is_factory_spec

    start = time.perf_counter()
    optimizers, variants, batch_sizes = _check_options(args)
    device = resolve_device(args.device)
    output = args.output or derived_path(args.checkpoint, ".predict.json")
    _refuse_input_as_output(args.checkpoint, output)
    _check_writable(output)
    if args.plot:
        _refuse_input_as_output(args.checkpoint, args.plot, "--plot")
        _check_writable(args.plot)
    results = None
    if args.sweep:
        from curvlab.sweep.results import load_results

        results = load_results(args.sweep)
    model_args = _parse_model_args(args.model, args.model_arg)
    model, source = rebuild_model(args.checkpoint, args.step, model=args.model, model_args=model_args)
    config = source.config or {}
    data_spec = args.data or (config.get("data") if isinstance(config.get("data"), str) else "digits")
    name = args.model or config.get("name")
    if model_args is None and name == config.get("name"):
        model_args = config.get("args") or {}
    options = {} if not isinstance(name, str) or is_factory_spec(name) else data_options(name, model_args)
    split = _load_data(data_spec, named=args.data is not None, recorded_in=args.checkpoint, **options)
    data = (
        split
        if args.examples is None or args.examples >= len(split)
        else dataclasses.replace(split, x=split.x[: args.examples], y=split.y[: args.examples])
    )
    if len(data) < 2:
        raise OptionError(f"--data {data_spec}: the gradient variance needs at least 2 examples")
    population = _population(args.population, len(split), len(data))
    del split
    names = list(_checkpoint_layers(args.checkpoint, source.step))
    if args.layers:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args.layers)]
        if not names:
            raise OptionError(f"{args.checkpoint}: no layer matches --layers {' '.join(args.layers)}")
    bases = bases_from_checkpoint(args.checkpoint, source.step, names)
    task = Task(_checkpoint_loss(args, source.step))
    dtype = getattr(torch, args.dtype)
    model.to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    batches = [Task.move(batch, dtype=dtype) for batch in iterate_batches(data, args.batch_size)]
    prediction = _on_data(
        data_spec,
        lambda: predict(
            model,
            batches,
            bases,
            target=args.target,
            batch_sizes=batch_sizes,
            optimizers=optimizers,
            variants=variants,
            population=population,
            loss_floor=args.loss_floor,
            route=args.curvature,
            directions=args.directions,
            mc_samples=args.mc_samples,
            seed=args.seed,
            lr_grid=args.lr_grid,
            decay_grid=args.decay_grid,
            t_max=args.t_max,
            mode=args.mode,
            bins=args.bins,
            progress=not args.quiet,
            task=task,
        ),
    )
    payload = prediction.to_json()
    payload["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload["curvlab_version"] = __version__
    payload["checkpoint"] = {
        "path": os.path.abspath(args.checkpoint),
        "sha256": file_sha256(args.checkpoint),
        "step": source.step,
        "model": source.model_name,
    }
    payload["data"] = {"spec": data_spec, "examples": len(data)}
    payload["loss"] = {"name": task.loss.name, "options": task.loss.options()}
    payload["options"] = {k: v for k, v in sorted(vars(args).items()) if k != "handler"}
    if results is not None:
        from curvlab.analysis.predict_check import compare

        payload["comparison"] = {"sweep": os.path.abspath(args.sweep), **compare(payload, results)}
    payload["seconds"]["total"] = time.perf_counter() - start
    _write(lambda: _write_json(output, payload), output)
    if args.plot:
        from curvlab.plots.predict import plot_prediction

        _write(lambda: plot_prediction(payload, args.plot, results), args.plot)
    summary = {
        "output": output,
        "plot": args.plot,
        "checkpoint": payload["checkpoint"],
        "target": payload["target"],
        "initial_loss": payload["initial_loss"],
        "b_crit": payload["b_crit"],
        "noise_exponent": {k: payload["noise_exponent"].get(k) for k in ("gamma", "interval", "level")},
        "seconds": payload["seconds"],
    }
    if results is not None:
        summary["comparison"] = {
            opt: {p: e.get("log2_error") for p, e in entry["predictors"].items()}
            for opt, entry in payload["comparison"]["optimizers"].items()
        }
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        _print_summary(payload, output)
    return 0


def _write_json(path: str, payload: dict) -> None:
    import json

    from curvlab.io.atomic import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
        f.write("\n")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _print_summary(payload: dict, output: str) -> None:
    target = payload["target"]
    print(
        f"wrote {output}: loss {payload['initial_loss']:.4g} at step {payload['checkpoint']['step']}, "
        f"target {target['spec']} = {target['fraction']:.4g} of the initial risk"
    )
    scales = payload["noise_scales"]
    exponent = payload["noise_exponent"]
    print(
        f"  B_simple {_fmt(scales['b_simple'])}, B_noise {_fmt(scales['b_noise'])}; c ∝ h^γ with γ = "
        f"{_fmt(exponent.get('gamma'))}"
    )
    for variant, pred in payload["predictors"].items():
        crit = ", ".join(f"{opt} {_fmt(c['fit'].get('b_crit'))}" for opt, c in pred["optimizers"].items())
        print(f"  {variant}: B_crit {crit}")
