"""Code the user names: factories ``PATH.py:FUNC`` and ``package.module:FUNC``.

``--model`` and ``--data`` accept, besides the registry's names and the built-in data sources, a
*factory*: a function in a Python file (``models/cnn.py:build``) or in an importable module
(``mypkg.nets:resnet``) that returns the model (an ``nn.Module``) or the data. Such a function is
the user's code, and curvlab runs it only when the caller names it:

* on the command line of the running invocation (``--model SPEC``, ``--data SPEC``), or
* in Python (``curvlab.build_model("cnn.py:build", ...)``).

A checkpoint or run folder *records* the spec it was built with, its arguments and the sha256 of the
file that defined it (:meth:`Factory.record`), so that the user knows what to pass to rebuild it; a
recorded spec is never imported or called. A hostile file could record ``"shutil:rmtree"`` with
``{"path": "/"}`` as its arguments: rebuilding such a model needs the user to type both on the
command line (:func:`require_named`). When the user does name a factory, a file whose sha256
differs from the recorded one is a one-line warning (:func:`check_recorded`); a missing file is a
one-line error. docs/models.md ("Own models") states the rule for users.

Loading: a ``.py`` file is read once, hashed, compiled and executed as a fresh module (its folder on
``sys.path`` while it runs, so it may import its neighbours); a module spec is imported. Every
failure — a missing file, an exception in the user's module or factory, a wrong argument — is one
:class:`~curvlab.errors.CurvlabError` line naming the spec (and, for an exception in the user's code,
where it was raised). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curvlab.errors import CurvlabError

#: A dotted Python name: ``build``, ``Nets.build``, ``mypkg.nets``.
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: Largest factory file read (a Python source file; a bound against a device or a huge file named by mistake).
MAX_SOURCE_BYTES = 16 * 2**20


class FactoryWarning(UserWarning):
    """A named factory differs from what a checkpoint recorded (another file content or arguments)."""


def is_factory_spec(text: object) -> bool:
    """Whether ``text`` has the form ``PATH.py:FUNC`` or ``package.module:FUNC``."""
    if not isinstance(text, str):
        return False
    where, sep, function = text.rpartition(":")
    if not sep or not where or not _DOTTED.match(function):
        return False
    return where.endswith(".py") or bool(_DOTTED.match(where))


def is_data_factory_spec(text: object) -> bool:
    """Whether a ``--data`` spec names a data factory rather than a built-in source (``npz:PATH``)."""
    from curvlab.choices import DATA_SOURCE_NAMES

    return is_factory_spec(text) and str(text).partition(":")[0] not in DATA_SOURCE_NAMES


@dataclass(frozen=True)
class FactorySpec:
    """A parsed spec: a file (``path``) or a module (``module``), and the function's dotted name."""

    text: str
    path: str | None
    module: str | None
    function: str


def parse_spec(text: str, option: str, error: type[CurvlabError] = CurvlabError) -> FactorySpec:
    """Split ``PATH.py:FUNC`` / ``package.module:FUNC``; a malformed spec is one ``error`` line."""
    if not is_factory_spec(text):
        raise error(f"{option} {text!r}: not a factory (expected PATH.py:FUNC or package.module:FUNC)")
    where, _, function = text.rpartition(":")
    if where.endswith(".py"):
        return FactorySpec(text, os.path.expanduser(where), None, function)
    return FactorySpec(text, None, where, function)


