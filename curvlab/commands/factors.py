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
import os
import sys
import warnings
from typing import TYPE_CHECKING

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES, FISHER_TYPES
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
    dump_json,
)
from curvlab.errors import LayerError, ModelError, OptionError

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
    _add_model_options(p, required=False, rebuild="default: the --weights checkpoint's model (a model built "
                       "by a factory needs --model naming it); required without --weights")
    p.add_argument(
        "--data",
        default=None,
        help=f"data source: {DATA_SOURCES}, or your own PATH.py:FUNC / package.module:FUNC (default: the "
        "--weights checkpoint's; else digits, pystdlib for transformer_shallow)",
    )
    p.add_argument("--examples", type=_positive_int, default=None,
                   help="use the first N examples (default: all of the training split)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="examples per batch")
    p.add_argument("--fisher", choices=FISHER_TYPES, default="mc", help="Fisher type (default: mc)")
    p.add_argument("--mc-samples", type=_positive_int, default=1, help="labels sampled per example (mc)")
    _add_loss_options(p, "cross-entropy; with --weights, the checkpoint step's")
    p.add_argument("--weights", metavar="CKPT",
                   help="take the model's weights from this checkpoint (default: a new model)")
    p.add_argument("--step", type=int, default=None, help="step of --weights (default: the latest)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="layers to capture, repeatable (default: every layer with factors)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="accumulator")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init and of the mc labels (default: 0)")
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
    from curvlab.capture.task import Task
    from curvlab.device import resolve_device
    from curvlab.io.data import iterate_batches
    from curvlab.io.restore import load_weights

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
    model, data, data_spec = _model_and_data(args, source)
    step = source.step if source else 0
    if source:
        load_weights(model, source)
    if args.as_step is not None:
        if args.as_step < 0:
            raise OptionError(f"--as-step must be a non-negative step number, got {args.as_step}")
        step = args.as_step
    model.to(device).eval()
    task = Task(_loss(args, model, source))
    distributed.barrier("checking the options")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)  # reported below, once, on one line
        factors = _on_data(data_spec, lambda: collect_factors(
            model,
            iterate_batches(data, args.batch_size),
            fisher=args.fisher,
            mc_samples=args.mc_samples,
            layers=args.layers,
            dtype=getattr(torch, args.dtype),
            seed=args.seed,
            progress=not args.quiet,
            task=task,
        ))
    _report_coverage(factors.coverage, args.strict, ctx.is_main)
    if not ctx.is_main:
        return 0
    from curvlab.models import config_of

    config = {**(config_of(model) or {}), "data": data_spec}
    name = config.get("name") or config.get("factory")
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
        "loss": task.loss.name,
        "loss_options": task.loss.options(),
        "device": str(device),
        **factors.to_json(),
        "coverage": factors.coverage.to_json(),
    }
    if args.json:
        print(dump_json(summary))
    else:
        print(
            f"wrote {args.output}: step {step}, {len(factors)} layers of {name}, "
            f"{factors.num_examples} examples of {data_spec}, fisher={factors.fisher_type}, "
            f"loss={task.loss.describe()}"
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



def _loss(args: argparse.Namespace, model, source: StepWeights | None):
    """The loss of ``--loss``/``--ignore-index``/``--label-smoothing``; without them, the loss the
    ``--weights`` step records (its model's training loss), else softmax cross-entropy with the model's
    own label smoothing."""
    from curvlab.capture.loss import loss_from_attrs, make_loss
    from curvlab.commands.common import _loss_given
    from curvlab.io.checkpoint import CheckpointReader

    if source is not None and not _loss_given(args):
        with CheckpointReader(source.path) as reader:
            attrs = reader.step_attrs(source.step)
        if "loss" in attrs:
            return loss_from_attrs(attrs, f"{source.path}: step {source.step}")
    name = args.loss or "cross-entropy"
    smoothing = args.label_smoothing
    if smoothing is None:
        smoothing = float(getattr(model, "label_smoothing", 0.0) or 0.0) if name == "cross-entropy" else 0.0
    return make_loss(name, ignore_index=args.ignore_index, label_smoothing=smoothing)



def _model_and_data(args: argparse.Namespace, source: StepWeights | None):
    """The model (a registry model or the user's factory; with ``--weights``, the checkpoint's, which a
    factory-built checkpoint needs ``--model`` for) and the data it runs on, with the data's spec."""
    import torch

    from curvlab.models import build_model, data_options
    from curvlab.models.factory import build_factory_model, check_forward
    from curvlab.usercode import (
        check_recorded,
        is_factory_spec,
        load_factory,
        recorded_factory,
        require_named,
    )

    if source:
        recorded = recorded_factory(source.config) or (
            source.model_name if is_factory_spec(source.model_name) else None)
        if recorded:
            require_named(recorded, args.model, args.weights, args=(source.config or {}).get("args"),
                          error=ModelError)
    name = args.model or (source.model_name if source else None)
    if name is None:
        raise OptionError("--model is required (or --weights with a checkpoint that names its model)")
    model_args = _parse_model_args(name, args.model_arg)
    factory = is_factory_spec(name)
    if not factory and model_args is None and source and source.config and source.model_name == name:
        model_args = dict(source.config.get("args", {}))
    options = {} if factory else data_options(name, model_args)
    data_spec = args.data or _default_data(name, model_args, source)
    data = _load_data(data_spec, named=args.data is not None, recorded_in=args.weights or "",
                      limit=args.examples, **options)
    torch.manual_seed(args.seed)
    if not factory:
        return build_model(name, data.input_shape, data.num_classes, model_args), data, data_spec
    loaded = load_factory(name, "--model", ModelError)
    if source and recorded_factory(source.config):
        check_recorded(loaded, model_args or {}, source.config or {}, args.weights,
                       args_given=model_args is not None, error=ModelError)
    model = build_factory_model(loaded, data.input_shape, data.num_classes, model_args)
    check_forward(model, data, f"--model {name} on --data {data_spec}")
    return model, data, data_spec


def _default_data(name: str, model_args: dict | None, source: StepWeights | None) -> str:
    """The checkpoint's data with --weights; else the embedded default: token corpus for language
    models (the models whose data shape depends on their arguments), bundled digits for images and
    for a factory's model."""
    from curvlab.models import data_options
    from curvlab.usercode import is_factory_spec

    if source and source.config and isinstance(source.config.get("data"), str):
        return source.config["data"]
    if is_factory_spec(name):
        return "digits"
    return "pystdlib" if data_options(name, model_args) else "digits"


def _weights_source(args: argparse.Namespace) -> StepWeights | None:
    """Model name, config, step and weights of ``--weights CKPT [--step S]`` (None without it)."""
    from curvlab.io.restore import read_step_weights

    if not args.weights:
        if args.step is not None:
            raise OptionError("--step needs --weights")
        return None
    return read_step_weights(args.weights, args.step)
