"""The figures page's pieces without running the pipeline: the registry, number formatting, the criteria
on synthetic inputs with known answers, the Fig. 9 tail statistics against materialised products, and the
layer colours of Fig. 10."""

from __future__ import annotations

import math

import numpy as np

from analyses import criteria
from analyses.fig09 import tails
from analyses.registry import REGISTRY, Verdict, figure, fmt
from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum


def test_fmt_is_for_readers():
    assert fmt(1234567) == "1,234,567" and fmt(0.012345) == "0.0123" and fmt(3.0) == "3"
    assert fmt(1.5e-7) == "1.5e-7" and fmt(2.5e6 + 0.25) == "2.5e6" and fmt(2.5e6) == "2,500,000"
    assert fmt(None) == "—" and fmt(True) == "yes"
    assert fmt([1, 0.5]) == "1, 0.5"


def test_an_entry_registers_in_a_few_lines():
    @figure("fig99", "Fig. 99 — a test", claim="x is small", criterion="x < 1")
    def fig99(data):
        return Verdict(data["x"] < 1, "x is below 1" if data["x"] < 1 else "x is 1 or more", {"x": data["x"]})

    try:
        entry = REGISTRY["fig99"]
        assert entry.images == ("fig99.png",) and entry.judge({"x": 0.5}).held is True
        assert entry.judge({"x": 2}).held is False
    finally:
        del REGISTRY["fig99"]


def test_level_off_of_a_broken_stick():
    """``lr = min(B, B*)``: linear up to B*, flat after; the level-off batch size is B* (local slope 0 from
    there), and a curve still rising at the end has none."""
    sizes = [2**k for k in range(2, 21)]
    for knee in (64, 4096):
        assert criteria._level_off(sizes, [min(b, knee) for b in sizes]) == knee
    assert criteria._level_off(sizes, [float(b) for b in sizes]) is None
    data = {"batch_sizes": sizes, "powers": [0.0, 0.5],
            "optimal_lr": [[min(b, 256) / 1e4 for b in sizes], [min(b, 8192) / 1e5 for b in sizes]]}
    assert criteria._fig14(data, "").held is True
    data["optimal_lr"] = data["optimal_lr"][::-1]  # the larger power levels off first: the claim fails
    assert criteria._fig14(data, "").held is False
    data["optimal_lr"] = [[b / 1e4 for b in sizes], [b / 1e5 for b in sizes]]  # neither levels off
    assert criteria._fig14(data, "").held is None


def test_fig09_tails_equal_the_materialised_products():
    rng = np.random.default_rng(0)
    pairs = [(np.sort(rng.lognormal(0, 2, 30)), np.sort(rng.lognormal(0, 1, 20))),
             (np.concatenate([[0.0], np.sort(rng.lognormal(-3, 1, 9))]), np.sort(rng.lognormal(0, 1, 7)))]
    products = np.concatenate([np.outer(s, a).ravel() for s, a in pairs])
    out = tails(KroneckerSpectrum(pairs))
    q1, q3 = out["quantiles"]["0.25"], out["quantiles"]["0.75"]
    iqr = math.log10(q3) - math.log10(q1)
    assert out["frac_large"] == np.mean(products > q3 * 10 ** (1.5 * iqr))
    assert out["frac_small"] == np.mean(products < q1 / 10 ** (1.5 * iqr))  # zeros included
    assert out["zeros"] == np.count_nonzero(products == 0)


def test_fig09_criterion_on_a_stable_and_a_drifting_spectrum():
    base = {"0.01": 1e-6, "0.1": 1e-5, "0.5": 1e-4, "0.9": 1e-3, "0.99": 1e-2}
    rows = [{"step": s, "count": 100, "quantiles": dict(base), "frac_large": 0.01, "frac_small": 0.02,
             "iqr_decades": 1.0} for s in (0, 200, 400)]
    assert criteria.fig09({"tails": rows}).held is True
    rows[2]["quantiles"]["0.5"] = 3e-4  # the median moved by a factor 3 after step 200
    verdict = criteria.fig09({"tails": rows})
    assert verdict.held is False and "50% quantile" in verdict.why
    rows[2]["quantiles"]["0.5"] = 1e-4
    rows[2]["frac_large"] = 0.0  # no large tail at all: not "a few"
    assert criteria.fig09({"tails": rows}).held is False


def test_fig10_criterion_tests_slope_and_rank_and_reports_the_offset():
    data = {"spearman": 0.95, "slope": 1.0, "slope_low": 0.97, "slope_high": 1.03, "offset_log10": 0.5,
            "num_compared": 1000, "layers": []}
    assert criteria._fig10(data).held is True  # a constant factor of 3.2 does not fail it
    assert criteria._fig10({**data, "slope": 1.9, "slope_low": 1.88, "slope_high": 1.92}).held is False
    assert criteria._fig10({**data, "spearman": 0.8}).held is False
    assert criteria._fig10({**data, "slope": None, "spearman": None}).held is None


def test_layer_colours_are_distinct():
    from curvlab.plots.gradcov import layer_colours

    for count in (3, 10, 13, 20, 31):
        colours = layer_colours(count)
        assert len(colours) == count and len({tuple(np.round(c, 6)) for c in colours}) == count


def test_predict_cells_verdict_counts_pairs():
    """The predict_cells criteria on hand-made comparisons: 2 of 3 identified pairs within a factor 2 and
    closest, shapes fine, γ = 1 inside both intervals -> held; one γ interval excluding 1 -> not held."""
    from analyses.predict_cells import judge

    def entry(nqm, simple, paper, shape, points=4):
        steps = {"points": points, "shape_rms_log2": shape}
        return {"predictors": {"nqm": {"log2_error": nqm, "steps": steps}, "b_simple": {"log2_error": simple},
                               "nqm_1_over_i": {"log2_error": paper, "steps": steps}}}

    a = {"sgd": entry(0.5, 1.0, 2.0, 0.2), "momentum": entry(None, None, None, 0.9, points=2)}
    b = {"sgd": entry(0.9, 1.5, 1.2, 0.3), "momentum": entry(1.5, 0.5, 0.2, 0.6)}
    data = {
        "cells": {"a": {"optimizers": a}, "b": {"optimizers": b}},
        "gamma": {"a": {"gamma": 1.0, "interval": [0.9, 1.1]}, "b": {"gamma": 1.0, "interval": [0.99, 1.05]}},
    }
    verdict = judge(data)
    assert verdict.held is True and verdict.numbers["pairs within a factor 2"] == "2/3"
    data["gamma"]["b"]["interval"] = [1.01, 1.05]
    assert judge(data).held is False
    assert judge({"cells": {}, "gamma": {}}).held is None
