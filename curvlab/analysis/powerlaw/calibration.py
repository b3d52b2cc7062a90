"""Coverage of the rank-law fit's intervals, measured by simulation on spectra of known shape.

An eigenspectrum is one deterministic matrix's sorted eigenvalues, not an i.i.d. sample, so the χ²
interval of :mod:`.estimator` (exact for a random Pareto-tailed sample) need not mean what it says. This
module generates spectra whose exponent is known, fits them with :func:`~.fit.fit_rank_law`, and counts
how often each interval covers the truth and how often the fit says the data support a power law:

* ``pure``: exactly ``i^(−s)`` (deterministic, smooth);
* ``noisy``: ``i^(−s) · exp(σ ε_i)``, ``ε`` standard normal, ``σ = 0.3``, sorted (multiplicative noise);
* ``sample``: the order statistics of an i.i.d. Pareto sample with tail ``1/s`` (the estimator's own model);
* ``bulk_tail``: a Marchenko–Pastur bulk (ratio 1/4, its quantiles) of ``n − n/10`` values below a tail
  of ``n/10`` values ``∝ i^(−s)`` on top (the truth is the tail's ``s``);
* ``kronecker``: all products of two ``i^(−s)`` spectra of ``√n`` values each (the law is ``(ln k)^s k^(−s)``,
  not a power law: ``s`` is reported as the factors' exponent, the fit should say "no power law");
* ``exponential`` ``e^(−i/τ)`` and ``marchenko_pastur`` (a bulk alone): no law at all.

``python -m curvlab.analysis.powerlaw.calibration`` prints the table that docs/powerlaw.md quotes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

import numpy as np

FAMILIES = ("pure", "noisy", "sample", "bulk_tail", "kronecker", "exponential", "marchenko_pastur")
#: Families whose values follow a power law with a known exponent (coverage is meaningful).
WITH_LAW = ("pure", "noisy", "sample", "bulk_tail")


def _marchenko_pastur(n: int, ratio: float) -> np.ndarray:
    """``n`` quantiles of the Marchenko–Pastur law of ratio ``n/m`` (variance 1): the typical eigenvalues
    of ``X^T X / m`` for a large ``m × n`` Gaussian ``X``, deterministic (the CDF inverted on a grid)."""
    lo, hi = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    x = np.linspace(lo, hi, 20001)
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * ratio * x)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    return np.interp((np.arange(n) + 0.5) / n, cdf / cdf[-1], x)


def synthetic_spectrum(family: str, n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` eigenvalues (about ``n`` for ``kronecker``) of ``family`` with exponent ``s`` (descending)."""
    i = np.arange(1, n + 1, dtype=np.float64)
    if family == "pure":
        values = i ** -s
    elif family == "noisy":
        values = i ** -s * np.exp(0.3 * rng.standard_normal(n))
    elif family == "sample":
        values = rng.pareto(1.0 / s, n) + 1.0
    elif family == "bulk_tail":
        tail = n // 10
        bulk = _marchenko_pastur(n - tail, 0.25)
        values = np.concatenate([bulk.max() * 2.0 * (np.arange(1, tail + 1) / tail) ** -s, bulk])
    elif family == "kronecker":
        side = int(math.isqrt(n))
        law = np.arange(1, side + 1, dtype=np.float64) ** -s
        values = np.outer(law, law).ravel()
    elif family == "exponential":
        values = np.exp(-i / (n / 20))
    elif family == "marchenko_pastur":
        values = _marchenko_pastur(n, 0.25)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return np.sort(values)[::-1]


def coverage(family: str, s: float, *, n: int = 1000, reps: int = 100, seed: int = 0) -> dict:
    """Fit ``reps`` spectra of ``family``: how often the χ² and the calibrated interval cover ``s``, how
    often the fit finds a power law, and the exponents' median."""
    from curvlab.analysis.powerlaw.fit import fit_rank_law

    rng = np.random.default_rng([seed, int(s * 1000), FAMILIES.index(family)])
    chi2 = calibrated = supported = 0
    exponents = []
    deterministic = family not in ("noisy", "sample")
    count = 1 if deterministic else reps  # a deterministic spectrum is the same every time
    for _ in range(count):
        fit = fit_rank_law(synthetic_spectrum(family, n, s, rng), bootstrap=0)
        chi2 += fit.ci_low <= s <= fit.ci_high
        calibrated += fit.calibrated_low <= s <= fit.calibrated_high
        supported += fit.power_law_supported
        exponents.append(fit.exponent)
    return {
        "family": family, "s": s, "n": n, "reps": count,
        "chi2_coverage": chi2 / count, "calibrated_coverage": calibrated / count,
        "power_law_found": supported / count, "median_exponent": float(np.median(exponents)),
    }


def table(exponents: Sequence[float] = (0.5, 1.0, 1.5), *, n: int = 1000, reps: int = 100) -> list[dict]:
    """:func:`coverage` of every family at every exponent (the no-law families at ``s = 1`` only)."""
    rows = []
    for family in FAMILIES:
        for s in (exponents if family in WITH_LAW or family == "kronecker" else (1.0,)):
            rows.append(coverage(family, s, n=n, reps=reps))
    return rows


if __name__ == "__main__":
    for row in table(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 100):
        print(json.dumps(row), flush=True)
