"""``curvlab gradcov``: gradient variance against curvature along the K-FAC eigenbasis (seed E.2, Fig. 10).

With the checkpoint's factors ``A = Q_A diag(λ_A) Q_A^T`` and ``S = Q_S diag(λ_S) Q_S^T``, direction
``(i, j)`` of a layer is the weight perturbation ``v = Q_S[:, i] Q_A[:, j]^T`` with K-FAC eigenvalue
``λ_S[i] λ_A[j]``. Every example's gradient is projected onto these directions, and direction by
direction its variance ``Var_n(v^T g_n)`` is compared with the curvature ``v^T F v`` of the true Fisher
(:mod:`curvlab.analysis.gradcov`): ``--curvature exact`` (one backward pass per class and label
location), ``mc`` (sampled labels) or ``fvp`` (Fisher-vector products, :mod:`curvlab.analysis.curvature`,
on the ``--directions`` checked directions only); ``auto`` is exact for up to 100 backward passes per
batch (classes × label locations), else mc. Every route uses the loss the checkpoint step records (its
factors were made with it; ``--loss`` and its options for files that record none, softmax
cross-entropy by default). The model is rebuilt from the checkpoint and run in float64 by default. Runs
data-parallel under ``torchrun``; torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES
from curvlab.commands.common import (
    _add_loss_options,
    _add_model_options,
    _check_plot,
    _check_writable,
    _load_data,
    _loss_given,
    _on_data,
    _parse_model_args,
    _positive_int,
    _refuse_input_as_output,
    _write,
    dump_json,
)
from curvlab.errors import OptionError
from curvlab.io.atomic import derived_path, same_file


def _add_gradcov(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "gradcov",
        help="gradient variance vs curvature along the K-FAC eigenbasis (Fig. 10)",
        description="Project every example's gradient onto the Kronecker-factored eigenbasis of the "
        "checkpoint's factors and compare, direction by direction, the gradient variance with the "
        "curvature v^T F v of the true Fisher (seed E.2).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    _add_model_options(p, required=False, rebuild="default: the checkpoint's model; a model built by a "
                       "factory is rebuilt only with --model (and --model-arg) naming it")
    p.add_argument("--data", default=None, help=f"data source: {DATA_SOURCES}, or your own PATH.py:FUNC "
                   "(default: the checkpoint's; a recorded factory must be named again)")
    p.add_argument("--examples", type=_positive_int, default=1024, help="training examples (default 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="examples per batch")
    p.add_argument("--directions", type=int, default=4, help="jvp-checked directions per layer (default 4)")
    p.add_argument(
        "--curvature",
        choices=("auto", "exact", "mc", "fvp"),
        default="auto",
        help="all-direction route (exact: one pass per class; mc: sampled labels) or fvp only on the "
        "selected directions; auto = exact for up to 100 classes × label locations (tokens), else mc",
    )
    p.add_argument("--mc-samples", type=_positive_int, default=4,
                   help="labels per example for --curvature mc")
    _add_loss_options(p, "the loss the checkpoint step records, else cross-entropy")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="layers, repeatable (default: every layer of the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mc labels")
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="model precision (default float64: the flattest directions' curvature is ~1e-20 of the "
        "largest, below float32's resolution)",
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
    p.add_argument("-o", "--output", default=None, metavar="OUT.h5", help="default: CKPT.gradcov.h5")
    p.add_argument("--plot", default=None, metavar="P.png",
                   help="variance vs curvature plot (default: no plot)")
    p.add_argument(
        "--ekfac",
        default=None,
        metavar="EK.h5",
        help="also write the EKFAC eigenvalues (the second moments in the KFE, with the basis) to this file, "
        "which spectrum, fit and curvlab.EKFACOperator.from_file read (default: not written)",
    )
    p.add_argument(
        "--ekfac-moments",
        choices=("fisher", "empirical"),
        default="fisher",
        help="EKFAC eigenvalues: the Fisher's (the curvature route's; default) or the true-label gradients'",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_gradcov)


def run_gradcov(args: argparse.Namespace) -> int:
    import fnmatch

    import torch

    from curvlab import distributed
    from curvlab.analysis.gradcov_run import (
        auto_route,
        bases_from_checkpoint,
        check_bases_fit,
        check_finite_result,
        run_gradcov,
        write_result,
    )
    from curvlab.capture.task import Task
    from curvlab.device import resolve_device
    from curvlab.io.data import iterate_batches
    from curvlab.io.restore import check_data_fits, check_outputs, rebuild_model
    from curvlab.models import data_options
    from curvlab.usercode import is_factory_spec

    ctx = distributed.context()
    device = resolve_device(args.device)
    output = args.output or derived_path(args.checkpoint, ".gradcov.h5")
    _refuse_input_as_output(args.checkpoint, output)
    if args.ekfac:
        _refuse_input_as_output(args.checkpoint, args.ekfac, "--ekfac")
        if args.ekfac_moments == "fisher" and args.curvature == "fvp":
            raise OptionError("--ekfac with --curvature fvp has no Fisher second moments: use "
                              "--ekfac-moments empirical or another --curvature")
    if args.plot and same_file(args.plot, output):
        raise OptionError(f"{args.plot}: --plot and -o name the same file")
    if ctx.is_main:
        _check_writable(output)
        _check_plot(args.plot, args.checkpoint)
        if args.ekfac:
            _check_writable(args.ekfac)
    if args.directions < 0:
        raise OptionError(f"--directions must be >= 0, got {args.directions}")
    model_args = _parse_model_args(args.model, args.model_arg)
    model, source = rebuild_model(args.checkpoint, args.step, model=args.model, model_args=model_args)
    distributed.check_same([source.step], f"{args.checkpoint}: the step")
    config = source.config or {}
    data_spec = args.data or (config.get("data") if isinstance(config.get("data"), str) else "digits")
    name = args.model or config.get("name")
    if model_args is None and name == config.get("name"):
        model_args = config.get("args") or {}
    options = {} if not isinstance(name, str) or is_factory_spec(name) else data_options(name, model_args)
    data = _load_data(data_spec, named=args.data is not None, recorded_in=args.checkpoint,
                      limit=args.examples, **options)
    check_data_fits(source, data_spec, data.input_shape, data.num_classes)
    if len(data) < 2:
        raise OptionError(f"--data {data_spec}: the gradient variance needs at least 2 examples")
    layer_types = _checkpoint_layers(args.checkpoint, source.step)
    skipped: list[dict[str, str]] = []  # every layer type is projected (the tied embedding included)
    names = list(layer_types)
    if args.layers:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args.layers)]
        if not names:
            raise OptionError(f"{args.checkpoint}: no layer matches --layers {' '.join(args.layers)}")
    bases = bases_from_checkpoint(args.checkpoint, source.step, names)
    check_bases_fit(model, bases, f"{args.checkpoint}: step {source.step}")
    task = Task(_checkpoint_loss(args, source.step))
    dtype = getattr(torch, args.dtype)
    model.to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    batches = [Task.move(batch, dtype=dtype) for batch in iterate_batches(data, args.batch_size)]
    check_outputs(model, task.split_batch(Task.move(batches[0], device=device))[0],
                  f"{args.checkpoint}: step {source.step}", forward=task.forward,
                  saturation=task.loss.name == "cross-entropy")
    distributed.barrier("checking the options")
    route = args.curvature
    if route == "auto":  # exact: at most 100 backward passes per batch (classes × label locations)
        route = _on_data(data_spec, lambda: auto_route(model, batches, task))
    result = _on_data(data_spec, lambda: run_gradcov(
        model, batches, bases, route=route, directions=args.directions, mc_samples=args.mc_samples,
        seed=args.seed, progress=not args.quiet, task=task,
    ))
    check_finite_result(result, f"{args.checkpoint}: step {source.step}")
    if not ctx.is_main:
        return 0
    attrs = {"source": os.path.abspath(args.checkpoint), "step": source.step, "data": data_spec,
             **task.loss.to_attrs()}
    _write(lambda: write_result(output, result, attrs), output)
    summary = result.to_json()
    summary.update({"output": output, "step": source.step, "data": data_spec, "skipped_layers": skipped})
    if args.ekfac:
        fisher = result.route if args.ekfac_moments == "fisher" else "empirical"
        _write(lambda: _write_ekfac(args, source, bases, result, fisher, attrs), args.ekfac)
        summary["ekfac"] = {"output": args.ekfac, "fisher_type": fisher}
    if args.plot:
        from curvlab.plots.gradcov import plot_variance_vs_curvature

        title = f"{source.model_name or 'model'}, step {source.step}, {summary['num_examples']} examples"
        _write(lambda: plot_variance_vs_curvature(result, args.plot, title), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(dump_json(summary))
    else:
        print(
            f"wrote {output}: {summary['num_directions']} directions over {len(result.layers)} layers, "
            f"curvature by {route}; Spearman(variance, curvature) = {summary['spearman']:.3f}, "
            f"median |log10 ratio| = {summary['median_abs_log10_ratio']:.3f}"
        )
    return 0


def _checkpoint_loss(args: argparse.Namespace, step: int):
    """The loss the checkpoint step records (a file without one: ``--loss`` and its options, else
    softmax cross-entropy). Options that disagree with the recorded loss are an error: the factors, and
    so the eigenbasis, were made with it."""
    from curvlab.capture.loss import loss_from_attrs, make_loss
    from curvlab.io.checkpoint import CheckpointReader

    with CheckpointReader(args.checkpoint) as reader:
        attrs = reader.step_attrs(step)
    where = f"{args.checkpoint}: step {step}"
    recorded = loss_from_attrs(attrs, where)
    if not _loss_given(args):
        return recorded
    base = recorded if "loss" in attrs else make_loss()
    name = args.loss or base.name
    same = name == base.name
    options = {
        "ignore_index": args.ignore_index if args.ignore_index is not None
        else (getattr(base, "ignore_index", None) if same else None),
        "label_smoothing": args.label_smoothing if args.label_smoothing is not None
        else (getattr(base, "label_smoothing", 0.0) if same else 0.0),
    }
    given = make_loss(name, **options)
    if "loss" in attrs and given != recorded:
        raise OptionError(
            f"{where}: the factors were made with loss {recorded.describe()}; --loss and its options say "
            f"{given.describe()} (leave them out to use the recorded one)"
        )
    return given



def _checkpoint_layers(path: str, step: int) -> dict[str, str]:
    """Layer name -> module type of a checkpoint step."""
    from curvlab.io.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        return {name: reader.layer_meta(step, name)[0] for name in reader.layer_names(step)}


def _write_ekfac(args: argparse.Namespace, source, bases, result, fisher: str, attrs: dict) -> None:
    """The EKFAC file (curvlab/io/ekfac.py): the bases used and the chosen second moments in them."""
    from curvlab.io.checkpoint import CheckpointReader
    from curvlab.io.ekfac import write_ekfac

    layers = {}
    with CheckpointReader(args.checkpoint) as reader:
        for name, basis in bases.items():
            stats = result.layers[name]
            values = stats.second_moment if fisher == "empirical" else stats.curvature
            layers[name] = _ekfac_layer(reader.layer_meta(source.step, name), basis, values.clip(min=0))
    write_ekfac(args.ekfac, source.step, layers, fisher_type=fisher, num_examples=stats.num_examples,
                attrs=attrs, model_name=source.model_name, model_config=source.config)


def _ekfac_layer(meta: tuple, basis, values):
    """One layer of the EKFAC file from gradcov's :class:`~curvlab.analysis.basis.LayerBasis` and the
    ``m × n`` second moments in its directions: a diagonal factor's basis as a permutation (never
    ``V × V``), a ``NormAffine`` entry's blocks with their columns sorted by eigenvalue (``A_order``,
    docs/format.md)."""
    import numpy as np

    from curvlab.io.ekfac import EKFACLayer, permutation_of

    module_type, weight_shape, has_bias = meta
    eig_s = basis.eigenvalues_S.double().cpu().numpy()
    eig_a = basis.eigenvalues_A.double().cpu().numpy()
    if basis.order_S is not None:
        q_s, s_order = None, basis.order_S.cpu().numpy().astype(np.int64)
    else:
        q_s = basis.Q_S.double().cpu().numpy()
        s_order = permutation_of(q_s)
        q_s = None if s_order is not None else q_s
    q_a = basis.Q_A.double().cpu().numpy()
    if basis.blocks:  # gradcov's columns are in block order c·k + j: sort them as the file wants
        a_order = np.argsort(eig_a, kind="stable").astype(np.int64)
        eig_a, values = eig_a[a_order], values[:, a_order]
    else:
        a_order = permutation_of(q_a)
        q_a = None if a_order is not None else q_a
    return EKFACLayer(module_type, weight_shape, has_bias, values, eig_s, eig_a, q_s, s_order, q_a, a_order)
