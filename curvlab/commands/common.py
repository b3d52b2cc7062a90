"""What the commands share: the one-line error report, option types, output checks and JSON.

A user error becomes one line ``curvlab: error: ...`` on stderr with exit status :data:`EXIT_USAGE`
(2): :func:`_one_line` folds a message onto one line, :func:`_process_prefix` names the process under
``torchrun``, :class:`ArgumentParser` (the class of every parser and sub-parser) reports a bad option
the same way instead of argparse's usage block, and :func:`one_line_warnings` prints each distinct
warning once, on one line ``curvlab: warning: ...``. Outputs are checked before any work
(:func:`_check_writable`, :func:`_check_plot`, :func:`_refuse_input_as_output`), and :func:`_write`
turns an OS error while writing (missing folder, no permission, full disk) into one line.
:func:`dump_json` is every ``--json``: strict JSON (no NaN or Infinity; numpy values converted).
:func:`_positive_int` is the option type of counts; :func:`_add_model_options` adds ``--model`` and
``--model-arg`` (``factors``, ``train``). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line ``curvlab: error: PROG: ...`` and exit 2.

    Sub-parsers are made of the class of their parent, so ``build_parser`` using this class is
    enough for every command and action. ``--help`` still prints the full usage.
    """

    def error(self, message: str):  # type: ignore[override]
        print(f"curvlab: error: {self.prog}: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print each distinct warning once, as one line ``curvlab: warning: ...`` on stderr."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = _one_line(message)
        if text not in seen:
            seen.add(text)
            print(f"curvlab: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types: numpy arrays and scalars converted, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dump_json(value: Any) -> str:
    """Strict JSON for ``--json`` (RFC 8259: no NaN or Infinity; an undefined number is null)."""
    return json.dumps(_plain(value), allow_nan=False)


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


#: Data sources embedded in curvlab: a file may name them (they read no file of the user's).
EMBEDDED_DATA = ("digits", "pystdlib")


def _load_data(spec: str, *, named: bool, recorded_in: str = "", split: str = "train",
               limit: int | None = None, **options):
    """The data set ``spec``: a built-in source, or a data factory. Unless the user ``named`` it on
    this command line (the spec was read from ``recorded_in``), only an embedded source is loaded: a
    factory is not run and a file (``npz:``, ``cifar10:``, ``text:``) is not read on a file's say-so
    (docs/data.md, docs/reliability.md)."""
    from curvlab.io.data import data_factory_spec, load_dataset, load_factory_data
    from curvlab.usercode import printable, require_named

    if data_factory_spec(spec):
        if not named:
            require_named(spec, None, recorded_in, option="--data", error=DataError)
        return load_factory_data(spec, split=split, limit=limit)
    if not named and spec not in EMBEDDED_DATA:
        raise DataError(
            f"{recorded_in}: records the data {printable(spec)!r}, a file: curvlab reads only the files you "
            f"name; pass --data {printable(spec)} to use it, or another --data"
        )
    return load_dataset(spec, split=split, limit=limit, **options)


def _check_writable(path: str) -> None:
    """Fail before any work if the output's folder is missing or not writable, or the output is a
    folder or not a regular file (a pipe or a device is never replaced)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{path}: cannot write: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{path}: cannot write: folder {folder} is not writable")
    if os.path.isdir(path):
        raise OptionError(f"{path}: cannot write: is a folder")
    if os.path.exists(path) and not os.path.isfile(path):
        raise OptionError(f"{path}: cannot write: not a regular file")


def plot_formats() -> list[str]:
    """The file extensions a plot can be saved as: matplotlib's own writers (png, pdf, ps, eps, svg,
    svgz, raw, rgba) and the raster formats it hands to Pillow where Pillow can write them (not pgf,
    which needs a LaTeX installation)."""
    from matplotlib.backend_bases import FigureCanvasBase
    from PIL import Image

    writable = Image.registered_extensions().items()
    pillow = {ext.lstrip(".").lower() for ext, fmt in writable if fmt in Image.SAVE}
    native = {"png", "pdf", "ps", "eps", "svg", "svgz", "raw", "rgba"}
    return sorted(ext for ext in FigureCanvasBase.get_supported_filetypes() if ext in native | pillow)


def _check_plot(path: str | None, *inputs: str) -> None:
    """Fail before any work if ``--plot`` names an unsupported format, an input, or an unwritable place."""
    if not path:
        return
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    formats = plot_formats()
    if ext and ext not in formats:  # no extension: PNG (curvlab.plots.save_figure)
        raise OptionError(
            f"--plot {path}: unsupported format {ext!r} (use .png, .pdf or .svg; "
            f"supported: {', '.join(formats)})"
        )
    for source in inputs:
        _refuse_input_as_output(source, path, "--plot")
    _check_writable(path)


def _write(writer, path: str) -> None:
    """Run a writer, turning an OS error (missing folder, no permission, full disk) into one line."""
    try:
        writer()
    except OSError as exc:
        raise CurvlabError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _refuse_input_as_output(source: str, output: str, what: str = "-o") -> None:
    if same_file(output, source):
        raise OptionError(f"{output}: refusing to overwrite the input {source}; choose another {what}")
