"""The Python API: one function per command, with the command line's defaults (docs/api.md).

=====================================  ==============================================================
``curvlab factors``                    :func:`collect_factors` (:mod:`curvlab.capture.factors`), then
                                       :func:`curvlab.save_factors`
``curvlab spectrum``                   :func:`spectrum` of a :class:`FactorSet` or a checkpoint
``curvlab fit``                        :func:`fit` of a spectrum, a :class:`FactorSet` or a file
``curvlab gradcov``                    :func:`gradcov` of a model, its batches and factors (no file)
``curvlab train``                      :func:`train`; the optimizer alone: :class:`curvlab.KFAC`
``--model NAME|PATH.py:FUNC``          :func:`build_model`
=====================================  ==============================================================

Each result has ``.to_json()``, the object the command prints with ``--json`` (without the keys that
name files the command wrote, e.g. ``output`` and ``plot``). Every computation is the library's own —
the commands call these same functions — so the numbers are the command's.

Batches are any iterable of ``(inputs, labels)`` pairs: a ``torch.utils.data.DataLoader``, a list,
:func:`curvlab.io.data.iterate_batches`. This module imports torch; ``import curvlab`` does not
import it (the package's names are looked up lazily).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvlab.analysis.gradcov_run import GradcovResult
from curvlab.analysis.powerlaw import NetworkFit
from curvlab.analysis.spectrum import SpectrumResult
from curvlab.errors import OptionError

if TYPE_CHECKING:
    from curvlab.capture.task import Task

__all__ = ["TrainResult", "build_model", "fit", "gradcov", "predict", "spectrum", "train"]


def build_model(
    model: str,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    **args: Any,
) -> nn.Module:
    """A registry model by name, or the model your factory ``"PATH.py:FUNC"`` / ``"package.module:FUNC"``
    builds, with keyword arguments ``args`` (``--model-arg``).

    A registry model needs ``input_shape`` and ``num_classes``; a factory is given them when it has
    parameters of those names. The model remembers its config, so :func:`curvlab.save_factors`
    records it and ``curvlab gradcov`` can rebuild it (a factory's only with ``--model`` naming it).
    """
    from curvlab.usercode import is_factory_spec

    if is_factory_spec(model):
        from curvlab.models.factory import build_factory_model

        return build_factory_model(model, input_shape, num_classes, args)
    from curvlab.models import build_model as build_registry_model

    if input_shape is None or num_classes is None:
        raise OptionError(f"build_model({model!r}): a registry model needs input_shape and num_classes")
    return build_registry_model(model, input_shape, num_classes, args)


def spectrum(
    factors_or_path: Any,
    *,
    step: int | str = "latest",
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    output: str | os.PathLike | None = None,
    vectors: bool = True,
) -> SpectrumResult:
    """The eigendecomposition of every factor: ``curvlab spectrum``.

    ``factors_or_path``: a :class:`~curvlab.capture.factors.FactorSet` (decomposed in memory) or a
    checkpoint path (``step``: a number, ``"latest"`` or ``"all"``; with ``output`` the spectrum file is
    written there, with eigenvectors unless ``vectors=False``). ``layers``: fnmatch globs.
    ``.to_json()`` is the command's JSON; ``.steps[k].kronecker()`` the whole-network spectrum.
    """
    from curvlab.analysis.spectrum import compute_spectrum, spectrum_of_factors

    if isinstance(factors_or_path, str | os.PathLike):
        return compute_spectrum(factors_or_path, "" if output is None else output, steps=step, layers=layers,
                                device=device, dtype=dtype, vectors=vectors and output is not None)
    if not isinstance(factors_or_path, Mapping):
        raise OptionError(f"spectrum(): expected a FactorSet or a checkpoint path, got "
                          f"{type(factors_or_path).__name__}")
    if output is not None:
        raise OptionError("spectrum(factors, output=...): save the factors first (curvlab.save_factors) and "
                          "pass the checkpoint's path")
    return spectrum_of_factors(factors_or_path, layers=layers, device=device, dtype=dtype)


def fit(
    source: Any,
    *,
    step: int | str = "latest",
    layers: Sequence[str] | None = None,
    window: tuple[int | None, int | None] | str | None = None,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    per_factor: bool = False,
    device: str = "auto",
) -> NetworkFit:
    """The rank law ``λ_(i) ≈ c·i^(-s)`` of the whole-network K-FAC eigenspectrum: ``curvlab fit``.

    ``source``: a :class:`SpectrumResult` (from :func:`spectrum`; its ``step``), a
    :class:`~curvlab.capture.factors.FactorSet`, or a path (a checkpoint, decomposed; or a spectrum
    file). ``window``: ``(k_lo, k_hi)`` or ``"K_LO:K_HI"`` (ends left out are chosen by KS distance).
    ``.fit`` is the :class:`~curvlab.analysis.powerlaw.RankLawFit`; ``.to_json()`` the command's JSON.
    """
    from curvlab.analysis.powerlaw import fit_network, parse_window
    from curvlab.analysis.spectrum import load_layer_eigenvalues, spectrum_of_factors

    if isinstance(window, str):
        window = parse_window(window)
    k_lo, k_hi = window if window is not None else (None, None)
    if not 0.0 < confidence < 1.0:
        raise OptionError(f"confidence {confidence}: must lie strictly between 0 and 1")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise OptionError(f"bootstrap {bootstrap!r}: must be an integer >= 0")
    path: str | None = None
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        number, eigenvalues = load_layer_eigenvalues(path, step=step, layers=layers, device=device)
    else:
        if isinstance(source, Mapping):
            source = spectrum_of_factors(source, layers=layers, device=device)
            layers = None
        if not isinstance(source, SpectrumResult):
            raise OptionError(
                f"fit(): expected a spectrum, a FactorSet or a path, got {type(source).__name__}")
        chosen = source.step(step)
        names = _matching([layer.name for layer in chosen.layers], layers)
        number, path = chosen.step, source.source
        eigenvalues = {layer.name: (layer.S, layer.A) for layer in chosen.layers if layer.name in names}
    return fit_network(eigenvalues, source=path, step=number, k_lo=k_lo, k_hi=k_hi, bootstrap=bootstrap,
                       confidence=confidence, seed=seed, per_factor=per_factor)


def gradcov(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    factors: Any,
    *,
    step: int | None = None,
    layers: Sequence[str] | None = None,
    curvature: str = "auto",
    directions: int = 4,
    mc_samples: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    task: Task | None = None,
) -> GradcovResult:
    """Gradient variance against curvature along every direction of the K-FAC eigenbasis: ``curvlab gradcov``.

    ``factors``: a :class:`~curvlab.capture.factors.FactorSet` or a checkpoint path (``step``: default
    the latest); no checkpoint of the model is needed. ``batches`` are held in memory (they are walked
    twice). The model is copied, converted to ``dtype`` (float64 by default, as the command: the
    flattest directions' curvature is below float32's resolution) and put in eval mode; yours is left
    as it is. ``curvature``: ``exact``, ``mc``, ``fvp`` or ``auto`` (exact for up to 100 classes × label
    locations, else mc). ``task`` (:class:`~curvlab.capture.task.Task`): how a batch goes in and what the
    logits and loss are (default: ``(x, y)`` batches, softmax cross-entropy). ``.to_json()`` is the
    command's JSON.
    """
    from curvlab.analysis.gradcov import LayerBasis
    from curvlab.analysis.gradcov_run import bases_from_checkpoint, run_gradcov
    from curvlab.capture.task import Task, default_task

    if curvature not in ("auto", "exact", "mc", "fvp"):
        raise OptionError(f"curvature {curvature!r}: choose auto, exact, mc or fvp")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise OptionError(f"directions {directions!r}: must be an integer >= 0")
    if task is None:  # the loss the factors were made with (a step or FactorSet records it), as the command
        task = Task(_recorded_loss(factors, step))
    task = default_task(task)
    work = copy.deepcopy(model).to(dtype=dtype).eval()
    data = [Task.move(batch, dtype=dtype) for batch in batches]
    if not data or sum(_batch_size(task.split_batch(batch)[1]) for batch in data) < 2:
        raise OptionError("gradcov(): the gradient variance needs at least 2 examples")
    if isinstance(factors, str | os.PathLike):
        from curvlab.io.checkpoint import CheckpointReader

        path = os.fspath(factors)
        with CheckpointReader(path) as reader:
            numbers = reader.step_numbers()
            names = reader.layer_names(step if step is not None else numbers[-1]) if numbers else []
        if not numbers:
            raise OptionError(f"{path}: holds no complete step")
        step = numbers[-1] if step is None else step
        names = _matching(names, layers)
        bases = bases_from_checkpoint(path, step, names)
    else:
        names = _matching(list(factors), layers)
        bases = {name: LayerBasis.from_factors(factors[name].S, factors[name].A) for name in names}
    return run_gradcov(work, data, bases, route=curvature, directions=directions, mc_samples=mc_samples,
                       seed=seed, task=task)


def predict(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    factors: Any,
    *,
    target: str,
    batch_sizes: Sequence[int] = tuple(2**k for k in range(2, 11)),
    optimizers: Sequence[str] = ("sgd", "momentum", "kfac", "ema"),
    variants: Sequence[str] | None = None,
    population: int | None = None,
    loss_floor: float = 0.0,
    step: int | None = None,
    layers: Sequence[str] | None = None,
    curvature: str = "auto",
    directions: int = 2,
    mc_samples: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    task: Task | None = None,
) -> Any:
    """Steps to ``target`` against the batch size predicted by the NQM built from the measured curvature,
    gradient variance and mean gradient in the KFE: ``curvlab predict`` (docs/predict.md).

    ``factors``, ``step``, ``layers``, ``curvature``, ``dtype``, ``task``: as :func:`gradcov` (``fvp`` is
    refused: every direction needs its curvature). ``population``: the training examples batches are
    drawn from (``None``: an unlimited stream; the command's default is the training split's size).
    Returns a :class:`~curvlab.analysis.predict_run.Prediction`; ``.to_json()`` is the prediction file's
    body without the checkpoint, options and time the command adds.
    """
    from curvlab.analysis.gradcov import LayerBasis
    from curvlab.analysis.gradcov_run import bases_from_checkpoint
    from curvlab.analysis.predict import VARIANTS
    from curvlab.analysis.predict_run import run_predict
    from curvlab.capture.task import Task, default_task

    if curvature not in ("auto", "exact", "mc"):
        raise OptionError(f"curvature {curvature!r}: choose auto, exact or mc")
    if task is None:
        task = Task(_recorded_loss(factors, step))
    task = default_task(task)
    work = copy.deepcopy(model).to(dtype=dtype).eval()
    data = [Task.move(batch, dtype=dtype) for batch in batches]
    if isinstance(factors, str | os.PathLike):
        from curvlab.io.checkpoint import CheckpointReader

        path = os.fspath(factors)
        with CheckpointReader(path) as reader:
            numbers = reader.step_numbers()
            if not numbers:
                raise OptionError(f"{path}: holds no complete step")
            step = numbers[-1] if step is None else step
            names = _matching(reader.layer_names(step), layers)
        bases = bases_from_checkpoint(path, step, names)
    else:
        names = _matching(list(factors), layers)
        bases = {name: LayerBasis.from_factors(factors[name].S, factors[name].A) for name in names}
    return run_predict(work, data, bases, target=target, batch_sizes=list(batch_sizes), optimizers=optimizers,
                       variants=tuple(VARIANTS) if variants is None else variants, population=population,
                       loss_floor=loss_floor, route=curvature, directions=directions, mc_samples=mc_samples,
                       seed=seed, task=task)


def _recorded_loss(factors: Any, step: int | None) -> Any:
    """The loss a checkpoint step or a FactorSet records (softmax cross-entropy where none is recorded)."""
    from curvlab.capture.loss import loss_from_attrs

    if isinstance(factors, str | os.PathLike):
        from curvlab.io.checkpoint import CheckpointReader

        path = os.fspath(factors)
        with CheckpointReader(path) as reader:
            numbers = reader.step_numbers()
            if not numbers:
                return loss_from_attrs({})
            chosen = numbers[-1] if step is None else step
            return loss_from_attrs(reader.step_attrs(chosen), f"{path}: step {chosen}")
    return loss_from_attrs(getattr(factors, "attrs", {}) or {})


def _batch_size(labels: Any) -> int:
    """Examples in a batch, from its labels (the first dimension)."""
    return int(labels.shape[0]) if labels is not None and getattr(labels, "ndim", 0) else 0


def _matching(names: list[str], patterns: Sequence[str] | None) -> list[str]:
    import fnmatch

    if patterns is None:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise OptionError(f"no layer matches layers={list(patterns)}")
    return chosen


@dataclass
class TrainResult:
    """A finished :func:`train` run: its folder, the checkpoint and the summary the command prints."""

    run: str
    summary: dict[str, Any]

    @property
    def checkpoint(self) -> str:
        """``RUN/ckpt.h5``: factors and weights at every saved step."""
        return os.path.join(self.run, "ckpt.h5")

    def to_json(self) -> dict[str, Any]:
        """The ``curvlab train --json`` object."""
        return dict(self.summary)


def train(
    model: str,
    *,
    steps: int,
    output: str | os.PathLike,
    data: str | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
    **options: Any,
) -> TrainResult:
    """Train and save factors and weights along the way: ``curvlab train``.

    ``model``: a registry name or your factory ``"PATH.py:FUNC"`` (its arguments: ``model_args={...}``);
    ``data``: a data source or a data factory (default: digits; pystdlib for ``transformer_shallow``).
    ``options`` are :class:`~curvlab.optim.config.TrainConfig`'s fields with the command line's
    defaults (``optimizer="kfac"``, ``batch_size=128``, ``lr`` by optimizer, ``save_every``, ...).
    ``resume=True`` continues the run in ``output``: options left out take the run's stored values (as
    ``curvlab train --resume``), but a factory is never taken from the run's files — name it again.
    """
    from curvlab.device import resolve_device
    from curvlab.optim.config import TrainConfig, resume_options
    from curvlab.optim.runfolder import CONFIG_FILE, read_config
    from curvlab.optim.train import train as train_run

    run = os.path.abspath(os.fspath(output))
    given = {"model": model, "steps": steps, **options, **({} if data is None else {"data": data})}
    stored = read_config(run) if resume and os.path.isdir(run) else None
    if stored is not None:
        given = resume_options(stored, given, os.path.join(run, CONFIG_FILE))
    try:
        config = TrainConfig(**given)
    except TypeError as exc:
        raise OptionError(f"train(): {exc}") from None
    summary = train_run(config, run, resume=resume, device=resolve_device(device), progress=progress)
    return TrainResult(run, summary)
