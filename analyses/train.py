"""Train a model with K-FAC and save its factors along the way (seed E.1): the run behind Figs. 9, 10, 12.

``python -m analyses.train resnet8|transformer`` writes ``figures/data/runs/<name>/ckpt.h5``. A run
interrupted mid-way is resumed from its last complete step.
"""

from __future__ import annotations

import sys

from analyses.config import DATA_DIR, DEVICE, SETTINGS, run_curvlab, timed

MODELS = {"resnet8": "resnet8", "transformer": "transformer_shallow"}


def run_dir(name: str):
    return DATA_DIR / "runs" / name


def main(name: str) -> None:
    s = SETTINGS[name]
    out = run_dir(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "train", "--model", MODELS[name], "--data", s["data"], "--optimizer", "kfac",
        "--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
        "--save-steps", s["save_steps"], "--device", DEVICE, "-o", str(out), *s.get("kfac_args", []),
    ]
    if s.get("augment"):
        argv += ["--augment", s["augment"]]
    if s.get("examples"):
        argv += ["--examples", str(s["examples"])]
    for item in s["model_args"]:
        argv += ["--model-arg", item]
    if (out / "ckpt.h5").exists():
        argv.append("--resume")
    with timed(f"train {name}"):
        run_curvlab(*argv)


if __name__ == "__main__":
    main(sys.argv[1])
