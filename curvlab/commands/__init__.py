"""The ``curvlab`` command line: thin argparse wrappers over the library.

Every command prints a short summary on stdout (or one JSON object with ``--json``), shows progress on
stderr when it is a terminal, and turns a user error into one line ``curvlab: error: ...`` on stderr with
exit status 2: a :class:`~curvlab.errors.CurvlabError` from the library, or a bad option (every parser is
a :class:`~curvlab.commands.common.ArgumentParser`). Warnings are one line ``curvlab: warning: ...`` each,
each printed once. A reader that stops reading early (``curvlab info x.h5 | head``) ends the command
quietly with status 0, as ``head`` asked for no more. Every command but ``train`` and ``sweep`` (which
commit their files one by one, to resume) writes its outputs together when it succeeds and none when it
fails (:func:`curvlab.io.atomic.all_or_nothing`).

One module per command, each with its parser (``_add_<command>``) and its runner (``run_<command>``):
:mod:`~curvlab.commands.factors`, :mod:`~curvlab.commands.info`, :mod:`~curvlab.commands.spectrum`,
:mod:`~curvlab.commands.gradcov`, :mod:`~curvlab.commands.fit`, :mod:`~curvlab.commands.compare`,
:mod:`~curvlab.commands.nqm`, :mod:`~curvlab.commands.train`, :mod:`~curvlab.commands.sweep` and
:mod:`~curvlab.commands.predict`; what they
share (the one-line error report, option types, output checks) is :mod:`~curvlab.commands.common`. This
module holds :func:`main` (the console script, and ``python -m curvlab``) and :func:`build_parser`.

Building the parsers imports no torch (the option choices come from :mod:`curvlab.choices`, whether
this process runs under ``torchrun`` from :mod:`curvlab.launch`), and a command imports the library
when it runs: ``curvlab --help``, ``curvlab --version`` and ``curvlab info`` never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from curvlab import __version__
from curvlab.commands.common import EXIT_USAGE, ArgumentParser, _one_line, _process_prefix, one_line_warnings
from curvlab.commands.compare import _add_compare
from curvlab.commands.factors import _add_factors
from curvlab.commands.fit import _add_fit
from curvlab.commands.gradcov import _add_gradcov
from curvlab.commands.info import _add_info
from curvlab.commands.nqm import _add_nqm
from curvlab.commands.predict import _add_predict
from curvlab.commands.spectrum import _add_spectrum
from curvlab.commands.sweep import _add_sweep
from curvlab.commands.train import _add_train
from curvlab.errors import CurvlabError, OptionError
from curvlab.io.atomic import all_or_nothing
from curvlab.launch import launched

__all__ = ["DISTRIBUTED_COMMANDS", "build_parser", "main"]


# Commands whose files are committed one by one as they go, so that a killed run resumes: their outputs
# are not held back until the command ends (every other command's are: io.atomic.all_or_nothing).
INCREMENTAL_COMMANDS = ("train", "sweep")

# Commands that share their work across the processes of ``torchrun`` (docs/distributed.md).
DISTRIBUTED_COMMANDS = ("factors", "gradcov", "spectrum", "train")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the command joins the process group first
    (:mod:`curvlab.distributed`); only process 0 writes files and prints the summary.
    """
    parser = build_parser()
    with one_line_warnings():
        try:
            args = parser.parse_args(argv)
            if launched() and args.command not in DISTRIBUTED_COMMANDS:
                raise OptionError(f"curvlab {args.command} runs in one process; start it without torchrun "
                                  f"(distributed commands: {', '.join(DISTRIBUTED_COMMANDS)})")
            outputs = contextlib.nullcontext() if args.command in INCREMENTAL_COMMANDS else all_or_nothing()
            with _session(args.command), outputs:
                status = int(args.handler(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            return status
        except CurvlabError as exc:
            print(f"curvlab: error: {_process_prefix(exc)}{_one_line(exc)}", file=sys.stderr)
            return int(getattr(exc, "exit_status", EXIT_USAGE))
        except BrokenPipeError:
            _silence_stdout()
            return 0
        except KeyboardInterrupt:
            print("curvlab: interrupted", file=sys.stderr)
            return 130


def _silence_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null so that Python's final flush
    at exit does not raise (and print) a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing to flush at exit
        pass


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
    parser = ArgumentParser(
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
    _add_sweep(commands)
    _add_predict(commands)
    for sub in _parsers(parser):
        sub.formatter_class = DefaultsHelpFormatter
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default: ``(default: X)`` is added to an option's help unless the
    help already says its default (options whose default is "none" say what that means themselves;
    ``tests/test_cli_help.py`` checks that every option does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and action.nargs != 0
            and "default" not in text.lower()
            and not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
            and action.default != []
        ):
            text += " (default: %(default)s)"
        return text


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


if __name__ == "__main__":
    sys.exit(main())
