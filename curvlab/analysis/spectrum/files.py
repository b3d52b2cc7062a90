"""The spectrum file: ``curvlab spectrum``'s computation writes it, :func:`load_layer_eigenvalues` reads it.

The command ``curvlab spectrum`` writes the eigenvalues and eigenvectors to a spectrum file
(``format = "curvlab.spectrum"``, documented in ``docs/format.md``, "Spectrum files"), computed by
:func:`compute_spectrum`; :func:`load_layer_eigenvalues` reads either kind of file back (a spectrum
file is read; a factor checkpoint's factors are decomposed, eigenvalues only).

:func:`compute_spectrum` selects the steps and layers (``"latest"``/``"all"``/numbers, fnmatch globs
each of which must match), decomposes each step with the engine (:mod:`.engine`; under torchrun the
work is shared, :mod:`.sharing`, and process 0 writes) and writes ``/steps/<step>`` with the
layer's eigenvalues, eigenvectors (or ``order`` of a diagonal factor), the clipping and retries,
and the step's whole-network figures from :class:`~.kronecker.KroneckerSpectrum` (count, zeros,
trace, max, smallest positive), ``complete`` last, the file written atomically.

numpy and h5py only at import: torch is imported by the engine's functions when a step is decomposed.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from curvlab.analysis.spectrum.engine import (
    FactorEig,
    _check_dtype_name,
    _resolve_device,
    decompose_checkpoint,
    decompose_factors,
)
from curvlab.analysis.spectrum.kronecker import KroneckerSpectrum
from curvlab.analysis.spectrum.sharing import _check_same_batches, _process_group, _send_share, _step_factors
from curvlab.errors import CheckpointError, CurvlabError, OptionError, where
from curvlab.io import hdf5
from curvlab.io.atomic import atomic_output, derived_path, same_file
from curvlab.io.checkpoint import (
    CheckpointReader,
    IncompleteStepWarning,
    expected_factor_sizes,
)
from curvlab.io.checkpoint.format import block_size
from curvlab.io.checkpoint.reader import warn_incomplete
from curvlab.limits import ReadBudget

SPECTRUM_FORMAT = "curvlab.spectrum"
SPECTRUM_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Which steps and layers


def _select_steps(reader_steps: list[int], steps: object, path: str) -> list[int]:
    """``"latest"``, ``"all"``, an int or a list of ints, as sorted complete step numbers."""
    if not reader_steps:
        raise CheckpointError(f"{path}: holds no complete step")
    if steps is None or steps == "all":
        return list(reader_steps)
    if steps == "latest":
        return [reader_steps[-1]]
    if isinstance(steps, str):
        try:
            steps = int(steps)
        except ValueError:
            raise OptionError(f"--step {steps}: expected a step number, 'latest' or 'all'") from None
    wanted = [steps] if isinstance(steps, (int, np.integer)) else list(steps)  # type: ignore[arg-type]
    for s in wanted:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise OptionError(f"--step {s!r}: expected a step number, 'latest' or 'all'")
        if int(s) not in reader_steps:
            listed = ", ".join(map(str, reader_steps))
            raise CheckpointError(f"{path}: step {s}: no such complete step (complete steps: {listed})")
    return sorted({int(s) for s in wanted})


def _select_layers(names: list[str], patterns: Sequence[str] | None, used: set[str]) -> list[str]:
    if patterns is None:
        return list(names)
    chosen = []
    for name in names:
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        if hits:
            chosen.append(name)
    return chosen


def _check_patterns(path: str, patterns: Sequence[str] | None, used: set[str]) -> None:
    unused = [p for p in patterns or [] if p not in used]
    if unused:
        raise OptionError(f"{path}: --layers {unused[0]!r} matches no layer")


# --------------------------------------------------------------------------------------------------
# The spectrum file: writing


@dataclass
class LayerSpectrum:
    """One layer's decomposition as ``curvlab spectrum`` reports it (eigenvalues only)."""

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    S: np.ndarray
    A: np.ndarray
    num_clipped: dict[str, int] = field(default_factory=dict)
    num_unresolved: dict[str, int] = field(default_factory=dict)
    retries: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class StepSpectrum:
    """The decomposed layers of one step, in the checkpoint's layer order."""

    step: int
    fisher_type: str
    num_examples: int
    layers: list[LayerSpectrum]

    def kronecker(self, **kwargs: Any) -> KroneckerSpectrum:
        """The whole-network Kronecker spectrum of this step."""
        return KroneckerSpectrum([(layer.S, layer.A) for layer in self.layers], **kwargs)


