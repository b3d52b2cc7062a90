"""The ``curvlab`` command line: thin argparse wrappers over the library.

Every command prints a short summary on stdout (or one JSON object with ``--json``), shows progress on
stderr, and turns a user error into one line ``curvlab: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from curvlab import __version__
from curvlab.errors import CheckpointError, CurvlabError, OptionError

if TYPE_CHECKING:
    from curvlab.restore import StepWeights

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CurvlabError as exc:
        print(f"curvlab: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvlab",
        description="Curvature analysis of neural networks: K-FAC factors, eigenspectra, NQM.",
    )
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_factors(commands)
    _add_info(commands)
    # <spectrum-commands>
    _add_gradcov(commands)
    # <fit-commands>
    # <nqm-commands>
    # <train-commands>
    return parser


def _add_model_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    from curvlab.models import available_models

    parser.add_argument(
        "--model",
        required=required,
        choices=available_models(),
        help="model to build (with --weights: defaults to the checkpoint's model)",
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model hyper-parameter, repeatable (e.g. widths=64,32)",
    )


def _add_factors(commands: argparse._SubParsersAction) -> None:
    from curvlab.data import DATA_SOURCES
    from curvlab.device import DEVICE_CHOICES
    from curvlab.loss import FISHER_TYPES

    p = commands.add_parser(
        "factors",
        help="capture K-FAC factors of a model on data and write a checkpoint",
        description="Capture the K-FAC factors A and S of every Linear/Conv2d layer (seed eqs. 13, 15) "
        "and write them, with the model's weights and config, as one complete checkpoint step.",
    )
    _add_model_options(p, required=False)
    p.add_argument("--data", default="digits", help=f"data source: {DATA_SOURCES} (default: digits)")
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
    p.set_defaults(handler=run_factors)


def _add_info(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "info",
        help="list the steps, layers and factor shapes of a checkpoint, with sanity figures",
        description="Validate a factor checkpoint and list its steps, layers, module types, factor "
        "shapes and kinds, traces, diagonal ranges and symmetry errors.",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, action="append", default=None, help="only this step (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_info)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# ---------------------------------------------------------------------------------------- factors


def run_factors(args: argparse.Namespace) -> int:
    import torch

    from curvlab.data import iterate_batches, load_dataset
    from curvlab.device import resolve_device
    from curvlab.factors import collect_factors, save_factors
    from curvlab.models import build_model, model_config, parse_model_args
    from curvlab.restore import load_weights

    device = resolve_device(args.device)
    output = os.path.abspath(args.output)
    if args.weights and os.path.exists(output) and os.path.samefile(output, args.weights):
        raise OptionError(f"{args.output}: refusing to write into the --weights input; choose another -o")
    _check_writable(args.output)
    data = load_dataset(args.data, split="train", limit=args.examples)
    source = _weights_source(args)
    name = args.model or (source.model_name if source else None)
    if name is None:
        raise OptionError("--model is required (or --weights with a checkpoint that names its model)")
    model_args = parse_model_args(args.model_arg)
    if source and not args.model_arg and source.config and source.model_name == name:
        model_args = dict(source.config.get("args", {}))
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
    config = model_config(name, data.input_shape, data.num_classes, model_args)
    config["data"] = args.data
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
        "data": args.data,
        "fisher_type": factors.fisher_type,
        "num_examples": factors.num_examples,
        "device": str(device),
        "layers": [
            {"name": n, "module_type": f.module_type, "A_shape": list(f.A.shape), "S_shape": list(f.S.shape)}
            for n, f in factors.items()
        ],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {args.output}: step {step}, {len(factors)} layers of {name}, "
            f"{factors.num_examples} examples of {args.data}, fisher={factors.fisher_type}"
        )
    return 0


def _weights_source(args: argparse.Namespace) -> StepWeights | None:
    """Model name, config, step and weights of ``--weights CKPT [--step S]`` (None without it)."""
    from curvlab.restore import read_step_weights

    if not args.weights:
        if args.step is not None:
            raise OptionError("--step needs --weights")
        return None
    return read_step_weights(args.weights, args.step)


def _check_writable(path: str) -> None:
    """Fail before any work if the output's folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{path}: cannot write: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OptionError(f"{path}: cannot write: folder {folder} is not writable")


