"""``curvlab info``: validate a factor checkpoint and list what it holds.

Its steps, layers, module types, factor shapes and kinds, with sanity figures per factor: trace,
diagonal range and symmetry error (:mod:`curvlab.io.info`). h5py and numpy only: the whole command runs
without importing torch.
"""

from __future__ import annotations

import argparse

from curvlab.commands.common import dump_json
from curvlab.errors import CheckpointError


def _add_info(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "info",
        help="list the steps, layers and factor shapes of a checkpoint, with sanity figures",
        description="Validate a factor checkpoint and list its steps, layers, module types, factor "
        "shapes and kinds, traces, diagonal ranges and symmetry errors.",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--step", type=int, action="append", default=None,
                   help="only this step, repeatable (default: every step)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from curvlab.io.info import describe_checkpoint, format_summary

    summary = describe_checkpoint(args.checkpoint, steps=args.step)
    if args.step is not None:
        found = {s["step"] for s in summary["steps"]}
        absent = [s for s in args.step if s not in found]
        if absent:
            raise CheckpointError(f"{args.checkpoint}: step {absent[0]}: no such step")
    if args.json:
        print(dump_json(summary))
    else:
        print(format_summary(summary))
    return 0