@dataclass
class SpectrumResult:
    """What :func:`compute_spectrum` did: where it wrote, how, and every step's eigenvalues.

    ``source`` is ``None`` for factors decomposed in memory (:func:`spectrum_of_factors`).
    """

    source: str | None
    output: str | None
    device: str
    dtype: str
    vectors: bool
    steps: list[StepSpectrum]

    def to_json(self) -> dict[str, Any]:
        """The ``curvlab spectrum --json`` object (:func:`~.summary.spectrum_summary`)."""
        from curvlab.analysis.spectrum.summary import spectrum_summary

        return spectrum_summary(self)

    def step(self, step: int | str = "latest") -> StepSpectrum:
        """One step's decomposition: a step number or ``"latest"``."""
        if not self.steps:
            raise OptionError("the spectrum holds no step")
        if step == "latest":
            return self.steps[-1]
        for s in self.steps:
            if s.step == step:
                return s
        raise OptionError(f"step {step!r}: not in the spectrum (steps: {[s.step for s in self.steps]})")


def default_output_path(checkpoint: str | os.PathLike) -> str:
    """``x.h5`` -> ``x.spectrum.h5`` next to the input (``.hdf5``/``.hdf`` too; else appended)."""
    return derived_path(checkpoint, ".spectrum.h5")


def _write_layer_attrs(
    g: h5py.Group, module_type: str, weight_shape: tuple[int, ...], has_bias: bool
) -> None:
    g.attrs["module_type"] = module_type
    g.attrs["weight_shape"] = np.asarray(weight_shape, dtype=np.int64)
    g.attrs["has_bias"] = np.bool_(has_bias)


def _write_factor(g: h5py.Group, which: str, eig: FactorEig) -> None:
    """Datasets ``<which>_eigenvalues`` and ``_eigenvectors``/``_order``, and the factor's attrs."""
    g.create_dataset(f"{which}_eigenvalues", data=eig.eigenvalues)
    if eig.kind in ("diagonal", "blocks"):
        g.create_dataset(f"{which}_order", data=eig.order)
    if eig.kind != "diagonal" and eig.eigenvectors is not None:
        g.create_dataset(f"{which}_eigenvectors", data=eig.eigenvectors)
    g.attrs[f"{which}_kind"] = eig.kind
    g.attrs[f"{which}_num_clipped"] = np.int64(eig.num_clipped)
    g.attrs[f"{which}_tolerance"] = float(eig.tolerance)
    g.attrs[f"{which}_num_unresolved"] = np.int64(eig.num_unresolved)
    g.attrs[f"{which}_resolution"] = float(eig.resolution)
    g.attrs[f"{which}_dtype"] = eig.dtype
    g.attrs[f"{which}_device"] = eig.device
    g.attrs[f"{which}_retries"] = json.dumps(list(eig.retries))


