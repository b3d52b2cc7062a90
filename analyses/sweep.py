"""The paper's batch-size claims on real networks: ``curvlab sweep`` of a model on the embedded digits.

``python -m analyses.sweep NAME`` runs (or resumes: finished trials are kept in the study database
``figures/data/sweeps/NAME/study.db``) the sweep of :data:`analyses.config.SETTINGS` ``["sweeps"][NAME]``
and writes ``figures/sweep_NAME.png`` and ``figures/sweep_NAME.json`` (the sweep's results).
:func:`judge` turns the results into the page's verdicts; its criteria were written from the claims'
words before any sweep was run:

1. *perfect scaling at small batch sizes*: for every optimizer, the log-log slope of steps against
   batch size between the two smallest batch sizes is within 0.3 of −1;
2. *diminishing returns beyond B_crit*: for every optimizer, the slope between the two largest batch
   sizes is at least 0.3 shallower than between the two smallest;
3. *preconditioning extends perfect scaling*: the fitted ``B_crit`` of K-FAC and of Adam both exceed
   SGD's (point estimates; the 90 % intervals are shown beside them);
4. *momentum helps only at large batch sizes*: momentum's steps are within ±30 % of SGD's at the
   smallest batch size and at most 0.8× SGD's at the largest.
"""

from __future__ import annotations

import math
import shutil
import sys
from typing import Any

from analyses.config import DATA_DIR, DEVICE, FIGURES, SETTINGS, run_curvlab
from analyses.registry import Verdict, figure


def sweep_dir(name: str):
    return DATA_DIR / "sweeps" / name


def main(name: str) -> None:
    s = SETTINGS["sweeps"][name]
    out = sweep_dir(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["sweep", "--model", s["model"], "--data", s["data"], "--optimizers", s["optimizers"],
            "--batch-sizes", s["batch_sizes"], "--target", s["target"], "--trials", str(s["trials"]),
            "--max-steps", str(s["max_steps"]), "--seeds", str(s["seeds"]), "--workers", str(s["workers"]),
            "--threads", "1", "--device", DEVICE, "-o", str(out), "--quiet",
            "--plot", str(FIGURES / f"sweep_{name}.png")]
    for item in s.get("model_args", []):
        argv += ["--model-arg", item]
    for item in s.get("space", []):
        argv += ["--space", item]
    if (out / "study.db").exists():
        argv.append("--resume")
    run_curvlab(*argv)
    shutil.copyfile(out / "results.json", FIGURES / f"sweep_{name}.json")


def _steps(results: dict[str, Any], opt: str) -> tuple[list[int], list[float | None]]:
    cells = results["optimizers"].get(opt, {}).get("cells", [])
    return [c["batch_size"] for c in cells], [c["steps"] for c in cells]


def _slope(b: list[int], s: list[float | None], i: int, j: int) -> float | None:
    if s[i] is None or s[j] is None:
        return None
    return (math.log(s[j]) - math.log(s[i])) / (math.log(b[j]) - math.log(b[i]))


def judge(results: dict[str, Any]) -> dict[str, Any]:
    """The four claims' verdicts (module doc): ``held`` True, False or None (not measurable)."""
    opts = list(results["optimizers"])
    small, large, crit = {}, {}, {}
    for opt in opts:
        b, s = _steps(results, opt)
        small[opt] = _slope(b, s, 0, 1) if len(b) >= 2 else None
        large[opt] = _slope(b, s, -2, -1) if len(b) >= 2 else None
        fit = results["optimizers"][opt]["fit"]
        crit[opt] = {"b_crit": fit.get("b_crit"), "interval": fit.get("b_crit_interval"),
                     "identified": fit.get("identified")}
    claims: dict[str, Any] = {}

    def all_or_none(values, test):
        values = list(values)
        return None if any(v is None for v in values) or not values else all(test(v) for v in values)

    claims["perfect_scaling_small_batches"] = {
        "criterion": "slope between the two smallest batch sizes within 0.3 of -1, every optimizer",
        "slopes": small, "held": all_or_none(small.values(), lambda v: abs(v + 1) <= 0.3)}
    pairs = [(small[o], large[o]) for o in opts]
    claims["diminishing_returns"] = {
        "criterion": "slope between the two largest batch sizes at least 0.3 shallower than between the "
        "two smallest, every optimizer", "slopes_largest": large,
        "held": None if any(a is None or b is None for a, b in pairs)
        else all(b - a >= 0.3 for a, b in pairs)}
    pre = None
    if all(o in crit and crit[o]["b_crit"] is not None for o in ("sgd", "adam", "kfac")):
        sgd = crit["sgd"]["b_crit"]
        pre = crit["kfac"]["b_crit"] > sgd and crit["adam"]["b_crit"] > sgd
    claims["preconditioning_extends_scaling"] = {
        "criterion": "fitted B_crit of kfac and of adam both above sgd's", "b_crit": crit, "held": pre}
    mom = None
    ratio = {}
    if "momentum" in opts and "sgd" in opts:
        _, sm = _steps(results, "momentum")
        _, ss = _steps(results, "sgd")
        ratio = {"smallest_batch": None if None in (sm[0], ss[0]) else sm[0] / ss[0],
                 "largest_batch": None if None in (sm[-1], ss[-1]) else sm[-1] / ss[-1]}
        if None not in ratio.values():
            mom = 0.7 <= ratio["smallest_batch"] <= 1.3 and ratio["largest_batch"] <= 0.8
    claims["momentum_helps_only_at_large_batches"] = {
        "criterion": "momentum/sgd steps within 0.7-1.3 at the smallest batch size and at most 0.8 at the "
        "largest", "ratio": ratio, "held": mom}
    return claims


def _page_verdict(data: dict[str, Any]) -> Verdict:
    """The figures page's verdict on ``sweep_mlp`` (:mod:`analyses.registry`): all four claims held."""
    claims = judge(data)
    verdicts = [c["held"] for c in claims.values()]
    held = None if None in verdicts else all(verdicts)
    failed = [k for k, c in claims.items() if c["held"] is False]
    unknown = [k for k, c in claims.items() if c["held"] is None]
    if held:
        why = "all four claims held on the measured steps-to-target curves"
    elif failed:
        why = f"did not hold: {', '.join(failed)}"
        if unknown:
            why += f"; not measurable: {', '.join(unknown)}"
    else:
        why = f"not measurable: {', '.join(unknown)} (a batch size or optimizer never reached the target)"
    numbers = {k: c["held"] for k, c in claims.items()}
    for k, c in claims.items():
        for key in ("slopes", "b_crit", "ratio"):
            if key in c:
                numbers[f"{k}: {key}"] = c[key]
    return Verdict(held, why, numbers)


figure(
    "sweep_mlp", "Steps to target vs batch size, mlp on digits (curvlab sweep)",
    claim="Steps to a target fall as 1/B at small batch sizes (perfect scaling), then with diminishing "
    "returns beyond a critical batch size; preconditioning (K-FAC, Adam) extends perfect scaling to larger "
    "batch sizes than SGD; momentum helps only at large batch sizes.",
    criterion="(1) slope between the two smallest batch sizes within 0.3 of -1, every optimizer; (2) slope "
    "between the two largest batch sizes at least 0.3 shallower than between the two smallest, every "
    "optimizer; (3) fitted B_crit of kfac and of adam both above sgd's; (4) momentum/sgd steps within "
    "0.7-1.3 at the smallest batch size and at most 0.8 at the largest — held when all four hold",
)(_page_verdict)


if __name__ == "__main__":
    main(sys.argv[1])
