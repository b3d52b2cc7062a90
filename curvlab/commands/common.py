"""What the commands share: the one-line error report, option types and output checks.

A user error becomes one line ``curvlab: error: ...`` on stderr with exit status :data:`EXIT_USAGE`
(2): :func:`_one_line` folds a message onto one line, :func:`_process_prefix` names the process under
``torchrun`` and :func:`_one_line_parser_error` makes a sub-parser report its own errors the same way.
Outputs are checked before any work (:func:`_check_writable`, :func:`_refuse_input_as_output`), and
:func:`_write` turns an OS error while writing (missing folder, no permission, full disk) into one line.
:func:`_positive_int` is the option type of counts; :func:`_add_model_options` adds ``--model`` and
``--model-arg`` (``factors``, ``train``). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from curvlab.choices import LOSS_NAMES, MODEL_NAMES
from curvlab.errors import CurvlabError, DataError, OptionError
from curvlab.io.atomic import same_file
from curvlab.launch import launched

EXIT_USAGE = 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _process_prefix(exc: BaseException) -> str:
    """``process R of W: `` under torchrun (a distributed error names its process itself)."""
    if not launched():
        return ""
    from curvlab.distributed import DistributedError  # imports torch: only under torchrun

    if isinstance(exc, DistributedError):
        return ""
    return f"process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: "


def _one_line_parser_error(parser: argparse.ArgumentParser):
    """``parser.error`` replacement: one line ``curvlab: error: ...`` and exit 2 (no usage block)."""

    def error(message: str):
        print(f"curvlab: error: {parser.prog}: {_one_line(message)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    return error


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_name(text: str) -> str:
    """``--model``: a registry name or a factory ``PATH.py:FUNC`` / ``package.module:FUNC``."""
    from curvlab.usercode import is_factory_spec

    if text in MODEL_NAMES or is_factory_spec(text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(MODEL_NAMES)}, or PATH.py:FUNC / "
        "package.module:FUNC)")


def _add_model_options(parser: argparse.ArgumentParser, *, required: bool,
                       rebuild: str | None = None) -> None:
    """``--model`` and ``--model-arg``; ``rebuild`` says how the option works when a file records a model."""
    parser.add_argument(
        "--model",
        required=required,
        type=_model_name,
        metavar="NAME|PATH.py:FUNC",
        help=f"{', '.join(MODEL_NAMES)}, or your own factory PATH.py:FUNC / package.module:FUNC returning an "
        "nn.Module (docs/models.md)" + (f"; {rebuild}" if rebuild else ""),
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model hyper-parameter, repeatable (e.g. widths=64,32); a factory's keyword argument, the "
        "value read as JSON where it parses (default: none)",
    )


def _add_loss_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--loss``, ``--ignore-index``, ``--label-smoothing`` (``factors``, ``gradcov``, ``train``);
    ``default`` says in ``--help`` what an omitted ``--loss`` means for the command."""
    parser.add_argument("--loss", choices=LOSS_NAMES, default=None,
                        help=f"the loss of the logits, hence the Fisher (default: {default}): softmax "
                        "cross-entropy, mse (squared error, Gaussian) or bce (binary cross-entropy with "
                        "logits, Bernoulli per output)")
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="cross-entropy: labels equal to N (e.g. -100, padding) count nowhere (default: "
                        "none; -100 labels are then an error)")
    parser.add_argument("--label-smoothing", type=float, default=None, metavar="EPS",
                        help="cross-entropy: label smoothing in [0, 1] (default: the model's own, else 0; "
                        "it changes only the empirical Fisher)")


def _loss_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("loss", "ignore_index", "label_smoothing"))


def _on_data(spec: str, work):
    """``work()``, with a :class:`DataError` about a batch (a label the loss refuses) prefixed with the
    data source ``spec``."""
    try:
        return work()
    except DataError as exc:
        raise DataError(f"{spec}: {exc}") from None
def _parse_model_args(model: str | None, items: list[str]) -> dict | None:
    """The ``--model-arg`` items parsed for ``model`` (JSON values for a factory); ``None`` if none given."""
    if not items:
        return None
    from curvlab.usercode import is_factory_spec

    if is_factory_spec(model):
        from curvlab.errors import ModelError
        from curvlab.usercode import parse_factory_args

        return parse_factory_args(items, error=ModelError)
    from curvlab.models import parse_model_args

    return parse_model_args(items)


def _load_data(spec: str, *, named: bool, recorded_in: str = "", split: str = "train",
               limit: int | None = None, **options):
    """The data set ``spec``: a built-in source, or a data factory — loaded only if the user ``named``
    it on this command line; a factory spec read from ``recorded_in`` is refused (docs/data.md)."""
    from curvlab.io.data import data_factory_spec, load_dataset, load_factory_data
    from curvlab.usercode import require_named

    if data_factory_spec(spec):
        if not named:
            from curvlab.errors import DataError

            require_named(spec, None, recorded_in, option="--data", error=DataError)
        return load_factory_data(spec, split=split, limit=limit)
    return load_dataset(spec, split=split, limit=limit, **options)


def _check_writable(path: str) -> None:
    """Fail before any work if the output's folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{path}: cannot write: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OptionError(f"{path}: cannot write: folder {folder} is not writable")


def _write(writer, path: str) -> None:
    """Run a writer, turning an OS error (missing folder, no permission, full disk) into one line."""
    try:
        writer()
    except OSError as exc:
        raise CurvlabError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _refuse_input_as_output(source: str, output: str, what: str = "-o") -> None:
    if same_file(output, source):
        raise OptionError(f"{output}: refusing to overwrite the input {source}; choose another {what}")