@dataclass
class Factory:
    """A loaded factory: its spec, the function, and the file that defined it with its sha256."""

    spec: FactorySpec
    function: Callable[..., Any]
    file: str | None
    sha256: str | None
    option: str = "--model"
    error: type[CurvlabError] = CurvlabError

    @property
    def text(self) -> str:
        return self.spec.text

    def parameters(self) -> Mapping[str, inspect.Parameter] | None:
        """The function's parameters (``None`` where Python cannot tell them)."""
        try:
            return inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return None

    def accepts(self, name: str) -> bool:
        """Whether the function has a parameter called ``name`` (not merely ``**kwargs``)."""
        params = self.parameters()
        return params is not None and name in params and params[name].kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)

    def call(self, kwargs: Mapping[str, Any], offered: Mapping[str, Any] | None = None) -> Any:
        """Call the function with ``kwargs``, plus each ``offered`` value whose name it has as a
        parameter and that ``kwargs`` does not give (e.g. ``input_shape``, ``num_classes``, ``split``).

        A wrong or missing argument and any exception raised inside are one ``error`` line.
        """
        call_args = dict(kwargs)
        for name, value in (offered or {}).items():
            if name not in call_args and self.accepts(name):
                call_args[name] = value
        params = self.parameters()
        if params is not None:
            try:
                inspect.signature(self.function).bind(**call_args)
            except TypeError as exc:
                names = ", ".join(p for p in params if params[p].kind not in (
                    inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)) or "none"
                raise self.error(f"{self.option} {self.text}: {exc} (its parameters: {names})") from None
        with self._on_path():
            try:
                return self.function(**call_args)
            except Exception as exc:  # noqa: BLE001 (the user's code: any failure is one line)
                raise self.error(f"{self.option} {self.text}: the factory raised {describe_exception(exc)}") \
                    from None

    def record(self) -> dict[str, Any]:
        """What a checkpoint records about the factory: the spec, the file and its sha256."""
        return {"factory": self.text, "factory_file": self.file, "factory_sha256": self.sha256}

    @contextlib.contextmanager
    def _on_path(self) -> Iterator[None]:
        with _folder_on_path(os.path.dirname(self.file) if self.spec.path and self.file else None):
            yield


def load_factory(text: str, option: str = "--model", error: type[CurvlabError] = CurvlabError) -> Factory:
    """Import the module or execute the file named by ``text`` and find its function.

    Only call this with a spec the caller named (command line, Python call), never with one read
    from a file (see the module docstring).
    """
    spec = parse_spec(text, option, error)
    if spec.path is not None:
        module, file, sha = _exec_file(spec, option, error)
    else:
        module, file, sha = _import_module(spec, option, error)
    target: Any = module
    for part in spec.function.split("."):
        if not hasattr(target, part):
            where = file or spec.module
            raise error(f"{option} {text}: {where} has no {spec.function!r}")
        target = getattr(target, part)
    if not callable(target):
        raise error(f"{option} {text}: {spec.function!r} is a {type(target).__name__}, not a function")
    return Factory(spec, target, file, sha, option, error)