def _write(writer, path: str) -> None:
    """Run a writer, turning an OS error (missing folder, no permission, full disk) into one line."""
    try:
        writer()
    except OSError as exc:
        raise CurvlabError(f"{path}: cannot write: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    from curvlab.info import describe_checkpoint, format_summary

    summary = describe_checkpoint(args.checkpoint, steps=args.step)
    if args.step is not None:
        found = {s["step"] for s in summary["steps"]}
        absent = [s for s in args.step if s not in found]
        if absent:
            raise CheckpointError(f"{args.checkpoint}: step {absent[0]}: no such step")
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


# <spectrum-handlers>


# ------------------------------------------------------------------------------------------ gradcov


def _add_gradcov(commands: argparse._SubParsersAction) -> None:
    from curvlab.data import DATA_SOURCES
    from curvlab.device import DEVICE_CHOICES

    p = commands.add_parser(
        "gradcov",
        help="gradient variance vs curvature along the K-FAC eigenbasis (Fig. 10)",
        description="Project every example's gradient onto the Kronecker-factored eigenbasis of the "
        "checkpoint's factors and compare, direction by direction, the gradient variance with the "
        "curvature v^T F v of the true Fisher (seed E.2).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--data", default=None, help=f"data source: {DATA_SOURCES} (default: the checkpoint's)")
    p.add_argument("--examples", type=_positive_int, default=1024, help="training examples (default 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--directions", type=int, default=4, help="jvp-checked directions per layer (default 4)")
    p.add_argument(
        "--curvature",
        choices=("auto", "exact", "mc", "fvp"),
        default="auto",
        help="all-direction route (exact: one pass per class; mc: sampled labels) or fvp only on the "
        "selected directions; auto = exact for up to 100 classes, else mc",
    )
    p.add_argument("--mc-samples", type=_positive_int, default=4)
    p.add_argument("--layers", action="append", default=None, metavar="GLOB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="model precision (default float64: the flattest directions' curvature is ~1e-20 of the "
        "largest, below float32's resolution)",
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("-o", "--output", default=None, metavar="OUT.h5", help="default: CKPT.gradcov.h5")
    p.add_argument("--plot", default=None, metavar="P.png")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run_gradcov)


def run_gradcov(args: argparse.Namespace) -> int:
    import fnmatch

    import torch

    from curvlab.data import iterate_batches, load_dataset
    from curvlab.device import resolve_device
    from curvlab.gradcov import bases_from_checkpoint, run_gradcov, summarize, write_result
    from curvlab.restore import rebuild_model

    device = resolve_device(args.device)
    output = args.output or _derived_path(args.checkpoint, ".gradcov.h5")
    _refuse_input_as_output(args.checkpoint, output)
    _check_writable(output)
    if args.plot:
        _check_writable(args.plot)
    if args.directions < 0:
        raise OptionError(f"--directions must be >= 0, got {args.directions}")
    model, source = rebuild_model(args.checkpoint, args.step)
    data_spec = args.data or (source.config or {}).get("data", "digits")
    data = load_dataset(data_spec, split="train", limit=args.examples)
    if len(data) < 2:
        raise OptionError(f"--data {data_spec}: the gradient variance needs at least 2 examples")
    names = _checkpoint_layers(args.checkpoint, source.step)
    if args.layers:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args.layers)]
        if not names:
            raise OptionError(f"{args.checkpoint}: no layer matches --layers {' '.join(args.layers)}")
    bases = bases_from_checkpoint(args.checkpoint, source.step, names)
    route = args.curvature
    if route == "auto":
        route = "exact" if data.num_classes <= 100 else "mc"
    dtype = getattr(torch, args.dtype)
    model.to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    batches = [
        (x.to(dtype) if x.is_floating_point() else x, y) for x, y in iterate_batches(data, args.batch_size)
    ]
    result = run_gradcov(
        model, batches, bases, route=route, directions=args.directions, mc_samples=args.mc_samples,
        seed=args.seed, progress=not args.quiet,
    )
    attrs = {"source": os.path.abspath(args.checkpoint), "step": source.step, "data": data_spec}
    _write(lambda: write_result(output, result, attrs), output)
    summary = summarize(result)
    summary.update({"output": output, "step": source.step, "data": data_spec})
    if args.plot:
        from curvlab.plots.gradcov import plot_variance_vs_curvature

        title = f"{source.model_name or 'model'}, step {source.step}, {summary['num_examples']} examples"
        _write(lambda: plot_variance_vs_curvature(result, args.plot, title), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {output}: {summary['num_directions']} directions over {len(result.layers)} layers, "
            f"curvature by {route}; Spearman(variance, curvature) = {summary['spearman']:.3f}, "
            f"median |log10 ratio| = {summary['median_abs_log10_ratio']:.3f}"
        )
    return 0


def _checkpoint_layers(path: str, step: int) -> list[str]:
    from curvlab.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        return reader.layer_names(step)


def _derived_path(path: str, suffix: str) -> str:
    """``run/ckpt.h5`` -> ``run/ckpt<suffix>``: outputs go next to the input, never into it."""
    stem = path[:-3] if path.endswith(".h5") else path
    return stem + suffix


def _refuse_input_as_output(source: str, output: str) -> None:
    if os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source):
        raise OptionError(f"{output}: refusing to overwrite the input checkpoint; choose another -o")


# <fit-handlers>


# <nqm-handlers>


# <train-handlers>


if __name__ == "__main__":
    sys.exit(main())