def _spectrum_step(
    reader: CheckpointReader,
    steps_group: h5py.Group,
    step: int,
    names: list[str],
    options: dict[str, Any],
) -> StepSpectrum:
    """Decompose one step into ``/steps/<step>`` of the output (``complete`` written last)."""
    attrs = reader.step_attrs(step)
    g = steps_group.create_group(str(step), track_order=True)
    g.attrs["step"] = np.int64(step)
    g.attrs["fisher_type"] = attrs["fisher_type"]
    g.attrs["num_examples"] = np.int64(attrs["num_examples"])
    lg = g.create_group("layers", track_order=True)
    layers: dict[str, LayerSpectrum] = {}
    for name in names:  # groups in the checkpoint's order; datasets arrive as batches finish
        module_type, weight_shape, has_bias = reader.layer_meta(step, name)
        _write_layer_attrs(lg.create_group(name), module_type, weight_shape, has_bias)
        layers[name] = LayerSpectrum(name, module_type, weight_shape, has_bias, np.empty(0), np.empty(0))
    for name, which, eig in _step_factors(reader, step, names, options):
        _write_factor(lg[name], which, eig)
        setattr(layers[name], which, eig.eigenvalues)
        layers[name].num_clipped[which] = eig.num_clipped
        layers[name].num_unresolved[which] = eig.num_unresolved
        layers[name].retries[which] = eig.retries
    result = StepSpectrum(step, attrs["fisher_type"], attrs["num_examples"], list(layers.values()))
    spectrum = result.kronecker(dense_limit=0)
    g.attrs["num_eigenvalues"] = np.int64(spectrum.count)
    g.attrs["num_zeros"] = np.int64(spectrum.num_zeros)
    g.attrs["trace"] = spectrum.trace
    g.attrs["max"] = spectrum.max()
    g.attrs["min_positive"] = spectrum.min_positive() if spectrum.num_positive else math.nan
    g.file.flush()
    g.attrs["complete"] = np.bool_(True)
    return result


def compute_spectrum(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    steps: int | str | Sequence[int] = "latest",
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    vectors: bool = True,
    batch_bytes: int | None = None,
    progress: bool = False,
) -> SpectrumResult:
    """Decompose a factor checkpoint's factors and write the spectrum file (atomically).

    ``steps``: ``"latest"`` (default), ``"all"``, a step number or a list of them. ``layers``:
    fnmatch globs on layer names (each must match some layer). ``output``: default
    :func:`default_output_path`; ``output=""`` writes nothing. It may not be the checkpoint itself.
    The checkpoint is opened read-only and read one layer at a time. Returns every step's
    eigenvalues for the statistics (:func:`step_summary`).

    Under torchrun (an active :mod:`curvlab.distributed` group) with an output file, every process
    must call this with the same arguments: the factors are shared out (module docstring), process
    0 writes the file and returns every step, and each other process returns after sending its
    results, with ``output=None`` and no steps. With ``output=""`` every process decomposes
    everything itself and returns it.
    """
    source = os.fspath(checkpoint)
    _check_dtype_name(dtype)
    dev = _resolve_device(device)
    out = default_output_path(source) if output is None else os.fspath(output)
    if out and same_file(source, out):
        raise OptionError(
            f"{out}: refusing to write the spectrum into the input checkpoint; choose another -o"
        )
    options = dict(device=dev, dtype=dtype, vectors=vectors, batch_bytes=batch_bytes, progress=progress)
    ctx = _process_group()
    if ctx.active and out:
        _check_same_batches(options)
    helper = ctx.active and not ctx.is_main and bool(out)  # sends its share to process 0, writes nothing
    with CheckpointReader(source) as reader:
        if helper:  # the reader scans the steps once: here without the warnings process 0 gives
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteStepWarning)
                reader.step_numbers()
        numbers = _select_steps(reader.step_numbers(), steps, source)
        if ctx.active and out:
            from curvlab import distributed

            distributed.check_same(numbers, f"{source}: the steps to decompose")
        patterns = list(layers) if layers is not None else None
        used: set[str] = set()
        plan = {n: _select_layers(reader.layer_names(n), patterns, used) for n in numbers}
        _check_patterns(source, patterns, used)
        for n, names in plan.items():
            if not names:
                raise OptionError(f"{source}: step {n}: no layer matches --layers {' '.join(patterns or [])}")
            reader.check_layers(n, names)  # a damaged layer fails now, not after the others' work
        if helper:
            for n, names in plan.items():
                _send_share(reader, n, names, options)
            return SpectrumResult(source, None, dev.type, dtype, vectors, [])
        results = _write_spectrum_file(reader, out, plan, options, dtype, vectors) if out else [
            _eigenvalues_only(reader, n, names, options) for n, names in plan.items()
        ]
    return SpectrumResult(source, out or None, dev.type, dtype, vectors, results)