def _exec_file(
    spec: FactorySpec, option: str, error: type[CurvlabError]
) -> tuple[types.ModuleType, str, str]:
    """Read, hash and execute a factory file as a module of its own (cached by content)."""
    path = os.path.abspath(spec.path or "")
    if not os.path.isfile(path):
        raise error(f"{option} {spec.text}: file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            source = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise error(f"{option} {spec.text}: cannot read {path}: {exc.strerror or exc}") from None
    if len(source) > MAX_SOURCE_BYTES:
        raise error(f"{option} {spec.text}: {path} is over {MAX_SOURCE_BYTES // 2**20} MiB: not a Python "
                    "source file")
    sha = hashlib.sha256(source).hexdigest()
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"curvlab_factory_{stem}_{sha[:16]}"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == path:
        return module, path, sha
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        code = compile(source, path, "exec")
        with _folder_on_path(os.path.dirname(path)):
            exec(code, module.__dict__)  # noqa: S102 (the file the user named: see the module docstring)
    except Exception as exc:  # noqa: BLE001 (the user's code: any failure is one line)
        sys.modules.pop(name, None)
        raise error(f"{option} {spec.text}: executing {path} raised {describe_exception(exc)}") from None
    return module, path, sha


def _import_module(
    spec: FactorySpec, option: str, error: type[CurvlabError]
) -> tuple[Any, str | None, str | None]:
    try:
        module = importlib.import_module(spec.module or "")
    except Exception as exc:  # noqa: BLE001 (ModuleNotFoundError, or anything the module raises)
        raise error(f"{option} {spec.text}: cannot import {spec.module}: {describe_exception(exc)}") from None
    file = getattr(module, "__file__", None)
    return module, file, file_sha256(file) if file else None


@contextlib.contextmanager
def _folder_on_path(folder: str | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` while the user's file runs (as ``python FILE`` would have it)."""
    if not folder or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def file_sha256(path: str) -> str | None:
    """The sha256 of a file's bytes (``None`` if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)``, on one line, the place being the innermost frame of the traceback."""
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f" ({frames[-1].filename}:{frames[-1].lineno})"
    return text


# --------------------------------------------------------------------------- arguments


def parse_factory_args(items: Sequence[str], option: str = "--model-arg",
                       error: type[CurvlabError] = CurvlabError) -> dict[str, Any]:
    """``key=value`` items as keyword arguments of a factory, each value parsed as JSON where it
    parses (``3``, ``0.5``, ``true``, ``[64, 32]``, ``{"a": 1}``, ``"text"``) and kept as the
    string otherwise (``tanh``); ``NaN`` and ``Infinity`` stay strings. A missing ``=``, a key that
    is not an identifier or a key given twice is one ``error`` line."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise error(f"{option} {item!r}: expected key=value")
        if not key.isidentifier():
            raise error(f"{option} {item!r}: {key!r} is not a valid argument name")
        if key in args:
            raise error(f"{option} {item!r}: argument {key!r} given twice")
        args[key] = _json_value(raw.strip())
    return args


def _json_value(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def format_args(args: Mapping[str, Any], option: str = "--model-arg") -> str:
    """The command-line flags that give ``args`` (JSON values, shell-quoted where needed)."""
    import shlex

    parts = []
    for key, value in args.items():
        text = value if isinstance(value, str) and _json_value(value) == value else json.dumps(value)
        parts.append(f"{option} {shlex.quote(f'{key}={text}')}")
    return " ".join(parts)


def json_safe(value: Any, where: str, error: type[CurvlabError] = CurvlabError) -> Any:
    """``value`` after a JSON round trip (finite numbers only): what a checkpoint can record."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: cannot be recorded as JSON ({exc})") from None


# --------------------------------------------------------------------------- the rule for recorded specs


def recorded_factory(config: Mapping[str, Any] | None) -> str | None:
    """The factory spec a recorded config names (``None`` for a registry model or no config)."""
    if not isinstance(config, Mapping):
        return None
    spec = config.get("factory")
    return spec if isinstance(spec, str) else None


def require_named(recorded: str, given: str | None, where: str, *, option: str = "--model",
                  args: Mapping[str, Any] | None = None, error: type[CurvlabError] = CurvlabError) -> None:
    """Refuse to go on unless the user named a factory: ``recorded`` comes from a file.

    The message names the recorded spec and arguments so that the user can copy them onto the
    command line after reading them.
    """
    if given is not None:
        return
    import shlex

    flags = f"{option} {shlex.quote(recorded)}"
    if isinstance(args, Mapping) and args:
        flags += " " + format_args(args, f"{option}-arg")
    raise error(
        f"{where}: records the factory {printable(recorded)} ({option}), which curvlab does not run on a "
        f"file's say-so; if you trust it, name it yourself: {printable(flags)}"
    )


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (a file's strings, shown in
    a message, must not drive the terminal)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def check_recorded(factory: Factory, args: Mapping[str, Any], recorded: Mapping[str, Any], where: str, *,
                   args_given: bool, error: type[CurvlabError] = CurvlabError) -> None:
    """Compare a factory the user named with what ``recorded`` (a config read from a file) says.

    Arguments: the user's own ``--model-arg`` are used, never the recorded ones; when the file
    records arguments and the user gave none, that is an error naming them (the model would be
    built differently); other differences are a one-line :class:`FactoryWarning`. The file: a
    sha256 that differs from the recorded one is a warning.
    """
    recorded_args = recorded.get("args") if isinstance(recorded.get("args"), Mapping) else {}
    if recorded_args and not args_given:
        raise error(printable(
            f"{where}: the factory {factory.text} was called with arguments {json.dumps(recorded_args)}; "
            f"pass them too if you trust them: {format_args(recorded_args, factory.option + '-arg')}"
        ))
    if args_given and json_safe(dict(args), where) != json_safe(dict(recorded_args), where):
        warnings.warn(printable(
            f"{where}: the factory was called with {json.dumps(recorded_args)} there, with "
            f"{json.dumps(dict(args))} now"), FactoryWarning, stacklevel=2)
    sha = recorded.get("factory_sha256")
    if isinstance(sha, str) and factory.sha256 is not None and sha != factory.sha256:
        warnings.warn(
            f"{where}: {factory.file} has changed since it was recorded (sha256 {factory.sha256[:12]}…, "
            f"recorded {sha[:12]}…)", FactoryWarning, stacklevel=2)

