"""Fig. 10: gradient variance vs curvature in the Kronecker-factored eigenbasis.

``python -m analyses.fig10 a`` (ResNet8) or ``b`` (the shallow Transformer with its tied embedding).

**Which step.** The paper compares variance and curvature on a network in training, not at its
initialisation and not once it has memorised its training set (then ``p_n ≈ e_{y_n}`` for every training
example: per-example gradients vanish like ``1 − p_y`` while the curvature vanishes only like its square
root, so ``H ≈ C`` can no longer be seen). The step is chosen from the run's own losses, by a rule fixed
before looking at them: at every saved step the mean loss on (up to 512 of) the training examples and
on the held-out split is measured; a step is

* *after initialisation* when its training loss is below half the step-0 training loss, and
* *before memorisation* when its held-out loss is at most twice its training loss;

the comparison uses the latest step that is both (the most trained network that still generalises), or,
if none is, the first saved step after 0, and ``fig10{a,b}.json`` records the losses and the reason.

The tied weight of panel b is checked once more on its own: ``curvlab gradcov --layers pre_softmax
--directions 32`` compares the Monte-Carlo estimate with the jvp route on 32 directions spread over its
K-FAC eigenvalues (the flattest decile included), in standard errors (``fig10b_check.json``).
"""

from __future__ import annotations

import sys

from analyses.config import DEVICE, FIGURES, SETTINGS, capture_json, timed, write_json
from analyses.train import run_dir

RUNS = {"a": "resnet8", "b": "transformer"}
LOSS_EXAMPLES = 512
TIED = "pre_softmax"


def step_losses(name: str) -> list[dict]:
    """Mean loss on the training and the held-out examples at every saved step of run ``name``."""
    import torch

    from curvlab.io.checkpoint import CheckpointReader
    from curvlab.io.data import iterate_batches, load_dataset
    from curvlab.io.restore import rebuild_model
    from curvlab.models import data_options
    from curvlab.optim.kfac import mean_cross_entropy

    ckpt = str(run_dir(name) / "ckpt.h5")
    with CheckpointReader(ckpt) as reader:
        steps = reader.step_numbers()
    rows = []
    for step in steps:
        model, source = rebuild_model(ckpt, step)
        options = data_options(source.model_name, (source.config or {}).get("args", {}))
        spec = (source.config or {}).get("data", SETTINGS[name]["data"])
        row = {"step": step}
        limit = min(LOSS_EXAMPLES, SETTINGS[name].get("examples") or LOSS_EXAMPLES)
        for split in ("train", "test"):
            data = load_dataset(spec, split=split, limit=limit, **options)
            total = 0.0
            with torch.no_grad():
                for x, y in iterate_batches(data, 32):
                    total += float(mean_cross_entropy(model(x), y)) * len(x)
            row[split] = total / len(data)
        rows.append(row)
    return rows


def comparison_step(rows: list[dict]) -> tuple[int, str]:
    """The step the comparison uses, and why (module docstring)."""
    initial = rows[0]["train"]
    fit = [r for r in rows[1:] if r["train"] < 0.5 * initial and r["test"] <= 2 * r["train"]]
    if fit:
        r = fit[-1]
        return r["step"], (f"the latest saved step whose training loss ({r['train']:.3g}) is below half the "
                           f"initial {initial:.3g} and whose held-out loss ({r['test']:.3g}) is at most "
                           "twice it")
    first = rows[1] if len(rows) > 1 else rows[0]
    return first["step"], ("no saved step is both trained (training loss below half the initial) and not "
                           "memorising (held-out loss at most twice the training loss): the first saved step")


def main(panel: str) -> None:
    name = RUNS[panel]
    s = SETTINGS[name]
    with timed(f"fig10{panel}"):
        rows = step_losses(name)
        step, why = comparison_step(rows)
        common = [
            str(run_dir(name) / "ckpt.h5"), "--step", str(step), "--examples", str(s["gradcov_examples"]),
            "--batch-size", str(s.get("gradcov_batch", 16)), "--mc-samples", str(s["gradcov_mc_samples"]),
            "--device", DEVICE, "--data", s["data"],  # a recorded data file is read only when named
        ]
        summary = capture_json(
            "gradcov", *common, "--directions", str(s["gradcov_directions"]),
            "-o", str(FIGURES / "data" / f"{name}.gradcov.h5"), "--plot", str(FIGURES / f"fig10{panel}.png"),
        )
        summary["step_choice"] = {"step": step, "why": why, "losses": rows}
        write_json(FIGURES / f"fig10{panel}.json", summary)
        if panel == "b":
            check = capture_json(
                "gradcov", *common, "--layers", TIED, "--curvature", "mc",
                "--directions", str(s["check_directions"]), "-o", str(FIGURES / "data" / f"{name}.check.h5"),
            )
            write_json(FIGURES / "fig10b_check.json", check)


if __name__ == "__main__":
    main(sys.argv[1])
