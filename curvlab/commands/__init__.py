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
from curvlab.io.atomic import derived_path, same_file

if TYPE_CHECKING:
    from curvlab.io.restore import StepWeights

EXIT_USAGE = 2


# Commands that share their work across the processes of ``torchrun`` (docs/distributed.md).
DISTRIBUTED_COMMANDS = ("factors", "gradcov", "spectrum", "train")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the command joins the process group first
    (:mod:`curvlab.distributed`); only process 0 writes files and prints the summary.
    """
    from curvlab import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise OptionError(f"curvlab {args.command} runs in one process; start it without torchrun "
                              f"(distributed commands: {', '.join(DISTRIBUTED_COMMANDS)})")
        with distributed.session():
            return int(args.handler(args) or 0)
    except CurvlabError as exc:
        print(f"curvlab: error: {_process_prefix(exc)}{_one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_status", EXIT_USAGE))
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _process_prefix(exc: BaseException) -> str:
    """``process R of W: `` under torchrun (a distributed error names its process itself)."""
    from curvlab.distributed import DistributedError, launched

    if not launched() or isinstance(exc, DistributedError):
        return ""
    return f"process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvlab",
        description="Curvature analysis of neural networks: K-FAC factors, eigenspectra, NQM.",
    )
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_factors(commands)
    _add_info(commands)
    _add_spectrum(commands)
    _add_gradcov(commands)
    _add_fit(commands)
    _add_nqm(commands)
    _add_train(commands)
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
    from curvlab.capture.loss import FISHER_TYPES
    from curvlab.device import DEVICE_CHOICES
    from curvlab.io.data import DATA_SOURCES

    p = commands.add_parser(
        "factors",
        help="capture K-FAC factors of a model on data and write a checkpoint",
        description="Capture the K-FAC factors A and S of every Linear/Conv2d layer (seed eqs. 13, 15) "
        "and write them, with the model's weights and config, as one complete checkpoint step.",
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

    from curvlab import distributed
    from curvlab.capture.factors import collect_factors, save_factors
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
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {args.output}: step {step}, {len(factors)} layers of {name}, "
            f"{factors.num_examples} examples of {data_spec}, fisher={factors.fisher_type}"
        )
    return 0


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
    from curvlab.io.info import describe_checkpoint, format_summary

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


# --------------------------------------------------------------------------------------- spectrum


def _add_spectrum(commands: argparse._SubParsersAction) -> None:
    from curvlab.device import DEVICE_CHOICES

    p = commands.add_parser(
        "spectrum",
        help="eigendecompose the factors: eigenvalues, eigenbases and the K-FAC eigenspectrum (Fig. 9)",
        description="Eigendecompose every factor of a checkpoint (torch.linalg.eigh, equal sizes batched, "
        "diagonal factors sorted), write eigenvalues and eigenvectors to a spectrum file, and summarise "
        "the whole-network K-FAC eigenspectrum, the products λ_S[i] λ_A[j] (seed E.1, Fig. 9).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", default="latest", metavar="S|all|latest", help="step(s) (default: latest)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB", help="layers (repeatable)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.h5", help="default: CKPT's name.spectrum.h5")
    p.add_argument("--plot", default=None, metavar="P.png", help="eigenvalue density plot (PNG/PDF/SVG)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="eigh precision")
    p.add_argument("--no-vectors", action="store_true", help="eigenvalues only (faster, smaller file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_spectrum)


def _spectrum_steps(text: str) -> int | str:
    if text in ("all", "latest"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise OptionError(f"--step {text}: expected a step number, 'latest' or 'all'")
    return value


def run_spectrum(args: argparse.Namespace) -> int:
    from curvlab import distributed
    from curvlab.analysis.spectrum import (
        compute_spectrum,
        default_output_path,
        format_summary,
        spectrum_summary,
    )

    ctx = distributed.context()
    steps = _spectrum_steps(args.step)
    output = args.output or default_output_path(args.checkpoint)
    for path, what in ((output, "-o"), (args.plot, "--plot")):
        if path and same_file(path, args.checkpoint):
            raise OptionError(f"{path}: refusing to overwrite the input checkpoint; choose another {what}")
    if args.plot and same_file(args.plot, output):
        raise OptionError(f"{args.plot}: --plot and -o name the same file")
    if ctx.is_main:
        _check_writable(output)
        if args.plot:
            _check_writable(args.plot)
    distributed.barrier("checking the options")
    result = compute_spectrum(
        args.checkpoint,
        output,
        steps=steps,
        layers=args.layers,
        device=args.device,
        dtype=args.dtype,
        vectors=not args.no_vectors,
        progress=not args.quiet,
    )
    if not ctx.is_main:  # its share went to process 0, which writes, plots and prints
        return 0
    summary = spectrum_summary(result)
    if args.plot:
        from curvlab.plots.spectrum import plot_eigenvalue_density

        _write(lambda: plot_eigenvalue_density(result, args.plot), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------ gradcov


def _add_gradcov(commands: argparse._SubParsersAction) -> None:
    from curvlab.device import DEVICE_CHOICES
    from curvlab.io.data import DATA_SOURCES

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
        "selected directions; auto = exact for up to 100 classes × label locations (tokens), else mc",
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

    from curvlab import distributed
    from curvlab.analysis.gradcov_run import bases_from_checkpoint, run_gradcov, summarize, write_result
    from curvlab.device import resolve_device
    from curvlab.io.data import iterate_batches, load_dataset
    from curvlab.io.restore import rebuild_model
    from curvlab.models import data_options

    ctx = distributed.context()
    device = resolve_device(args.device)
    output = args.output or derived_path(args.checkpoint, ".gradcov.h5")
    _refuse_input_as_output(args.checkpoint, output)
    if ctx.is_main:
        _check_writable(output)
        if args.plot:
            _check_writable(args.plot)
    if args.directions < 0:
        raise OptionError(f"--directions must be >= 0, got {args.directions}")
    model, source = rebuild_model(args.checkpoint, args.step)
    distributed.check_same([source.step], f"{args.checkpoint}: the step")
    data_spec = args.data or (source.config or {}).get("data", "digits")
    options = data_options(source.model_name, (source.config or {}).get("args", {}))
    data = load_dataset(data_spec, split="train", limit=args.examples, **options)
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
    route = args.curvature
    if route == "auto":  # exact: one backward pass per class and label location of an example
        route = "exact" if data.num_classes * max(1, data.y[0].numel()) <= 100 else "mc"
    dtype = getattr(torch, args.dtype)
    model.to(device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    batches = [
        (x.to(dtype) if x.is_floating_point() else x, y) for x, y in iterate_batches(data, args.batch_size)
    ]
    distributed.barrier("checking the options")
    result = run_gradcov(
        model, batches, bases, route=route, directions=args.directions, mc_samples=args.mc_samples,
        seed=args.seed, progress=not args.quiet,
    )
    if not ctx.is_main:
        return 0
    attrs = {"source": os.path.abspath(args.checkpoint), "step": source.step, "data": data_spec}
    _write(lambda: write_result(output, result, attrs), output)
    summary = summarize(result)
    summary.update({"output": output, "step": source.step, "data": data_spec, "skipped_layers": skipped})
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


def _checkpoint_layers(path: str, step: int) -> dict[str, str]:
    """Layer name -> module type of a checkpoint step."""
    from curvlab.io.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        return {name: reader.layer_meta(step, name)[0] for name in reader.layer_names(step)}


def _refuse_input_as_output(source: str, output: str, what: str = "-o") -> None:
    if same_file(output, source):
        raise OptionError(f"{output}: refusing to overwrite the input {source}; choose another {what}")


# -------------------------------------------------------------------------------------------- fit


def _add_fit(commands: argparse._SubParsersAction) -> None:
    from curvlab.device import DEVICE_CHOICES

    p = commands.add_parser(
        "fit",
        help="fit the sorted K-FAC eigenspectrum to the rank law λ_(i) ≈ c·i^(-s) (Fig. 12)",
        description="Fit the sorted whole-network K-FAC eigenspectrum (the products λ_S[i] λ_A[j] over "
        "all layers) to the rank law λ_(i) ≈ c·i^(-s) and compare it with the NQM's 1/i (seed E.4, "
        "Fig. 12): maximum-likelihood exponent on normalised log-spacings over a window chosen by KS "
        "distance, model-based and bootstrap intervals, OLS cross-check, curved alternatives. "
        "See docs/powerlaw.md.",
    )
    p.add_argument("checkpoint", metavar="CKPT|SPECTRUM.h5", help="a factor checkpoint or a spectrum file")
    p.add_argument("--step", default="latest", metavar="S|latest", help="step (default: latest)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB", help="layers (repeatable)")
    p.add_argument("--per-factor", action="store_true", help="also fit each factor's own spectrum (A, S)")
    p.add_argument(
        "--window", default=None, metavar="K_LO:K_HI", help="fix the rank window of the whole-network fit "
        "(either end may be left empty: chosen by KS distance)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--plot", default=None, metavar="P.png", help="Fig. 12-style plot (PNG/PDF/SVG)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where factors are decomposed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_fit)


def _fit_step(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise OptionError(f"--step {text}: expected a step number or 'latest'")
    return value


def run_fit(args: argparse.Namespace) -> int:
    from curvlab.analysis.powerlaw import fit_spectrum, kronecker_floor, parse_window
    from curvlab.analysis.spectrum import KroneckerSpectrum, load_layer_eigenvalues
    from curvlab.device import resolve_device
    from curvlab.errors import where

    step = _fit_step(args.step)
    k_lo, k_hi = parse_window(args.window) if args.window else (None, None)
    if args.bootstrap < 0:
        raise OptionError(f"--bootstrap {args.bootstrap}: must be >= 0")
    if not 0.0 < args.confidence < 1.0:
        raise OptionError(f"--confidence {args.confidence}: must lie strictly between 0 and 1")
    resolve_device(args.device)
    if args.plot:
        _refuse_input_as_output(args.checkpoint, args.plot, "--plot")
        _check_writable(args.plot)
    number, layers = load_layer_eigenvalues(
        args.checkpoint, step=step, layers=args.layers, device=args.device, progress=not args.quiet
    )
    at = where(args.checkpoint, number)
    if not layers:
        raise CheckpointError(f"{at}: no layers to fit")
    pairs = list(layers.values())
    try:
        spectrum = KroneckerSpectrum(pairs)
        fit = fit_spectrum(
            spectrum,
            k_lo=k_lo,
            k_hi=k_hi,
            bootstrap=args.bootstrap,
            seed=args.seed,
            confidence=args.confidence,
            floor=kronecker_floor(pairs),
        )
    except CurvlabError as exc:
        raise type(exc)(f"{at}: whole network: {_one_line(exc)}") from None
    except ValueError as exc:  # KroneckerSpectrum's checks of the eigenvalues
        raise CheckpointError(f"{at}: whole network: {_one_line(exc)}") from None
    summary: dict = {"file": args.checkpoint, "step": number, "num_layers": len(layers)}
    summary.update(fit.to_json())
    if args.per_factor:
        summary["factors"] = _fit_factors(layers, args)
    if args.plot:
        from curvlab.plots.powerlaw import plot_rank_law

        title = f"K-FAC eigenspectrum vs the NQM's 1/i (step {number}, {len(layers)} layers)"
        _write(lambda: plot_rank_law(fit, args.plot, title=title), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary))
    else:
        print(_format_fit(summary))
    return 0


def _fit_factors(layers: dict[str, tuple], args: argparse.Namespace) -> list[dict]:
    """Fit each factor's own eigenvalues; a factor too small or flat to fit gets an ``error`` entry."""
    import numpy as np
    from tqdm import tqdm

    from curvlab.analysis.powerlaw import default_floor, fit_rank_law

    out = []
    items = [(name, which, ev) for name, (S, A) in layers.items() for which, ev in (("A", A), ("S", S))]
    for name, which, ev in tqdm(items, desc="per-factor fits", disable=args.quiet, file=sys.stderr):
        entry: dict = {"layer": name, "factor": which, "size": int(len(ev))}
        top = float(np.max(ev)) if len(ev) else 0.0
        try:
            fit = fit_rank_law(
                ev,
                bootstrap=args.bootstrap,
                seed=args.seed,
                confidence=args.confidence,
                floor=default_floor(top, len(ev)),
            )
            entry.update(fit.to_json())
        except CurvlabError as exc:
            entry["error"] = _one_line(exc)
        out.append(entry)
    return out


