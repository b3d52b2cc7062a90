"""``curvlab fit``: the rank law ``λ_(i) ≈ c·i^(-s)`` of the sorted K-FAC eigenspectrum (seed E.4, Fig. 12).

The whole-network spectrum (the products ``λ_S[i] λ_A[j]`` over all layers, from a factor checkpoint or
a spectrum file) is fitted to the rank law and compared with the NQM's ``1/i`` (``s = 1``):
maximum-likelihood exponent on normalised log-spacings over a window chosen by KS distance, model-based
and bootstrap intervals, OLS cross-check, curved alternatives (:mod:`curvlab.analysis.powerlaw`;
docs/powerlaw.md); ``--per-factor`` also fits each factor's own spectrum. Runs in one process; torch is
imported only when the command runs.
"""

from __future__ import annotations

import argparse

from curvlab.choices import DEVICE_CHOICES
from curvlab.commands.common import _check_plot, _write, dump_json
from curvlab.errors import OptionError


def _add_fit(commands: argparse._SubParsersAction) -> None:
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
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="layers, repeatable (default: all)")
    p.add_argument("--per-factor", action="store_true", help="also fit each factor's own spectrum (A, S)")
    p.add_argument(
        "--window", default=None, metavar="K_LO:K_HI", help="fix the rank window of the whole-network fit "
        "(either end may be left empty; default: both chosen by KS distance)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap (default: 0)")
    p.add_argument("--plot", default=None, metavar="P.png",
                   help="Fig. 12-style plot (PNG/PDF/SVG; default: no plot)")
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
    from curvlab.analysis.powerlaw import fit_network, parse_window
    from curvlab.analysis.spectrum import load_layer_eigenvalues
    from curvlab.device import resolve_device

    step = _fit_step(args.step)
    k_lo, k_hi = parse_window(args.window) if args.window else (None, None)
    if args.bootstrap < 0:
        raise OptionError(f"--bootstrap {args.bootstrap}: must be >= 0")
    if not 0.0 < args.confidence < 1.0:
        raise OptionError(f"--confidence {args.confidence}: must lie strictly between 0 and 1")
    resolve_device(args.device)
    _check_plot(args.plot, args.checkpoint)
    number, layers = load_layer_eigenvalues(
        args.checkpoint, step=step, layers=args.layers, device=args.device, progress=not args.quiet
    )
    result = fit_network(layers, source=args.checkpoint, step=number, k_lo=k_lo, k_hi=k_hi,
                         bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed,
                         per_factor=args.per_factor, progress=not args.quiet)
    summary = result.to_json()
    if args.plot:
        from curvlab.plots.powerlaw import plot_rank_law

        title = f"K-FAC eigenspectrum vs the NQM's 1/i (step {number}, {len(layers)} layers)"
        _write(lambda: plot_rank_law(result.fit, args.plot, title=title), args.plot)
        summary["plot"] = args.plot
    if args.json:
        print(dump_json(summary))
    else:
        print(_format_fit(summary))
    return 0


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
        f"  calibrated interval [{s['calibrated_low']:.4f}, {s['calibrated_high']:.4f}] (local exponent "
        f"{s['local_exponents'][0]:.3f} .. {s['local_exponents'][1]:.3f} across the window); "
        + ("a power law describes it" if s["power_law_supported"] else "NO single power law describes it"),
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
