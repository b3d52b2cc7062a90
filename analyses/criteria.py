"""The appendix's claims and the criteria that judge them, one registry entry per figure (seed E.1–E.7).

Each criterion was written from the claim's own words before any number of these runs was looked at,
and is printed on the page with its verdict. Thresholds that the claim's words leave open ("few",
"closely", "mostly") are stated with the reason for their value.
"""

from __future__ import annotations

import math

import numpy as np

from analyses.registry import Verdict, figure, fmt

# ------------------------------------------------------------------------------------------ Fig. 9

FEW = 0.05  # "only a few": at most 5% of the eigenvalues in a tail
MOSTLY_UNCHANGED = math.log10(2.0)  # "mostly unchanged": every tracked quantile within a factor of 2
STABLE_FROM = 200
TRACKED = ("0.01", "0.1", "0.5", "0.9", "0.99")


def _log_change(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(math.log10(b / a)) if a > 0 and b > 0 else math.inf


@figure(
    "fig09", "Fig. 9 — K-FAC eigenspectra of ResNet8 at several training iterations",
    claim="“There are only a few large eigenvalues and a few small eigenvalues in the approximate Fisher "
    "matrices; the bulk of eigenvalues are in the middle of the spectrum. We also note that after 200 "
    "iterations of training the eigenspectrum remains mostly unchanged.” (E.1)",
    criterion="Both halves. (1) Few large and few small, bulk in the middle: at the last saved step, the "
    "bulk is the interquartile range of log10 λ and the tails are the eigenvalues beyond Tukey's fences "
    "(1.5 interquartile ranges beyond a quartile; exact zeros count as small); each tail must hold some "
    "eigenvalues and at most 5%. (2) Mostly unchanged after 200 iterations: the 1, 10, 50, 90 and 99% "
    "quantiles at every saved step after 200 lie within a factor of 2 of step 200's.",
)
def fig09(data: dict) -> Verdict:
    tails = {row["step"]: row for row in data.get("tails", [])}
    if not tails:
        return Verdict(None, "the spectrum summary holds no tail statistics")
    last = tails[max(tails)]
    large, small = last.get("frac_large"), last.get("frac_small")
    shape = large is not None and 0 < large <= FEW and 0 < small <= FEW
    later = [s for s in tails if s > STABLE_FROM]
    numbers = {"saved steps": sorted(tails), "eigenvalues": last["count"],
               f"large tail at step {max(tails)} (fraction)": large,
               f"small tail at step {max(tails)} (fraction)": small,
               "bulk width (decades, IQR)": last.get("iqr_decades")}
    if STABLE_FROM not in tails or not later:
        return Verdict(None, f"the run has no saved step at {STABLE_FROM} and after it", numbers)
    base = tails[STABLE_FROM]["quantiles"]
    changes = {q: max(_log_change(base[q], tails[s]["quantiles"][q]) for s in later) for q in TRACKED}
    worst = max(changes, key=changes.get)
    first = tails[min(tails)]["quantiles"]
    early = {q: _log_change(first[q], base[q]) for q in TRACKED if first[q] > 0 and base[q] > 0}
    stable = changes[worst] <= MOSTLY_UNCHANGED
    numbers.update({
        f"largest quantile change after step {STABLE_FROM} (factor)": 10 ** changes[worst],
        "…at quantile": float(worst),
        f"largest change of a positive quantile from step {min(tails)} to {STABLE_FROM} (factor)":
            10 ** max(early.values()) if early else None,
    })
    why = []
    why.append("the tails are few (" + f"{fmt(100 * large)}% large, {fmt(100 * small)}% small)" if shape else
               f"the tails are not 'a few' ({fmt(100 * (large or 0))}% large, "
               f"{fmt(100 * (small or 0))}% small, "
               f"limit {FEW:.0%} and more than none)")
    why.append(f"after step {STABLE_FROM} the quantiles move by at most a factor {fmt(10 ** changes[worst])}"
               + (" (≤ 2)" if stable else f" (> 2, at the {float(worst):.0%} quantile)"))
    return Verdict(bool(shape and stable), "; ".join(why) + ".", numbers)


# ------------------------------------------------------------------------------------------ Fig. 10

SLOPE_BAND = (0.9, 1.1)  # "closely match": the ratio drifts by at most 0.1 decade per decade of curvature
SPEARMAN_MIN = 0.9


def _fig10(data: dict, check: dict | None = None) -> Verdict:
    slope, low, high = data.get("slope"), data.get("slope_low"), data.get("slope_high")
    rho = data.get("spearman")
    numbers = {
        "step (chosen from the losses)": data.get("step"),
        "directions compared": data.get("num_compared"),
        "left out: numerical null space": data.get("num_excluded_null"),
        "left out: Monte-Carlo noise (SE > 0.5× value)": data.get("num_noisy"),
        "Spearman": rho, "log-log slope": slope, "slope 95% interval": [low, high],
        "offset: median variance/curvature": None if data.get("offset_log10") is None
        else 10 ** data["offset_log10"],
        "curvature route": data.get("curvature_route"),
    }
    if data.get("step_choice"):
        numbers["why this step"] = data["step_choice"]["why"]
    if check:
        for row in check.get("fvp_check", []):
            numbers[f"jvp check of {row['name']} ({row['directions']} directions, {row['flattest_decile']} "
                    "in the flattest decile): within 3 SE"] = row["within_3se"]
    for layer in data.get("layers", []):
        if layer.get("spearman") is not None:
            numbers[f"{layer['name']}: Spearman, slope, noisy"] = [layer["spearman"], layer.get("slope"),
                                                                   layer.get("num_noisy")]
    if slope is None or rho is None:
        return Verdict(None, "too few directions to compare", numbers)
    held = rho >= SPEARMAN_MIN and SLOPE_BAND[0] <= low and high <= SLOPE_BAND[1]
    sloped = [layer for layer in data.get("layers", []) if layer.get("slope") is not None]
    farthest = max(sloped, key=lambda layer: abs(layer["slope"] - 1.0), default=None)
    parts = [f"Spearman {fmt(rho)} ({'≥' if rho >= SPEARMAN_MIN else '<'} {SPEARMAN_MIN})",
             f"slope {slope:.4g} [{low:.4g}, {high:.4g}] "
             + ("inside" if SLOPE_BAND[0] <= low and high <= SLOPE_BAND[1] else "not inside")
             + f" [{SLOPE_BAND[0]}, {SLOPE_BAND[1]}]",
             f"the variance is {fmt(10 ** data['offset_log10'])}× the curvature at the median "
             "(reported, not judged)"]
    if farthest is not None and not held:
        parts.append(f"the layer farthest from slope 1 is {farthest['name']} (slope "
                     f"{fmt(farthest['slope'])}, Spearman {fmt(farthest['spearman'])}, "
                     f"{fmt(farthest['num_compared'])} directions)")
    return Verdict(bool(held), "; ".join(parts) + ".", numbers)


_FIG10_CRITERION = (
    "At the step chosen from the run's own losses (after initialisation: training loss below half the "
    "initial; before memorisation: held-out loss at most twice the training loss; the latest such step), "
    "over the directions whose values are resolved and whose curvature is not Monte-Carlo noise: "
    "Spearman ≥ 0.9 and the 95% interval of the least-squares slope of log variance on log curvature "
    "inside [0.9, 1.1] (variance proportional to curvature: the ratio drifts by at most 0.1 decade per "
    "decade). The constant factor between them (the offset) is reported, not judged: in the NQM it only "
    "rescales the batch size."
)


@figure("fig10a", "Fig. 10a — gradient variance vs curvature, ResNet8",
        claim="“The gradient variances closely match the curvature (especially for the ResNet8 model on "
        "CIFAR10), validating our assumption that H ≈ C.” (E.2)", criterion=_FIG10_CRITERION)
def fig10a(data: dict) -> Verdict:
    return _fig10(data)


@figure("fig10b", "Fig. 10b — gradient variance vs curvature, shallow Transformer (tied embedding included)",
        claim="“The gradient variances closely match the curvature … validating our assumption that "
        "H ≈ C.” (E.2)", criterion=_FIG10_CRITERION)
def fig10b(data: dict) -> Verdict:
    from analyses.config import FIGURES

    path = FIGURES / "fig10b_check.json"
    import json

    check = json.loads(path.read_text()) if path.exists() else None
    return _fig10(data, check)


# ------------------------------------------------------------------------------------------ Fig. 11

CLOSE = 0.05  # "closely match": the normalised terms differ by at most 5% of the initial value


@figure("fig11", "Fig. 11 — momentum vs SGD at the effective learning rate (NQM)",
        claim="“The convergence dynamics of the two update rules closely match each other.” (E.3)",
        criterion="The normalised first terms of eq. 6 (both start at 1) of momentum SGD and of plain SGD "
        "at the effective rate α/(1−β) differ by at most 0.05 at every plotted 1−β and every plotted t.")
def fig11(data: dict) -> Verdict:
    mom = np.array([[np.nan if v is None else v for v in row] for row in data["momentum"]], dtype=float)
    sgd = np.array([[np.nan if v is None else v for v in row] for row in data["sgd_effective_lr"]],
                   dtype=float)
    diff = np.abs(mom - sgd)
    k, j = np.unravel_index(np.nanargmax(diff), diff.shape)
    worst = float(diff[k, j])
    x = data["one_minus_beta"]
    per_t = {f"largest difference at t = {t}": float(np.nanmax(diff[i])) for i, t in enumerate(data["steps"])}
    far = np.flatnonzero(~(np.nanmax(diff, axis=0) <= CLOSE))
    start = 0 if far.size == 0 else int(far[-1]) + 1
    numbers = {"αh": data["alpha_h"], "largest difference": worst, "…at 1−β": x[j], "…at t": data["steps"][k],
               **per_t, "every t within 0.05 for 1−β from": x[start] if start < len(x) else None}
    held = worst <= CLOSE
    return Verdict(held, f"the curves differ by at most {fmt(worst)} (at 1−β = {fmt(x[j])}, t = "
                   f"{data['steps'][k]}), {'within' if held else 'beyond'} the {CLOSE} allowed.", numbers)


# ------------------------------------------------------------------------------------------ Fig. 12


@figure("fig12", "Fig. 12 — K-FAC eigenspectrum vs the 1/i law", images=("fig12.png", "fig12_nqm.png"),
        claim="“The distribution of eigenvalues we chose for H in the NQM very closely matches the "
        "eigenspectra of the real neural network, validating the assumption that the diagonal entries of H "
        "are {1/i}.” (E.4)",
        criterion="A power law must describe the spectrum (its local exponent changes by at most 20% across "
        "the fitted window, which spans at least a decade of rank), and the exponent 1 must lie inside the "
        "fit's calibrated interval (sampling noise and the local exponent's spread, coverage measured by "
        "simulation: docs/powerlaw.md). The second panel shows what the measured spectrum does to the NQM.")
def fig12(data: dict) -> Verdict:
    s, lo, hi = data.get("exponent"), data.get("calibrated_low"), data.get("calibrated_high")
    numbers = {"step": data.get("step"), "exponent ŝ": s, "χ² 95% interval": [data.get("ci_low"),
               data.get("ci_high")], "calibrated interval": [lo, hi],
               "local exponent at the window's ends": data.get("local_exponents"),
               "window (ranks)": data.get("window"), "window / spectrum (decades)":
               [data.get("window_decades"), data.get("spectrum_decades")],
               "preferred model (AIC)": data.get("preferred_model")}
    nqm = data.get("nqm")
    if nqm:
        for label in ("measured", "1/i"):
            steps = [v for v in nqm[label] if v is not None]
            if steps:
                numbers[f"NQM steps to 1% risk, {label}: smallest → largest batch"] = [steps[0], steps[-1]]
    if s is None or lo is None:
        return Verdict(None, "no fit", numbers)
    if not data.get("power_law_supported", True):
        return Verdict(False, f"the spectrum is not one power law: its local exponent runs from "
                       f"{fmt(data['local_exponents'][0])} to {fmt(data['local_exponents'][1])} across the "
                       "window (more than 20% of the exponent).", numbers)
    held = lo <= 1.0 <= hi
    return Verdict(held, f"exponent {fmt(s)}, calibrated interval [{fmt(lo)}, {fmt(hi)}] "
                   + ("contains 1." if held else "excludes 1."), numbers)


# ------------------------------------------------------------------------------------------ Fig. 13


def _critical_batch(batch_sizes: list[int], steps: list) -> int | None:
    """First batch size whose steps exceed twice perfect linear scaling from the smallest batch."""
    b0, s0 = batch_sizes[0], steps[0]
    for b, s in zip(batch_sizes, steps, strict=True):
        if s is not None and s >= 2 * s0 * b0 / b:
            return b
    return None


@figure("fig13", "Fig. 13 — steps to target vs batch size (NQM)",
        claim="“Increasing the batch size initially decreases the required number of training steps "
        "proportionally, but eventually there are diminishing returns … the critical batch size seems to "
        "increase for more difficult thresholds.” (E.5)",
        criterion="The first doubling of the batch size cuts the steps by 1.8–2.2× (proportional) for every "
        "threshold; the critical batch size (steps ≥ 2× perfect scaling) exists for every threshold and does "
        "not decrease as the threshold gets harder.")
def fig13(data: dict) -> Verdict:
    sizes = data["batch_sizes"]
    critical = {f"critical batch size, loss {t:g}": _critical_batch(sizes, s)
                for t, s in zip(data["thresholds"], data["steps"], strict=True)}
    first = [s[0] / s[1] for s in data["steps"]]
    values = [c for c in critical.values() if c is not None]
    proportional = all(1.8 <= r <= 2.2 for r in first)
    ordered = values == sorted(values) and len(values) == len(critical)
    numbers = {**critical, "steps ratio at the first doubling": first}
    return Verdict(proportional and ordered,
                   ("the first doubling cuts the steps " + ("proportionally" if proportional else
                    "by other than 1.8–2.2×")) + "; the critical batch size " + ("grows with the threshold's "
                   "difficulty." if ordered else "does not grow with the difficulty (or does not exist)."),
                   numbers)


# ------------------------------------------------------------------------------------------ Fig. 14

LINEAR_BAND = (0.7, 1.3)
LEVEL_SLOPE = 0.5  # levelled off: the local log-log slope stays below half of linear growth


def _level_off(sizes: list[int], rates: list) -> int | None:
    """The batch size from which the local log-log slope of the optimal rate stays below 1/2 (None: never)."""
    b = np.log(np.array(sizes, dtype=float))
    r = np.log(np.array([np.nan if v is None else v for v in rates], dtype=float))
    local = np.diff(r) / np.diff(b)
    for k in range(len(local)):
        if np.all(local[k:] < LEVEL_SLOPE):
            return sizes[k]
    return None


def _slope(xs: list, ys: list) -> float:
    lx, ly = np.log(np.array(xs, dtype=float)), np.log(np.array(ys, dtype=float))
    lx = lx - lx.mean()
    return float(lx @ (ly - ly.mean()) / (lx @ lx))


def _fig14(data: dict, what: str) -> Verdict:
    sizes, powers = data["batch_sizes"], data["powers"]
    slopes = [_slope(sizes[:4], lr[:4]) for lr in data["optimal_lr"]]
    levels = [_level_off(sizes, lr) for lr in data["optimal_lr"]]
    numbers = {f"p = {p:g}: slope at the 4 smallest batches": s for p, s in zip(powers, slopes, strict=True)}
    numbers.update({f"p = {p:g}: level-off batch size": (lv if lv is not None else f"> {sizes[-1]:,}")
                    for p, lv in zip(powers, levels, strict=True)})
    linear = all(LINEAR_BAND[0] <= s <= LINEAR_BAND[1] for s in slopes)
    censored = [lv is None for lv in levels]
    if sum(censored) > 1:
        return Verdict(None, f"{sum(censored)} powers have not levelled off by batch size {sizes[-1]:,}: the "
                       "range cannot order their level-off batch sizes.", numbers)
    if censored[:-1].count(True):
        grows = False
    else:
        known = [lv for lv in levels if lv is not None]
        grows = all(a < b for a, b in zip(known, known[1:], strict=False))
    why = ("linear growth at small batches" if linear else "no linear growth at small batches (slopes "
           "outside "
           f"{LINEAR_BAND})") + "; the level-off batch size " + ("grows" if grows else "does not grow") + \
        f" with the power ({', '.join(fmt(lv) if lv else '>' + fmt(sizes[-1]) for lv in levels)}) {what}."
    return Verdict(linear and grows, why, numbers)


_FIG14_CRITERION = ("Both halves. Linear growth: the log-log slope of the optimal {what} over the 4 smallest "
                    "batch sizes lies in 0.7–1.3 for every power. Level-off: the level-off batch size (from "
                    "which the local log-log slope stays below 1/2) grows strictly with the preconditioning "
                    "power; a power still rising at the largest batch size counts as levelling off beyond it "
                    "(if two are, the range cannot order them: not judged).")


@figure("fig14a", "Fig. 14a — optimal learning rate vs batch size, no momentum (NQM)",
        claim="“The learning rate increases with batch size until it is limited by the maximum stable "
        "learning "
        "rate. Larger preconditioning powers reduce the optimal learning rate for the same batch size, thus "
        "extending the batch size where the learning rate levels off.” (E.6)",
        criterion=_FIG14_CRITERION.format(what="learning rate"))
def fig14a(data: dict) -> Verdict:
    return _fig14(data, "without momentum")


@figure("fig14b", "Fig. 14b — optimal effective learning rate, momentum 0.9 (NQM)",
        claim="As (a), with fixed momentum 0.9, plotting the effective learning rate α/(1−β). (E.6)",
        criterion=_FIG14_CRITERION.format(what="effective learning rate"))
def fig14b(data: dict) -> Verdict:
    return _fig14(data, "with momentum 0.9")


@figure("fig14c", "Fig. 14c — optimal effective learning rate, tuned momentum (NQM)",
        claim="As (a), with tuned momentum, plotting the effective learning rate α/(1−β). (E.6)",
        criterion=_FIG14_CRITERION.format(what="effective learning rate"))
def fig14c(data: dict) -> Verdict:
    return _fig14(data, "with tuned momentum")


# ------------------------------------------------------------------------------------------ Fig. 15


@figure("fig15", "Fig. 15 — final rate of the piecewise-constant schedule (NQM)",
        claim="“The final learning rate … also scales linearly with batch size.” (E.7)",
        criterion="Log-log slope of the final rate against the batch size within 0.7–1.3 over the batch "
        "sizes "
        "whose final rate is below half the largest (above, stability caps it, as for a constant rate).")
def fig15(data: dict) -> Verdict:
    sizes, finals = data.get("batch_sizes"), data.get("final_lr")
    valid = [f for f in finals if f is not None]
    cap = None
    if valid:
        cap = next((k for k, f in enumerate(finals) if f is not None and f >= 0.5 * max(valid)), None)
    slope = _slope(sizes[:cap], finals[:cap]) if cap and cap >= 2 else None
    numbers = {"slope in the scaling regime": slope, "scaling regime (batch sizes)":
               [sizes[0], sizes[cap - 1]] if cap else None}
    if slope is None:
        return Verdict(None, "fewer than two batch sizes below the stability cap", numbers)
    held = LINEAR_BAND[0] <= slope <= LINEAR_BAND[1]
    return Verdict(held, f"slope {fmt(slope)} over batch sizes {fmt(sizes[0])}–{fmt(sizes[cap - 1])}, "
                   + ("within" if held else "outside") + " 0.7–1.3.", numbers)