def _format_fit(s: dict) -> str:
    pct = round(100 * s["confidence"])
    lines = [
        f"{s['file']}: step {s['step']}, {s['num_layers']} layers: {s['n']:,} eigenvalues, "
        f"{s['n_fit']:,} above the floor {s['floor']:.3g} ({s['num_zeros']:,} zeros)",
        f"  exponent s = {s['exponent']:.4f}  [{s['ci_low']:.4f}, {s['ci_high']:.4f}] ({pct}% model CI)"
        + (
            f"  [{s['bootstrap_low']:.4f}, {s['bootstrap_high']:.4f}] (bootstrap, {s['bootstrap']})"
            if s["bootstrap_low"] is not None
            else ""
        ),
        f"  window ranks {s['window'][0]:,}..{s['window'][1]:,} ({s['window_decades']:.1f} of "
        f"{s['spectrum_decades']:.1f} decades, {'chosen by KS' if s['window_auto'] else 'given'}); "
        f"KS {s['ks']:.4f}, log-rank KS {s['ks_log_rank']:.4f}",
        f"  OLS on log(i - 1/2): s = {s['exponent_ols']:.4f} ± {s['ols_stderr']:.4f}",
        f"  NQM's s = 1 inside the interval: {'yes' if s['nqm_in_ci'] else 'no'}; "
        f"preferred model (AIC): {s['preferred_model']}",
    ]
    base = next(m for m in s["models"] if m["name"] == "power_law")["aic"]
    for m in s["models"]:
        extra = ", ".join(f"{k}={v:.3g}" for k, v in m["params"].items() if k != "log_c")
        lines.append(
            f"    {m['name']:<14} ΔAIC {m['aic'] - base:+10.1f}  log-rank KS {m['ks_log_rank']:.4f}  "
            f"LR p {m['lr_pvalue']:.2g}  ({extra})"
        )
    for f in s.get("factors", []):
        head = f"  {f['layer']} {f['factor']} ({f['size']}):"
        if "error" in f:
            lines.append(f"{head} not fitted: {f['error']}")
        else:
            lines.append(
                f"{head} s = {f['exponent']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}], window "
                f"{f['window'][0]}..{f['window'][1]}, KS {f['ks']:.3f}"
            )
    if "plot" in s:
        lines.append(f"wrote {s['plot']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- nqm


def _one_line_parser_error(parser: argparse.ArgumentParser):
    """``parser.error`` replacement: one line ``curvlab: error: ...`` and exit 2 (no usage block)."""

    def error(message: str):
        print(f"curvlab: error: {parser.prog}: {_one_line(message)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    return error


def _add_nqm(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "nqm",
        help="noisy quadratic model: steps to target, optimal learning rates, Figs. 11, 13, 14, 15",
        description="The noisy quadratic model (seed appendices B-E): exact second-moment dynamics of "
        "SGD, heavy-ball momentum and iterate averaging; see docs/nqm.md.",
    )
    p.error = _one_line_parser_error(p)
    actions = p.add_subparsers(dest="nqm_command", required=True, metavar="ACTION")
    s = actions.add_parser(
        "steps",
        help="steps to a target risk per batch size, with the best hyper-parameters",
        description="Steps to reach expected risk < C per batch size (bisection on t), minimised over a "
        "learning-rate grid and, with --momentum tuned / --ema tuned, a decay grid.",
    )
    s.error = _one_line_parser_error(s)
    s.add_argument("--target", metavar="C", help="target expected risk (required; the default problem "
                   "starts at 4.89)")
    s.add_argument("--batch-sizes", metavar="LIST", help="comma-separated batch sizes; items may be "
                   "powers (2^10) or power-of-two ranges (2^2..2^20) (required)")
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
    f.error = _one_line_parser_error(f)
    f.add_argument("number", metavar="N", help="11, 13, 14 (all of 14a, 14b, 14c), 14a, 14b, 14c or 15")
    f.add_argument("--out", metavar="DIR", help="output folder (required; created if missing)")
    f.add_argument("--mode", default=None, metavar="exact|binned", help="problem mode (default: exact, "
                   "binned for Fig. 15)")
    f.add_argument("--d", default="10000", metavar="D", help="dimensions of the default problem")
    f.add_argument("--bins", default="100", metavar="N", help="bins in binned mode")
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
    if value < 1:
        raise OptionError(f"{name} must be a positive integer, got {text}")
    return value


def _parse_batch_item(item: str) -> int:
    if "^" in item:
        base, _, power = item.partition("^")
        value = int(base) ** int(power)
    else:
        value = int(item)
    if value < 1:
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
            raise OptionError(f"--batch-sizes: {item!r} is not a positive integer, a power like 2^10 or a "
                              "power-of-two range like 2^2..2^20") from None
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
    problem = _nqm_problem(args)
    grid = Grid(kind, np.geomspace(lr_min, lr_max, lr_num), decays, precond)
    result = steps_to_target(problem, target, batch, grid, t_max=t_max, progress=not args.quiet)
    records = result.records()
    if args.json:
        print(json.dumps(records))
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
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"{args.out}: cannot create the output folder: {exc.strerror or exc}") from None
    _check_writable(os.path.join(args.out, "fig.png"))
    needs_problem = [n for n in names if n != "11"]
    problem = _nqm_problem(args, "binned" if names == ["15"] else "exact") if needs_problem else None

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    written = []
    reference = None
    for name in names:
        log(f"[nqm figure {name}] computing ({problem.mode + ' mode' if problem else 'closed forms'})")
        bar = None
        if not args.quiet and name != "11":
            from tqdm import tqdm

            total = {"13": len(figures.FIG13_THRESHOLDS), "15": 1}.get(name, len(figures.FIG14_POWERS))
            bar = tqdm(total=total, desc=f"fig {name}", unit="sweep", leave=False, file=sys.stderr)
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
        log(f"[nqm figure {name}] wrote {png} and {js}")
    print("wrote " + ", ".join(written))
    return 0


# ------------------------------------------------------------------------------------------ train

#: ``curvlab train`` options that map one-to-one onto ``curvlab.optim.train.TrainConfig`` fields.
_TRAIN_FIELDS = (
    "model", "data", "examples", "optimizer", "steps", "batch_size", "lr", "schedule", "decay_steps",
    "final_lr_factor", "momentum", "beta2", "eps", "weight_decay", "damping", "kl_clip", "factor_decay",
    "factor_update_every", "inverse_update_every", "fisher", "mc_samples", "factor_examples", "save_every",
    "save_steps", "seed",
)


def _add_train(commands: argparse._SubParsersAction) -> None:
    from curvlab.capture.loss import FISHER_TYPES
    from curvlab.device import DEVICE_CHOICES
    from curvlab.io.data import DATA_SOURCES
    from curvlab.optim.train import OPTIMIZERS, SCHEDULES

    p = commands.add_parser(
        "train",
        help="train a model (sgd, momentum, adam or K-FAC) and save factors and weights along the way",
        description="Train a model and write RUN/ckpt.h5 (factors and weights at step 0, every --save-every "
        "steps, at --save-steps and at the end), RUN/metrics.jsonl and RUN/config.json. With kfac the saved "
        "factors are the optimizer's running averages; otherwise they are collected on a fixed set of "
        "--factor-examples training examples. --resume continues a killed run from its last complete step. "
        "Options left out take the run's stored values on --resume, else their defaults.",
    )
    _add_model_options(p, required=False)
    p.add_argument("--data", default=None, help=f"data source: {DATA_SOURCES} (default: digits for the image "
                   "models, pystdlib for transformer_shallow)")
    p.add_argument("--examples", type=_positive_int, default=None, help="train on the first N examples only")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: kfac")
    p.add_argument("--steps", type=_positive_int, default=None, help="number of updates (required)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: 128")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate α0 (default: sgd 0.1, momentum 0.05, adam 0.001, kfac 0.05)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="seed F.3 (default: constant)")
    p.add_argument("--decay-steps", type=_positive_int, default=None, help="T_decay (default: --steps)")
    p.add_argument("--final-lr-factor", type=float, default=None, help="γ, the final lr / α0 (default: 0.01)")
    p.add_argument("--momentum", type=float, default=None, help="momentum / kfac momentum / adam β1 (0.9)")
    p.add_argument("--beta2", type=float, default=None, help="adam β2 (default: 0.999)")
    p.add_argument("--eps", type=float, default=None, help="adam ε (default: 1e-8)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0")
    p.add_argument("--damping", type=float, default=None, help="kfac Tikhonov damping λ (default: 0.01)")
    p.add_argument("--kl-clip", type=_kl_clip, default=None, help="kfac KL clipping κ, or 'none' (0.001)")
    p.add_argument("--factor-decay", type=float, default=None, help="kfac factor moving average ε (0.95)")
    p.add_argument("--factor-update-every", type=_positive_int, default=None, help="kfac (default: 1)")
    p.add_argument("--inverse-update-every", type=_positive_int, default=None, help="kfac (default: 10)")
    p.add_argument("--fisher", choices=FISHER_TYPES, default=None, help="Fisher type of the factors (mc)")
    p.add_argument("--mc-samples", type=_positive_int, default=None, help="labels per example for mc (1)")
    p.add_argument("--factor-examples", type=_positive_int, default=None,
                   help="size of the fixed factor set (default: 512, at most the training set)")
    p.add_argument("--save-every", type=_positive_int, default=None, metavar="K", help="save every K steps")
    p.add_argument("--save-steps", type=_step_list, default=None, metavar="LIST", help="e.g. 10,20,50")
    p.add_argument("--seed", type=_nonnegative_int, default=None, help="init, data order, mc labels (0)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("-o", "--output", required=True, metavar="RUN/", help="the run folder")
    p.add_argument("--resume", action="store_true", help="continue RUN/ from its last complete step")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _kl_clip(text: str) -> float | str:
    if text.strip().lower() == "none":
        return "none"
    return float(text)


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"step numbers must be non-negative, got {text!r}")
    return steps


