"""The ``curvlab`` command line: thin argparse wrappers over the library.

Every command prints a short summary on stdout (or one JSON object with ``--json``), shows progress on
stderr, and turns a user error into one line ``curvlab: error: ...`` on stderr with exit status 2.

One module per command, each with its parser (``_add_<command>``) and its runner (``run_<command>``):
:mod:`~curvlab.commands.factors`, :mod:`~curvlab.commands.info`, :mod:`~curvlab.commands.spectrum`,
:mod:`~curvlab.commands.gradcov`, :mod:`~curvlab.commands.fit`, :mod:`~curvlab.commands.compare`,
:mod:`~curvlab.commands.nqm` and
:mod:`~curvlab.commands.train`; what they share (the one-line error report, option types, output checks)
is :mod:`~curvlab.commands.common`. This module holds :func:`main` (the console script, and
``python -m curvlab``) and :func:`build_parser`.

Building the parsers imports no torch (the option choices come from :mod:`curvlab.choices`, whether
this process runs under ``torchrun`` from :mod:`curvlab.launch`), and a command imports the library
when it runs: ``curvlab --help``, ``curvlab --version`` and ``curvlab info`` never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from curvlab import __version__
from curvlab.commands.common import EXIT_USAGE, _one_line, _process_prefix
from curvlab.commands.compare import _add_compare
from curvlab.commands.factors import _add_factors
from curvlab.commands.fit import _add_fit
from curvlab.commands.gradcov import _add_gradcov
from curvlab.commands.info import _add_info
from curvlab.commands.nqm import _add_nqm
from curvlab.commands.spectrum import _add_spectrum
from curvlab.commands.train import _add_train
from curvlab.errors import CurvlabError, OptionError
from curvlab.launch import launched

__all__ = ["DISTRIBUTED_COMMANDS", "build_parser", "main"]


# Commands that share their work across the processes of ``torchrun`` (docs/distributed.md).
DISTRIBUTED_COMMANDS = ("factors", "gradcov", "spectrum", "train")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the command joins the process group first
    (:mod:`curvlab.distributed`); only process 0 writes files and prints the summary.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise OptionError(f"curvlab {args.command} runs in one process; start it without torchrun "
                              f"(distributed commands: {', '.join(DISTRIBUTED_COMMANDS)})")
        with _session(args.command):
            return int(args.handler(args) or 0)
    except CurvlabError as exc:
        print(f"curvlab: error: {_process_prefix(exc)}{_one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_status", EXIT_USAGE))
    except KeyboardInterrupt:
        print("curvlab: interrupted", file=sys.stderr)
        return 130


def _session(command: str) -> contextlib.AbstractContextManager:
    """:func:`curvlab.distributed.session` around a command that can share its work (it imports torch).

    Any other command is refused under ``torchrun`` before it gets here, and in a single process the
    session has no group to join or leave.
    """
    if command not in DISTRIBUTED_COMMANDS:
        return contextlib.nullcontext()
    from curvlab import distributed

    return distributed.session()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvlab",
        description="Curvature analysis of neural networks: K-FAC factors, eigenspectra, NQM.",
    )
    parser.add_argument("--version", action="version", version=f"curvlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_factors(commands)
    _add_info(commands)
    _add_spectrum(commands)
    _add_gradcov(commands)
    _add_fit(commands)
    _add_compare(commands)
    _add_nqm(commands)
    _add_train(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