def _write_spectrum_file(
    reader: CheckpointReader, out: str, plan: dict[int, list[str]], options: dict, dtype: str, vectors: bool
) -> list[StepSpectrum]:
    results = []
    try:
        with atomic_output(out) as tmp, h5py.File(tmp, "w-") as f:
            f.attrs["format"] = SPECTRUM_FORMAT
            f.attrs["format_version"] = np.int64(SPECTRUM_FORMAT_VERSION)
            f.attrs["source"] = os.path.abspath(reader.path)
            f.attrs["source_format"] = "curvlab.kfac"
            f.attrs["dtype"] = dtype
            f.attrs["device"] = options["device"].type
            f.attrs["has_eigenvectors"] = np.bool_(vectors)
            if reader.model_name is not None or reader.model_config is not None:
                mg = f.create_group("model")
                if reader.model_name is not None:
                    mg.attrs["name"] = reader.model_name
                if reader.model_config is not None:
                    mg.attrs["config"] = json.dumps(reader.model_config)
            steps_group = f.create_group("steps", track_order=True)
            for n, names in plan.items():
                results.append(_spectrum_step(reader, steps_group, n, names, options))
    except OSError as exc:
        raise CurvlabError(f"{out}: cannot write: {' '.join(str(exc).split())}") from None
    return results


def _eigenvalues_only(reader: CheckpointReader, step: int, names: list[str], options: dict) -> StepSpectrum:
    attrs = reader.step_attrs(step)
    layers = {}
    for name in names:
        module_type, weight_shape, has_bias = reader.layer_meta(step, name)
        layers[name] = LayerSpectrum(name, module_type, weight_shape, has_bias, np.empty(0), np.empty(0))
    opts = dict(options, vectors=False)
    for name, which, eig in decompose_checkpoint(reader, step, names, **opts):
        setattr(layers[name], which, eig.eigenvalues)
        layers[name].num_clipped[which] = eig.num_clipped
        layers[name].num_unresolved[which] = eig.num_unresolved
        layers[name].retries[which] = eig.retries
    return StepSpectrum(step, attrs["fisher_type"], attrs["num_examples"], list(layers.values()))


def spectrum_of_factors(
    factors: Any,
    *,
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    step: int = 0,
) -> SpectrumResult:
    """The eigenvalues of factors held in memory (a :class:`~curvlab.capture.factors.FactorSet` or any
    mapping of layer names to :class:`~curvlab.io.checkpoint.LayerFactors`), as one step of a
    :class:`SpectrumResult` — what :func:`compute_spectrum` gives for a checkpoint, without a file.
    ``layers``: fnmatch globs, each of which must match."""
    _check_dtype_name(dtype)
    dev = _resolve_device(device)
    patterns = list(layers) if layers is not None else None
    used: set[str] = set()
    names = _select_layers(list(factors), patterns, used)
    _check_patterns("factors", patterns, used)
    if not names:
        raise OptionError("no layer to decompose")
    out = {
        n: LayerSpectrum(n, f.module_type, tuple(f.weight_shape), bool(f.has_bias), np.empty(0), np.empty(0))
        for n, f in ((n, factors[n]) for n in names)
    }
    items = (((n, which), getattr(factors[n], which)) for n in names for which in ("S", "A"))
    for (name, which), eig in decompose_factors(items, device=dev, dtype=dtype, vectors=False):
        setattr(out[name], which, eig.eigenvalues)
        out[name].num_clipped[which] = eig.num_clipped
        out[name].num_unresolved[which] = eig.num_unresolved
        out[name].retries[which] = eig.retries
    fisher_type = str(getattr(factors, "fisher_type", ""))
    result = StepSpectrum(step, fisher_type, int(getattr(factors, "num_examples", 0)), list(out.values()))
    return SpectrumResult(None, None, dev.type, dtype, False, [result])


