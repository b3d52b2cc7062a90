"""One invocation of ``curvlab sweep``: open the study database, run workers, write the results.

:func:`sweep` is the library entry point of the command: it records the configuration in the storage
(or checks it against the recorded one), validates the model and data once before any trial, runs
the trials (:func:`curvlab.sweep.study.work` in this process, or ``workers`` processes, each with ``threads``
torch threads: by default the cores this process may
use divided by ``workers``, so that the workers do not oversubscribe them), then writes
``SWEEP/results.json`` (:mod:`curvlab.sweep.results`) and the plot. :func:`join` is ``--worker``: it
runs trials of a sweep found in the storage and writes nothing else.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from curvlab.errors import OptionError
from curvlab.sweep import study as st
from curvlab.sweep.config import SweepConfig
from curvlab.sweep.results import RESULTS_FILE, collect, write_results

PLOT_FILE = "steps.png"


def validate(config: SweepConfig) -> None:
    """Fail before any trial on a bad model, model argument, data source or batch size."""
    import torch

    from curvlab.models import build_model
    from curvlab.sweep.trial import load_splits

    train, held_out = load_splits(config)
    largest = max(config.batch_sizes)
    if largest > len(train):
        raise OptionError(f"--batch-sizes: {largest} exceeds the {len(train)} training examples of "
                          f"{config.data}")
    with torch.random.fork_rng(devices=[]):
        build_model(config.model, train.input_shape, train.num_classes, config.model_args)
    if len(held_out) == 0:
        raise OptionError(f"{config.data}: the {config.split} split is empty; choose --eval-split train")


def _run(storage, url: str, config: SweepConfig, *, workers: int, heartbeat: int, device: str,
         show_progress: bool, threads: int | None) -> None:
    import torch

    show = st.show_progress(show_progress)
    threads = threads or st.threads_per_worker(workers)
    if workers == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            st.work(storage, config, device=device, on_trial=lambda: show(st.progress(storage, config)))
        finally:
            torch.set_num_threads(before)
    else:
        st.run_workers(url, config, storage, workers=workers, heartbeat=heartbeat, device=device, show=show,
                       threads=threads)
    if show_progress:
        print(file=sys.stderr)


def check_named(config: SweepConfig, named: dict[str, Any], where: str) -> None:
    """A sweep read from a storage may be hostile: a model or data factory it records (code to run,
    :mod:`curvlab.usercode`) is used only when the user names it, with the same arguments, on this
    command line (``named``: ``model``, ``model_args``, ``data``); registry models and built-in data
    need nothing."""
    from curvlab.errors import DataError, ModelError
    from curvlab.usercode import is_data_factory_spec, is_factory_spec, require_named

    if is_factory_spec(config.model):
        require_named(config.model, named.get("model"), where, args=config.model_args, error=ModelError)
        if named["model"] != config.model or (named.get("model_args") or {}) != (config.model_args or {}):
            raise ModelError(f"{where}: records the factory {config.model} with its arguments; --model and "
                             "--model-arg must name the same")
    if is_data_factory_spec(config.data):
        require_named(str(config.data), named.get("data"), where, option="--data", error=DataError)
        if named["data"] != config.data:
            raise DataError(f"{where}: records the data factory {config.data}; --data must name the same")


def sweep(
    config: SweepConfig | None,
    sweep_dir: str,
    *,
    storage_url: str | None = None,
    resume: bool = False,
    workers: int = 1,
    heartbeat: int = st.DEFAULT_HEARTBEAT,
    device: str = "cpu",
    plot: str | None = None,
    progress: bool = False,
    replicates: int = 1000,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep in ``sweep_dir`` and return its results (also in ``results.json``).

    ``config`` may be None with ``resume``: the storage's recorded configuration is used. Without
    ``resume`` a storage that already holds a sweep is an error; with it, a given ``config`` must
    equal the recorded one.
    """
    sweep_dir = os.path.abspath(sweep_dir)
    parent = os.path.dirname(sweep_dir)
    if not os.path.isdir(parent):
        raise OptionError(f"{sweep_dir}: cannot create the sweep folder: {parent} does not exist")
    if workers < 1:
        raise OptionError(f"--workers must be a positive integer, got {workers}")
    os.makedirs(sweep_dir, exist_ok=True)
    url = storage_url or st.default_storage(sweep_dir)
    storage = st.open_storage(url, heartbeat)
    stored = st.read_config(storage)
    if stored is not None and not resume:
        raise OptionError(f"{st._redact(url)}: holds a sweep already (pass --resume to continue it, or "
                          "choose another -o/--storage)")
    if stored is None and config is None:
        raise OptionError(f"{st._redact(url)}: holds no sweep to resume; give --model, --optimizers, "
                          "--batch-sizes, --target, --trials and --max-steps to start one")
    if stored is not None and config is not None and stored.to_json() != config.to_json():
        diff = [k for k, v in config.to_json().items() if stored.to_json().get(k) != v]
        raise OptionError(f"{st._redact(url)}: --resume with options that differ from the recorded sweep "
                          f"({', '.join(diff)})")
    if config is None:  # the recorded sweep's factories run only when the user names them
        check_named(stored, {}, st._redact(url))
    config = stored or config
    config.check()
    validate(config)
    st.store_config(storage, config)
    _run(storage, url, config, workers=workers, heartbeat=heartbeat, device=device, show_progress=progress,
         threads=threads)
    results = collect(storage, config, url=url, replicates=replicates)
    write_results(os.path.join(sweep_dir, RESULTS_FILE), results)
    from curvlab.plots import save_figure
    from curvlab.plots.sweep import plot_sweep

    save_figure(plot_sweep(results), plot or os.path.join(sweep_dir, PLOT_FILE))
    return results


def join(storage_url: str, *, workers: int = 1, heartbeat: int = st.DEFAULT_HEARTBEAT, device: str = "cpu",
         progress: bool = False, threads: int | None = None,
         named: dict[str, Any] | None = None) -> st.Progress:
    """``--worker``: run trials of the sweep recorded at ``storage_url`` until none is left to start.
    ``named``: the ``model``, ``model_args`` and ``data`` the user gave, required for a factory the
    sweep records (:func:`check_named`)."""
    storage = st.open_storage(storage_url, heartbeat)
    config = st.read_config(storage)
    if config is None:
        raise OptionError(f"{st._redact(storage_url)}: holds no curvlab sweep to join")
    check_named(config, named or {}, st._redact(storage_url))
    validate(config)
    _run(storage, storage_url, config, workers=workers, heartbeat=heartbeat, device=device,
         show_progress=progress, threads=threads)
    return st.progress(storage, config)
