"""``curvlab train``: train a model and save factors and weights along the way.

sgd, momentum, adam or K-FAC (seed F.4) with a constant or linearly decaying learning rate (seed F.3;
:mod:`curvlab.optim.train`). The run folder holds ``ckpt.h5`` (factors and weights at step 0, every
``--save-every`` steps, at ``--save-steps`` and at the end), ``metrics.jsonl`` and ``config.json``; with
kfac the saved factors are the optimizer's running averages, otherwise they are collected on a fixed set
of ``--factor-examples`` training examples. ``--resume`` continues a killed run from its last complete
step, options left out taking the run's stored values. Runs data-parallel under ``torchrun``; torch is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os

from curvlab.choices import DATA_SOURCES, DEVICE_CHOICES, FISHER_TYPES, OPTIMIZERS, SCHEDULES
from curvlab.commands.common import (
    _add_loss_options,
    _add_model_options,
    _parse_model_args,
    _positive_int,
    dump_json,
)
from curvlab.errors import OptionError

#: ``curvlab train`` options that map one-to-one onto ``curvlab.optim.train.TrainConfig`` fields.
_TRAIN_FIELDS = (
    "model", "data", "examples", "optimizer", "steps", "batch_size", "lr", "schedule", "decay_steps",
    "final_lr_factor", "momentum", "beta2", "eps", "weight_decay", "damping", "kl_clip", "factor_decay",
    "factor_update_every", "inverse_update_every", "fisher", "mc_samples", "loss", "ignore_index",
    "label_smoothing", "factor_examples", "save_every", "save_steps", "seed", "augment", "augment_padding",
)


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train a model (sgd, momentum, adam or K-FAC) and save factors and weights along the way",
        description="Train a model and write RUN/ckpt.h5 (factors and weights at step 0, every --save-every "
        "steps, at --save-steps and at the end), RUN/metrics.jsonl and RUN/config.json. With kfac the saved "
        "factors are the optimizer's running averages; otherwise they are collected on a fixed set of "
        "--factor-examples training examples. --resume continues a killed run from its last complete step. "
        "Options left out take the run's stored values on --resume, else their defaults.",
    )
    _add_model_options(p, required=False, rebuild="required, no default; with --resume: the run's model (a "
                       "factory must be named again)")
    p.add_argument("--data", default=None,
                   help=f"data source: {DATA_SOURCES}, or your own PATH.py:FUNC (default: "
                   "digits, pystdlib for transformer_shallow; with --resume: the run's)")
    p.add_argument("--examples", type=_positive_int, default=None,
                   help="train on the first N examples only (default: all)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: kfac")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="number of updates (required, no default)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: 128")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate α0 (default: sgd 0.1, momentum 0.05, adam 0.001, kfac 0.05)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="seed F.3 (default: constant)")
    p.add_argument("--decay-steps", type=_positive_int, default=None, help="T_decay (default: --steps)")
    p.add_argument("--final-lr-factor", type=float, default=None, help="γ, the final lr / α0 (default: 0.01)")
    p.add_argument("--momentum", type=float, default=None,
                   help="momentum / kfac momentum / adam β1 (default: 0.9)")
    p.add_argument("--beta2", type=float, default=None, help="adam β2 (default: 0.999)")
    p.add_argument("--eps", type=float, default=None, help="adam ε (default: 1e-8)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0")
    p.add_argument("--damping", type=float, default=None, help="kfac Tikhonov damping λ (default: 0.01)")
    p.add_argument("--kl-clip", type=_kl_clip, default=None,
                   help="kfac KL clipping κ, or 'none' (default: 0.001)")
    p.add_argument("--factor-decay", type=float, default=None,
                   help="kfac factor moving average ε (default: 0.95)")
    p.add_argument("--factor-update-every", type=_positive_int, default=None, help="kfac (default: 1)")
    p.add_argument("--inverse-update-every", type=_positive_int, default=None, help="kfac (default: 10)")
    p.add_argument("--fisher", choices=FISHER_TYPES, default=None,
                   help="Fisher type of the factors (default: mc)")
    p.add_argument("--mc-samples", type=_positive_int, default=None,
                   help="labels per example for mc (default: 1)")
    _add_loss_options(p, "cross-entropy; the training loss is its torch mean")
    p.add_argument("--factor-examples", type=_positive_int, default=None,
                   help="size of the fixed factor set (default: 512, at most the training set)")
    p.add_argument("--save-every", type=_positive_int, default=None, metavar="K",
                   help="save every K steps (default: only step 0, --save-steps and the end)")
    p.add_argument("--save-steps", type=_step_list, default=None, metavar="LIST",
                   help="extra steps to save, e.g. 10,20,50 (default: none)")
    p.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="init, data order, mc labels, augmentation (default: 0)")
    p.add_argument("--augment", default=None, metavar="LIST",
                   help="image augmentation of the training batches (seed F.1): crop (random crop with "
                   "padding), flip (horizontal; not for digits), comma-separated, or none (default)")
    p.add_argument("--augment-padding", type=_positive_int, default=None, metavar="P",
                   help="crop padding in pixels (default: an eighth of the image side, at least 1)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda if a GPU is visible")
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
    from curvlab.optim.config import resume_options
    from curvlab.optim.train import TrainConfig, read_config, train

    device = resolve_device(args.device)
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    stored = read_config(args.output) if args.resume and os.path.isdir(args.output) else None
    model_args = _parse_model_args(args.model or (stored.model if stored else None), args.model_arg)
    if model_args is not None:
        given["model_args"] = model_args
    if given.get("kl_clip") == "none":
        given["kl_clip"] = None
    if stored is not None:
        from curvlab.optim.train import RESUMABLE_CHANGES

        for name, value in given.items():  # before the merged options are checked as a whole
            if name not in RESUMABLE_CHANGES and value != getattr(stored, name):
                raise OptionError(f"{args.output}: --resume with {name.replace('_', '-')}={value!r} but the "
                                  f"run was started with {getattr(stored, name)!r}")
        options = resume_options(stored, given, os.path.join(args.output, "config.json"))
    else:
        for name in ("model", "steps"):
            if name not in given:
                raise OptionError(f"--{name} is required (unless --resume finds a run in {args.output})")
        options = given
    summary = train(TrainConfig(**options), args.output, resume=args.resume, device=device,
                    progress=not args.quiet)
    if not distributed.context().is_main:
        return 0  # under torchrun only process 0 reports
    if args.json:
        print(dump_json(summary))
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