# --------------------------------------------------------------------------------------------------
# Reading eigenvalues back (from a spectrum file, or by decomposing a checkpoint)


def _attr(attrs: h5py.AttributeManager, key: str) -> Any:
    if key not in attrs:
        raise CheckpointError(f"missing attribute {key}")
    return hdf5.scalar(hdf5.attribute(attrs, key, CheckpointError))


def _located_attr(attrs: h5py.AttributeManager, key: str, path: str, step: object = None) -> Any:
    try:
        return _attr(attrs, key)
    except CheckpointError as exc:
        raise CheckpointError(f"{where(path, step)}: {exc}") from None


def _file_format(f: h5py.File, path: str) -> str:
    fmt = _located_attr(f.attrs, "format", path) if "format" in f.attrs else None
    if fmt not in ("curvlab.kfac", SPECTRUM_FORMAT, "curvlab.ekfac"):
        raise CheckpointError(
            f"{path}: not a curvlab checkpoint, spectrum or EKFAC file (root attribute format is {fmt!r})"
        )
    return str(fmt)


def _spectrum_steps(f: h5py.File, path: str) -> list[int]:
    version = _located_attr(f.attrs, "format_version", path)
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > SPECTRUM_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} was written by a newer curvlab (this one reads version "
            f"{SPECTRUM_FORMAT_VERSION}): upgrade curvlab"
        )
    sg = _member(f, "steps", path)
    if not isinstance(sg, h5py.Group):
        raise CheckpointError(f"{path}: missing /steps group")
    complete, incomplete = [], []
    for name in sg:
        if not (name.isdigit() and str(int(name)) == name):
            raise CheckpointError(f"{path}: step group {name!r} is not a step number")
        g = _member(sg, name, path, name)
        if not isinstance(g, h5py.Group):
            raise CheckpointError(f"{where(path, name)}: is not a group")
        if "complete" in g.attrs and bool(_located_attr(g.attrs, "complete", path, name)):
            complete.append(int(name))
        else:
            incomplete.append(int(name))
    if incomplete:
        warn_incomplete(path, sorted(incomplete), stacklevel=4)
    return sorted(complete)


def _member(group: h5py.Group, name: str, path: str, step: object = None, layer: object = None) -> Any:
    """``group[name]`` through links inside the file only (:func:`curvlab.io.hdf5.member`)."""
    try:
        return hdf5.member(group, name, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{where(path, step, layer)}: {exc}") from None


def _read_eigenvalues(lg: h5py.Group, which: str, size: int, budget: ReadBudget) -> np.ndarray:
    ds = hdf5.member(lg, f"{which}_eigenvalues", CheckpointError)
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"missing dataset {which}_eigenvalues")
    if ds.dtype.kind != "f" or ds.ndim != 1 or ds.shape[0] != size:
        raise CheckpointError(
            f"{which}_eigenvalues must be a 1-D float array of length {size}, got {ds.dtype} {ds.shape}"
        )
    vals = np.asarray(hdf5.read_array(ds, f"{which}_eigenvalues", budget, CheckpointError), dtype=np.float64)
    if not np.isfinite(vals).all() or (vals < 0).any():
        raise CheckpointError(f"{which}_eigenvalues must be finite and >= 0")
    if (np.diff(vals) < 0).any():
        raise CheckpointError(f"{which}_eigenvalues are not in ascending order")
    return vals


