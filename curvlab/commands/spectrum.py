"""``curvlab spectrum``: eigendecompose every factor and summarise the whole-network K-FAC eigenspectrum.

Each factor of the chosen steps and layers is eigendecomposed (``torch.linalg.eigh``, equal sizes
batched, diagonal factors sorted; :mod:`curvlab.analysis.spectrum`); eigenvalues and eigenvectors go to
a spectrum file (default ``CKPT``'s name ``.spectrum.h5``), and the summary describes the K-FAC
eigenspectrum of the whole network, the products ``λ_S[i] λ_A[j]`` over all layers (seed E.1, Fig. 9),
optionally as a density plot. Runs data-parallel under ``torchrun`` (process 0 writes, plots and
prints); torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse

from curvlab.choices import DEVICE_CHOICES
from curvlab.commands.common import _check_plot, _check_writable, _write, dump_json
from curvlab.errors import OptionError
from curvlab.io.atomic import same_file


def _add_spectrum(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "spectrum",
        help="eigendecompose the factors: eigenvalues, eigenbases and the K-FAC eigenspectrum (Fig. 9)",
        description="Eigendecompose every factor of a checkpoint (torch.linalg.eigh, equal sizes batched, "
        "diagonal factors sorted), write eigenvalues and eigenvectors to a spectrum file, and summarise "
        "the whole-network K-FAC eigenspectrum, the products λ_S[i] λ_A[j] (seed E.1, Fig. 9).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", default="latest", metavar="S|all|latest", help="step(s) (default: latest)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="layers, repeatable (default: all)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.h5", help="default: CKPT's name.spectrum.h5")
    p.add_argument("--plot", default=None, metavar="P.png",
                   help="eigenvalue density plot (PNG/PDF/SVG; default: no plot)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
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
    from curvlab.io.ekfac import is_ekfac_file

    if is_ekfac_file(args.checkpoint):
        return _run_ekfac_spectrum(args, steps) if ctx.is_main else 0
    output = args.output or default_output_path(args.checkpoint)
    if same_file(output, args.checkpoint):
        raise OptionError(f"{output}: refusing to overwrite the input checkpoint; choose another -o")
    if args.plot and same_file(args.plot, output):
        raise OptionError(f"{args.plot}: --plot and -o name the same file")
    if ctx.is_main:
        _check_writable(output)
        _check_plot(args.plot, args.checkpoint)
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
        print(dump_json(summary))
    else:
        print(format_summary(summary))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def _run_ekfac_spectrum(args: argparse.Namespace, steps: int | str) -> int:
    """The summary (and plot) of an EKFAC file's spectrum (``curvlab gradcov --ekfac``): its eigenvalues are
    already there, so nothing is decomposed and no spectrum file is written. Each layer's ``Λ_ij`` enter
    the Kronecker statistics as the pair ``(Λ, [1])``."""
    import fnmatch

    import numpy as np

    from curvlab.analysis.spectrum import (
        LayerSpectrum,
        SpectrumResult,
        StepSpectrum,
        format_summary,
        spectrum_summary,
    )
    from curvlab.io.ekfac import read_ekfac

    if args.output:
        raise OptionError(
            f"{args.checkpoint}: an EKFAC file holds its eigenvalues already; -o writes nothing for it"
        )
    if args.plot and same_file(args.plot, args.checkpoint):
        raise OptionError(f"{args.plot}: refusing to overwrite the input; choose another --plot")
    if args.plot:
        _check_writable(args.plot)
    record = read_ekfac(args.checkpoint, "latest" if steps == "all" else steps)
    layers = [
        LayerSpectrum(name, layer.module_type, layer.weight_shape, layer.has_bias,
                      np.sort(layer.eigenvalues.ravel()), np.ones(1))
        for name, layer in record.layers.items()
        if not args.layers or any(fnmatch.fnmatchcase(name, p) for p in args.layers)
    ]
    if not layers:
        raise OptionError(f"{args.checkpoint}: no layer matches --layers {' '.join(args.layers or [])}")
    result = SpectrumResult(args.checkpoint, None, "cpu", "float64", False,
                            [StepSpectrum(record.step, record.fisher_type, record.num_examples, layers)])
    summary = spectrum_summary(result)
    summary["kind"] = "ekfac"
    if args.plot:
        from curvlab.plots.spectrum import plot_eigenvalue_density

        title = f"EKFAC eigenspectrum ({record.fisher_type} second moments, step {record.step})"
        _write(lambda: plot_eigenvalue_density(result, args.plot, title=title), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(dump_json(summary))
    else:
        print(format_summary(summary).replace("K-FAC eigenvalues", "EKFAC eigenvalues"))
    return 0