def run_train(args: argparse.Namespace) -> int:
    from curvlab import distributed
    from curvlab.device import resolve_device
    from curvlab.models import parse_model_args
    from curvlab.optim.train import TrainConfig, default_data, read_config, train

    device = resolve_device(args.device)
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.model_arg:
        given["model_args"] = parse_model_args(args.model_arg)
    if given.get("kl_clip") == "none":
        given["kl_clip"] = None
    stored = read_config(args.output) if args.resume and os.path.isdir(args.output) else None
    if stored is not None:
        options = {**stored.to_json(), **given}
    else:
        for name in ("model", "steps"):
            if name not in given:
                raise OptionError(f"--{name} is required (unless --resume finds a run in {args.output})")
        options = {"optimizer": "kfac", **given}
        options.setdefault("data", default_data(options["model"], options.get("model_args")))
    summary = train(TrainConfig(**options), args.output, resume=args.resume, device=device,
                    progress=not args.quiet)
    if not distributed.context().is_main:
        return 0  # under torchrun only process 0 reports
    if args.json:
        print(json.dumps(summary))
    else:
        resumed = "" if summary["resumed_from"] is None else f" (resumed from step {summary['resumed_from']})"
        loss = summary["final_loss"]
        last = "no update to make" if loss is None else f"final batch loss {loss:.4f}"
        print(
            f"trained {summary['model']} with {summary['optimizer']} on {summary['data']} for "
            f"{summary['steps']} steps{resumed}: {last}; wrote "
            f"{os.path.join(args.output, 'ckpt.h5')} with steps {summary['saved_steps']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
