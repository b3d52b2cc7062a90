"""``curvlab factors``: capture the K-FAC factors of a model on data and write one checkpoint step.

Every layer with factors (Linear, Conv1d/2d/3d, Embedding, attention projections) gets its input
factor ``A = (1/N) Σ_n Σ_t a_nt a_nt^T`` and output factor ``S = (1/N) Σ_n (1/T) Σ_t g_nt g_nt^T``, so
that ``F ≈ S ⊗ A`` (seed eqs. 13, 15; :mod:`curvlab.capture.factors`; a normalisation layer's affine
parameters their exact per-channel Fisher blocks), with the gradients ``g`` of the chosen Fisher type
(``--fisher``: empirical, mc or exact; :mod:`curvlab.capture.loss`). They are written with the
model's weights and config as one complete checkpoint step (``--append``: added to an existing file,
crash-safe), with the coverage of the model's trainable parameters: a one-line warning names what has
no factors and why (``--strict``: an error, nothing written); ``--json`` gives it all under
``"coverage"``. With ``--weights CKPT [--step S]`` the model, its arguments, data and step default to
the checkpoint's. Runs data-parallel under ``torchrun``; torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES, FISHER_TYPES
from curvlab.commands.common import (
    _add_model_options,
    _check_writable,
    _positive_int,
    _refuse_input_as_output,
    _write,
)
from curvlab.errors import LayerError, OptionError

if TYPE_CHECKING:
    from curvlab.capture.coverage import Coverage
    from curvlab.io.restore import StepWeights


def _add_factors(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "factors",
        help="capture K-FAC factors of a model on data and write a checkpoint",
        description="Capture the K-FAC factors A and S of every layer with factors (Linear, Conv1d/2d/3d, "
        "Embedding, MultiheadAttention projections, normalisation layers' affine parameters; seed eqs. "
        "13, 15, 16) and write them, with the model's weights, config and coverage, as one complete "
        "checkpoint step.",
    )
    _add_model_options(p, required=False)
    p.add_argument(
        "--data",
        default=None,
        help=f"data source: {DATA_SOURCES} (default: digits; pystdlib for a language model)",
    )
    p.add_argument("--examples", type=_positive_int, default=None, help="use the first N examples")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--fisher", choices=FISHER_TYPES, default="mc", help="Fisher type (default: mc)")
    p.add_argument("--mc-samples", type=_positive_int, default=1, help="labels sampled per example (mc)")
    p.add_argument("--weights", metavar="CKPT", help="take the model's weights from this checkpoint")
    p.add_argument("--step", type=int, default=None, help="step of --weights (default: the latest)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB", help="layers to capture")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="accumulator")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and of the mc labels")
    p.add_argument("--append", action="store_true", help="add the step to an existing OUT (crash-safe)")
    p.add_argument(
        "--as-step", type=int, default=None, metavar="N", help="step number to record (default: the step "
        "of --weights, else 0)"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.h5")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--strict", action="store_true",
        help="fail (exit 2, nothing written) unless every trainable parameter gets factors",
    )
    p.set_defaults(handler=run_factors)


def run_factors(args: argparse.Namespace) -> int:
    import torch

    from curvlab import distributed
    from curvlab.capture.factors import CoverageWarning, collect_factors, save_factors
    from curvlab.device import resolve_device
    from curvlab.io.data import iterate_batches, load_dataset
    from curvlab.io.restore import load_weights
    from curvlab.models import build_model, data_options, model_config, parse_model_args

    ctx = distributed.context()
    device = resolve_device(args.device)
    output = os.path.abspath(args.output)
    if args.weights:
        _refuse_input_as_output(args.weights, output)
    if ctx.is_main:
        _check_writable(args.output)
    source = _weights_source(args)
    if source:
        distributed.check_same([source.step], f"{args.weights}: the step of --weights")
    name = args.model or (source.model_name if source else None)
    if name is None:
        raise OptionError("--model is required (or --weights with a checkpoint that names its model)")
    model_args = parse_model_args(args.model_arg)
    if source and not args.model_arg and source.config and source.model_name == name:
        model_args = dict(source.config.get("args", {}))
    data_spec = args.data or _default_data(name, model_args, source)
    data = load_dataset(data_spec, split="train", limit=args.examples, **data_options(name, model_args))
    torch.manual_seed(args.seed)
    model = build_model(name, data.input_shape, data.num_classes, model_args)
    step = 0
    if source:
        step = source.step
        load_weights(model, source)
    if args.as_step is not None:
        if args.as_step < 0:
            raise OptionError(f"--as-step must be a non-negative step number, got {args.as_step}")
        step = args.as_step
    model.to(device).eval()
    distributed.barrier("checking the options")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)  # reported below, once, on one line
        factors = collect_factors(
            model,
            iterate_batches(data, args.batch_size),
            fisher=args.fisher,
            mc_samples=args.mc_samples,
            layers=args.layers,
            dtype=getattr(torch, args.dtype),
            seed=args.seed,
            progress=not args.quiet,
        )
    _report_coverage(factors.coverage, args.strict, ctx.is_main)
    if not ctx.is_main:
        return 0
    config = model_config(name, data.input_shape, data.num_classes, model_args)
    config["data"] = data_spec
    _write(
        lambda: save_factors(
            output,
            factors,
            step=step,
            model=model,
            model_name=name,
            model_config=config,
            append=args.append,
        ),
        args.output,
    )
    summary = {
        "output": args.output,
        "step": step,
        "model": name,
        "data": data_spec,
        "fisher_type": factors.fisher_type,
        "num_examples": factors.num_examples,
        "device": str(device),
        "layers": [
            {"name": n, "module_type": f.module_type, "A_shape": list(f.A.shape), "S_shape": list(f.S.shape)}
            for n, f in factors.items()
        ],
        "coverage": factors.coverage.to_json(),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {args.output}: step {step}, {len(factors)} layers of {name}, "
            f"{factors.num_examples} examples of {data_spec}, fisher={factors.fisher_type}"
        )
    return 0


def _report_coverage(coverage: Coverage, strict: bool, main: bool) -> None:
    """Below 100 %: one line ``curvlab: warning: coverage ...`` on stderr, or with ``--strict`` a
    :class:`~curvlab.errors.LayerError` (exit 2) before anything is written."""
    if coverage.complete:
        return
    if strict:
        raise LayerError(f"--strict: {coverage.summary(limit=5)}")
    if main:
        print(f"curvlab: warning: {coverage.summary()}", file=sys.stderr)


def _default_data(name: str, model_args: dict, source: StepWeights | None) -> str:
    """The checkpoint's data with --weights; else the embedded default: token corpus for language
    models (the models whose data shape depends on their arguments), bundled digits for images."""
    from curvlab.models import data_options

    if source and source.config and source.config.get("data"):
        return source.config["data"]
    return "pystdlib" if data_options(name, model_args) else "digits"


def _weights_source(args: argparse.Namespace) -> StepWeights | None:
    """Model name, config, step and weights of ``--weights CKPT [--step S]`` (None without it)."""
    from curvlab.io.restore import read_step_weights

    if not args.weights:
        if args.step is not None:
            raise OptionError("--step needs --weights")
        return None
    return read_step_weights(args.weights, args.step)