def _read_spectrum_layers(
    f: h5py.File, path: str, step: int, patterns: Sequence[str] | None, budget: ReadBudget
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    lgroup = _member(_member(_member(f, "steps", path), str(step), path, step), "layers", path, step)
    if not isinstance(lgroup, h5py.Group):
        raise CheckpointError(f"{where(path, step)}: missing layers group")
    used: set[str] = set()
    names = _select_layers(list(lgroup), patterns, used)
    _check_patterns(path, patterns, used)
    out = {}
    for name in names:
        try:
            lg = hdf5.member(lgroup, name, CheckpointError)
            if not isinstance(lg, h5py.Group):
                raise CheckpointError("is not a group")
            module_type, has_bias = _attr(lg.attrs, "module_type"), bool(_attr(lg.attrs, "has_bias"))
            # weight_shape as stored (not collapsed to a scalar: a norm entry's shape has one entry)
            if "weight_shape" not in lg.attrs:
                raise CheckpointError("missing attribute weight_shape")
            shape = hdf5.attribute(lg.attrs, "weight_shape", CheckpointError)
            size_a, size_s = expected_factor_sizes(module_type, shape, has_bias)
            size_a *= block_size(module_type, has_bias) or 1  # a blocks A: C blocks of k eigenvalues
            out[name] = (
                _read_eigenvalues(lg, "S", size_s, budget), _read_eigenvalues(lg, "A", size_a, budget)
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{where(path, step, name)}: {exc}") from None
    return out


def _ekfac_eigenvalues(
    path: str, step: int | str, patterns: Sequence[str] | None
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An EKFAC file's eigenvalues as Kronecker pairs ``(all Λ_ij of the layer, [1])``: the products of
    such a pair are the ``Λ_ij`` themselves, so every statistic of the spectrum applies unchanged."""
    from curvlab.io.ekfac import read_ekfac

    record = read_ekfac(path, step)
    used: set[str] = set()
    names = _select_layers(list(record.layers), patterns, used)
    _check_patterns(path, patterns, used)
    return record.step, {n: (np.sort(record.layers[n].eigenvalues.ravel()), np.ones(1)) for n in names}


def load_layer_eigenvalues(
    path: str | os.PathLike,
    *,
    step: int | str = "latest",
    layers: Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    progress: bool = False,
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(step, {layer: (eigenvalues of S, eigenvalues of A)})``, eigenvalues ascending, float64.

    ``path`` is a factor checkpoint (its factors are decomposed, eigenvalues only, on ``device`` in
    ``dtype``), a spectrum file written by ``curvlab spectrum`` (read), or an EKFAC file written by
    ``curvlab gradcov --ekfac`` (each layer's ``Λ_ij`` as the pair ``(Λ, [1])``). ``step`` is a step number
    or ``"latest"``; ``layers`` fnmatch globs (each must match). A bad or truncated file, a missing
    step or a clearly indefinite factor raise :class:`CheckpointError` (one line).
    """
    path_s = os.fspath(path)
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(step, str) and step not in ("latest", "all"):
        try:
            step = int(step)
        except ValueError:
            raise OptionError(f"step {step!r}: expected a step number or 'latest'") from None
    f, budget = hdf5.open_file(path_s, CheckpointError)
    with f:
        try:
            fmt = _file_format(f, path_s)
            if fmt == "curvlab.ekfac":
                return _ekfac_eigenvalues(path_s, step, layers)
            if fmt == SPECTRUM_FORMAT:
                numbers = _select_steps(_spectrum_steps(f, path_s), step, path_s)
                if len(numbers) != 1:
                    raise OptionError(f"{path_s}: load_layer_eigenvalues reads one step, not {step!r}")
                return numbers[0], _read_spectrum_layers(f, path_s, numbers[0], layers, budget)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            if isinstance(exc, CurvlabError):
                raise
            raise CheckpointError(f"{path_s}: cannot read HDF5 data ({' '.join(str(exc).split())})") from None
    result = compute_spectrum(
        path_s, "", steps=step if step == "latest" else [step], layers=layers, device=device, dtype=dtype,
        vectors=False, progress=progress,
    )
    (only,) = result.steps
    return only.step, {layer.name: (layer.S, layer.A) for layer in only.layers}
