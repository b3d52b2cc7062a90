"""``curvlab compare``: how close K-FAC and EKFAC come to the exact GGN at a checkpoint step (seed E.1).

The model is rebuilt from the checkpoint (its ``/model`` config and the step's weights) and run in
float64 on ``--examples`` training examples. K-FAC's factors are recomputed on those same examples
(``--factors recompute``, the default: then K-FAC differs from the GGN only by its Kronecker and
block-diagonal approximations) or taken from the checkpoint (``--factors checkpoint``: running averages
over other batches, another Fisher type). EKFAC's second moments are the GGN's own diagonal in the KFE.
The exact GGN's top eigenvalues come from Lanczos, its density from SLQ with a stated Wasserstein
accuracy, its trace from Hutchinson (:mod:`curvlab.analysis.compare`). torch is imported only when the
command runs.
"""

from __future__ import annotations

import argparse
import json

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES
from curvlab.commands.common import (
    _check_plot,
    _check_writable,
    _load_data,
    _positive_int,
    _refuse_input_as_output,
    _write,
    dump_json,
)
from curvlab.errors import OptionError


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _add_compare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "compare",
        help="how close K-FAC and EKFAC come to the exact GGN: spectra, top-k, per-layer errors",
        description="K-FAC, EKFAC and the exact GGN (Lanczos, stochastic Lanczos quadrature, Hutchinson) of "
        "a checkpoint step's model on the same examples: densities on one plot, KS and Wasserstein-1 "
        "distances between the spectra, relative errors and subspace overlap of the top-k eigenpairs, "
        "per-layer relative Frobenius errors. See docs/operators.md.",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--data", default=None, help=f"data source: {DATA_SOURCES} (default: the checkpoint's)")
    p.add_argument("--examples", type=_positive_int, default=256, help="training examples (default: 256)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="examples per batch (default: 128)")
    p.add_argument(
        "--factors",
        choices=("recompute", "checkpoint"),
        default="recompute",
        help="K-FAC factors recomputed on the same examples (default) or the checkpoint's",
    )
    p.add_argument(
        "--fisher",
        choices=("auto", "exact", "mc"),
        default="auto",
        help="Fisher of the recomputed factors and of EKFAC's second moments; auto = exact for up "
        "to 100 classes × label locations, else mc",
    )
    p.add_argument("--mc-samples", type=_positive_int, default=8,
                   help="labels per example for mc (default: 8)")
    p.add_argument("--top-k", type=_positive_int, default=10,
                   help="top eigenpairs compared (default: 10)")
    p.add_argument(
        "--accuracy",
        type=_fraction,
        default=0.1,
        help="SLQ's Wasserstein-1 accuracy t, in units of the GGN's λ_max (default: 0.1)",
    )
    p.add_argument(
        "--failure", type=_fraction, default=0.05, help="SLQ's failure probability η (default: 0.05)"
    )
    p.add_argument(
        "--probes",
        type=_positive_int,
        default=None,
        help="SLQ probes (default: the Chen-Trogdon-Ubaru number for t and η, at least 1)",
    )
    p.add_argument("--trace-probes", type=int, default=16,
                   help="Hutchinson probes for the GGN trace (default: 16)")
    p.add_argument("--floor", type=_fraction, default=1e-6,
                   help="numerical floor, relative to λ_max (default: 1e-6)")
    p.add_argument(
        "--max-block",
        type=_positive_int,
        default=4096,
        help="largest layer (weights) whose dense GGN block is built for the Frobenius error (default: 4096)",
    )
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="layers, repeatable (default: every layer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes and mc labels (default: 0)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
    p.add_argument("-o", "--output", default=None, metavar="OUT.json",
                   help="write the JSON summary here (default: not written)")
    p.add_argument("--plot", default=None, metavar="P.png", help="densities plot (default: no plot)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    import torch

    from curvlab.analysis.compare import compare_curvatures
    from curvlab.capture.factors import collect_factors
    from curvlab.device import resolve_device
    from curvlab.io.atomic import atomic_output
    from curvlab.io.checkpoint import load
    from curvlab.io.data import iterate_batches
    from curvlab.io.restore import check_data_fits, rebuild_model
    from curvlab.models import data_options

    if args.output:
        _refuse_input_as_output(args.checkpoint, args.output, "-o")
        _check_writable(args.output)
    _check_plot(args.plot, args.checkpoint)
    if args.trace_probes < 2:
        raise OptionError(f"--trace-probes {args.trace_probes}: Hutchinson needs at least 2")
    device = resolve_device(args.device)
    model, source = rebuild_model(args.checkpoint, args.step)
    recorded = (source.config or {}).get("data")
    data_spec = args.data or (recorded if isinstance(recorded, str) else "digits")
    options = data_options(source.model_name, (source.config or {}).get("args", {}))
    data = _load_data(data_spec, named=args.data is not None, recorded_in=args.checkpoint,
                      limit=args.examples, **options)
    check_data_fits(source, data_spec, data.input_shape, data.num_classes)
    model.to(device=device, dtype=torch.float64)
    batches = [
        ((x.to(torch.float64) if x.is_floating_point() else x).to(device), y.to(device))
        for x, y in iterate_batches(data, args.batch_size)
    ]
    route = args.fisher
    if route == "auto":
        route = "exact" if data.num_classes * max(1, data.y[0].numel()) <= 100 else "mc"
    if args.factors == "checkpoint":
        factors = (
            load(args.checkpoint, steps=source.step, layers=args.layers, weights=False)
            .steps[source.step]
            .factors
        )
    else:
        factors = collect_factors(
            model, batches, fisher=route, mc_samples=args.mc_samples, layers=args.layers, seed=args.seed
        )
    result = compare_curvatures(
        model,
        batches,
        factors,
        route=route,
        mc_samples=args.mc_samples,
        top_k=args.top_k,
        accuracy=args.accuracy,
        failure=args.failure,
        probes=args.probes,
        trace_probes=args.trace_probes,
        floor=args.floor,
        max_block=args.max_block,
        seed=args.seed,
        progress=not args.quiet,
    )
    summary = {
        "checkpoint": args.checkpoint,
        "step": source.step,
        "model": source.model_name,
        "data": data_spec,
        "factors": args.factors,
        "fisher": route,
        **result.summary,
    }
    if args.plot:
        from curvlab.plots.compare import plot_comparison

        title = (
            f"{source.model_name or 'model'}, step {source.step}: K-FAC and EKFAC vs the exact GGN "
            f"({summary['dimension']:,} weights, {summary['num_examples']} examples)"
        )
        _write(lambda: plot_comparison(result, args.plot, title=title), args.plot)
        summary["plot"] = args.plot
    if args.output:

        def write() -> None:
            with atomic_output(args.output) as tmp, open(tmp, "w") as f:
                json.dump(summary, f, indent=1)

        _write(write, args.output)
    if args.json:
        print(dump_json(summary))
    else:
        print(_format(summary))
    return 0


def _format(s: dict) -> str:
    g, k, e = s["ggn"], s["kfac"], s["ekfac"]
    bound = g["slq_w1_bound_over_range"]
    lines = [
        f"{s['checkpoint']}: step {s['step']}, {s['dimension']:,} weights in {s['num_layers']} layers, "
        f"{s['num_examples']} examples ({s['factors']} factors, {s['fisher']} Fisher)",
        f"  exact GGN: λ_max {g['lambda_max']:.4g}, trace {g['trace_hutchinson']:.4g} "
        f"± {g['trace_hutchinson_se']:.2g} "
        f"(Hutchinson); SLQ {g['slq_steps']} steps × {g['slq_probes']} probes"
        + (
            f", W1 ≤ {bound:g} λ_max with probability {1 - g['slq_failure_probability']:.2f}" if bound else ""
        ),
    ]
    for label, d in (("K-FAC", k), ("EKFAC", e)):
        vs, top = d["vs_ggn"], d["top_k"]
        lines.append(
            f"  {label:<6} trace {d['trace']:.4g}, λ_max {d['lambda_max']:.4g}; vs GGN: KS {vs['ks']:.3f}, "
            f"W1 {vs['w1_over_lambda_max']:.3g} λ_max, {vs['w1_log10']:.2f} decades (log10); "
            f"top-{len(top['values'])} median rel. error {top['median_relative_error']:.3f}, "
            f"subspace overlap {top['subspace_overlap']:.3f}"
        )
    for row in s["layers"]:
        err = row["kfac_relative_frobenius_error"]
        text = (
            f"K-FAC {err:.3f}, EKFAC {row['ekfac_relative_frobenius_error']:.3f}"
            if err is not None
            else f"not computed: {row['reason']}"
        )
        lines.append(f"  {row['name']:<28} {row['size']:>8} weights  rel. Frobenius error {text}")
    if "plot" in s:
        lines.append(f"wrote {s['plot']}")
    return "\n".join(lines)
