"""The sweep on Optuna: one study per (optimizer, batch size) in one storage, workers that share it.

**Storage.** An Optuna ``RDBStorage``: by default the SQLite file ``SWEEP/study.db``, or any RDB URL
(``--storage postgresql://…``) that workers on several machines reach. It holds

* the study ``curvlab-sweep`` whose user attribute ``config`` is the :class:`SweepConfig` (a
  ``--worker`` reads it from there);
* per (optimizer, batch size) the study ``OPT/B=B/search``: the quasi-random search
  (:mod:`curvlab.sweep.space`), one trial per hyper-parameter point at the base seed, its value the
  steps to the target (``inf`` when not reached) and its user attributes the :class:`TrialResult`;
* and ``OPT/B=B/seeds``: the best search point re-run at seeds ``seed + 1 … seed + K`` (fresh seeds,
  so the reported steps are not biased by having been selected as the best).

**Workers.** :func:`work` takes up the cells in order; in each it runs one trial at a time through
``study.optimize(n_trials=1)``: a search trial while fewer than ``trials`` are complete, running or
queued (a queued retry first), then, once the search is complete, the seed runs, which are trials
queued with ``enqueue_trial(params + seed_index, skip_if_exists=True)`` (marked by the user
attribute ``seed_run``) — Optuna's own queue. A worker
that finds nothing to start but trials still running elsewhere waits and polls. There is no scheduler
of our own: what runs next is whatever the storage says is missing.

**Killed workers.** The storage runs Optuna's heartbeat (``heartbeat_interval``, ``grace_period =
2 × heartbeat_interval``): a trial whose worker stopped beating is failed by the next worker that
looks (``fail_stale_trials``, also called while polling) and ``RetryHeartbeatStaleTrialCallback`` queues a
copy with the same parameters, which the next free worker runs. Only ``COMPLETE`` trials count
anywhere, so a half-finished trial is never counted and a finished one is never redone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curvlab.errors import CurvlabError, OptionError
from curvlab.sweep.config import SweepConfig

CONFIG_STUDY = "curvlab-sweep"
STUDY_FILE = "study.db"
#: Seconds between heartbeats of a running trial; a trial silent for twice this is failed and retried.
DEFAULT_HEARTBEAT = 30
#: Retries of a trial whose worker died (a trial that kills its worker every time stops being retried).
MAX_RETRY = 3


def default_storage(sweep_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(sweep_dir, STUDY_FILE))


def search_name(optimizer: str, batch_size: int) -> str:
    return f"{optimizer}/B={batch_size}/search"


def seeds_name(optimizer: str, batch_size: int) -> str:
    return f"{optimizer}/B={batch_size}/seeds"


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT):
    """The RDB storage at ``url`` with heartbeats and retries of trials whose worker died."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    _quiet_optuna()
    # the heartbeat and its retry callback are marked experimental (since Optuna 2.8): say it once here
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine = {"connect_args": {"timeout": 600}}  # workers wait for each other's writes
    for attempt in range(5):
        try:
            retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                              grace_period=2 * heartbeat, heartbeat_stale_trial_callback=retry)
        except Exception as exc:  # noqa: BLE001 (SQLAlchemy's, Optuna's: a bad URL, no driver, no server)
            if "already exists" in str(exc) and attempt < 4:
                time.sleep(0.5)  # another process was creating the tables of a new database: open it again
                continue
            where = _redact(url)
            raise OptionError(f"--storage {where}: cannot open the study database ({_first(exc)})") from None
    raise AssertionError("unreachable")


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _redact(url: str) -> str:
    """A storage URL without its password, for messages and results."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def store_config(storage, config: SweepConfig) -> SweepConfig:
    """Record ``config`` in the storage, or check it equals the one recorded; returns the recorded one."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=CONFIG_STUDY)
        study.set_user_attr("config", config.to_json())
        return config
    except optuna.exceptions.DuplicatedStudyError:
        pass
    stored = read_config(storage)
    if stored is None:  # a process died between creating the study and recording the configuration
        optuna.load_study(study_name=CONFIG_STUDY, storage=storage).set_user_attr("config", config.to_json())
        return config
    if stored.to_json() != config.to_json():
        diff = [k for k, v in config.to_json().items() if stored.to_json().get(k) != v]
        raise OptionError(
            f"the study database holds a sweep with other options ({', '.join(diff)} differ); "
            "pass --resume to continue it with its own options, or choose another -o/--storage")
    return stored


def read_config(storage) -> SweepConfig | None:
    """The sweep configuration recorded in the storage, or None when there is none."""
    import optuna

    try:
        study = optuna.load_study(study_name=CONFIG_STUDY, storage=storage)
    except KeyError:
        return None
    data = study.user_attrs.get("config")
    return None if data is None else SweepConfig.from_json(data, "the study database")


# ------------------------------------------------------------------------------------ state


@dataclass
class CellState:
    """What the storage holds for one (optimizer, batch size)."""

    optimizer: str
    batch_size: int
    complete: list  # FrozenTrial, search trials that finished
    running: int
    waiting: int
    seed_trials: list  # FrozenTrial, COMPLETE seed runs
    seeds_running: int
    seeds_waiting: int

    @property
    def reached(self) -> list:
        return [t for t in self.complete if t.user_attrs.get("outcome") == "reached"]


def _trials(storage, name: str) -> list:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def cell_state(storage, optimizer: str, batch_size: int) -> CellState:
    from optuna.trial import TrialState

    search = _trials(storage, search_name(optimizer, batch_size))
    seeds = _trials(storage, seeds_name(optimizer, batch_size))

    def count(trials, state):
        return sum(1 for t in trials if t.state == state)

    return CellState(
        optimizer, batch_size,
        complete=[t for t in search if t.state == TrialState.COMPLETE],
        running=count(search, TrialState.RUNNING), waiting=count(search, TrialState.WAITING),
        seed_trials=[t for t in seeds if t.state == TrialState.COMPLETE and "seed_index" in t.params],
        seeds_running=count(seeds, TrialState.RUNNING), seeds_waiting=count(seeds, TrialState.WAITING),
    )


def best_trial(state: CellState):
    """The search trial that reached the target in the fewest steps (ties: the lower metric at that
    step, then the lower trial number), or None when none reached it."""
    reached = state.reached
    if not reached:
        return None
    return min(reached, key=lambda t: (t.user_attrs["steps"], t.user_attrs.get("metric") or 0.0, t.number))


def search_done(state: CellState, config: SweepConfig) -> bool:
    return len(state.complete) >= config.trials and state.running == 0 and state.waiting == 0


def seeds_done(state: CellState, config: SweepConfig) -> bool:
    have = {int(t.params["seed_index"]) for t in state.seed_trials}
    return set(range(1, config.seeds + 1)) <= have


def cell_done(state: CellState, config: SweepConfig) -> bool:
    if not search_done(state, config):
        return False
    return best_trial(state) is None or seeds_done(state, config)


@dataclass
class Progress:
    """Trials done (complete), running and reached the target, over every study of the sweep."""

    done: int
    running: int
    reached: int
    cells_done: int
    cells: int

    def line(self) -> str:
        return (f"sweep: {self.done} trials done, {self.running} running, {self.reached} reached the target; "
                f"{self.cells_done}/{self.cells} (optimizer, batch size) cells finished")


def progress(storage, config: SweepConfig) -> Progress:
    done = running = reached = finished = 0
    for opt, b in config.cells():
        s = cell_state(storage, opt, b)
        done += len(s.complete) + len(s.seed_trials)
        running += s.running + s.seeds_running
        reached += len(s.reached) + sum(1 for t in s.seed_trials if t.user_attrs.get("outcome") == "reached")
        finished += cell_done(s, config)
    return Progress(done, running, reached, finished, len(config.cells()))


# ------------------------------------------------------------------------------------ workers


def _objective(config: SweepConfig, optimizer: str, batch_size: int, device, data, *, seeds: bool):
    """The Optuna objective of a search (``seeds=False``) or seed-run study of one cell."""
    import optuna

    from curvlab.sweep.space import space_for, to_train_fields
    from curvlab.sweep.trial import run_trial

    space = space_for(optimizer, config.space)

    def objective(trial) -> float:
        if seeds and not trial.user_attrs.get("seed_run"):
            # a worker raced another to the last queued seed run and got a fresh trial: not a seed run
            raise optuna.TrialPruned("no queued seed run")
        params: dict[str, float] = {}
        for name, p in space.items():
            params[name] = p.low if p.fixed else trial.suggest_float(name, p.low, p.high, log=True)
        seed = config.seed
        if seeds:
            seed = config.seed + trial.suggest_int("seed_index", 1, max(config.seeds, 1))
        fields = to_train_fields(params, config.max_steps)
        trial.set_user_attr("train", {k: v for k, v in fields.items()})
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        result = run_trial(config, optimizer, batch_size, fields, seed, device=device, data=data)
        for key, value in result.to_attrs().items():
            trial.set_user_attr(key, value)
        return float(result.steps) if result.reached else float("inf")

    return objective


def _run_one(storage, name: str, objective, sampler=None) -> None:
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                direction="minimize")
    study.optimize(objective, n_trials=1, catch=())


def _queue_seeds(storage, config: SweepConfig, state: CellState) -> None:
    import optuna

    best = best_trial(state)
    study = optuna.create_study(storage=storage, study_name=seeds_name(state.optimizer, state.batch_size),
                                load_if_exists=True, direction="minimize")
    taken = {int(t.params["seed_index"]) for t in study.get_trials(deepcopy=False) if "seed_index" in t.params
             and t.state.name in ("COMPLETE", "RUNNING", "WAITING")}
    for k in range(1, config.seeds + 1):
        if k not in taken:
            study.enqueue_trial({**best.params, "seed_index": k}, user_attrs={"seed_run": True},
                                skip_if_exists=True)


def _fail_stale(storage, config: SweepConfig) -> None:
    import optuna

    for opt, b in config.cells():
        for name in (search_name(opt, b), seeds_name(opt, b)):
            try:
                optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=storage))
            except KeyError:
                continue


def work(
    storage,
    config: SweepConfig,
    *,
    device: str = "cpu",
    poll: float = 2.0,
    on_trial: Callable[[], None] | None = None,
    wait_for_others: bool = True,
) -> None:
    """Run trials until every cell of the sweep is finished (module doc).

    ``on_trial`` is called after every trial this worker runs (progress). With ``wait_for_others``
    False the worker returns as soon as nothing is left to start (trials may still run elsewhere).
    """
    from curvlab.sweep.space import make_sampler, space_for, study_seed
    from curvlab.sweep.trial import load_splits

    data = load_splits(config)
    while True:
        started = False
        unfinished = False
        for opt, b in config.cells():
            state = cell_state(storage, opt, b)
            if cell_done(state, config):
                continue
            unfinished = True
            if len(state.complete) + state.running + state.waiting < config.trials or state.waiting:
                names = [n for n, p in space_for(opt, config.space).items() if not p.fixed]
                name = search_name(opt, b)
                sampler = make_sampler(names, study_seed(name))
                _run_one(storage, name, _objective(config, opt, b, device, data, seeds=False), sampler)
                started = True
                break
            if not search_done(state, config):
                continue  # the last search trials run elsewhere
            _queue_seeds(storage, config, state)
            state = cell_state(storage, opt, b)
            if state.seeds_waiting:
                _run_one(storage, seeds_name(opt, b), _objective(config, opt, b, device, data, seeds=True))
                started = True
                break
        if started:
            if on_trial is not None:
                on_trial()
            continue
        if not unfinished or not wait_for_others:
            return
        _fail_stale(storage, config)
        time.sleep(poll)


def worker_main(url: str, heartbeat: int, device: str, threads: int) -> None:
    """A worker process of ``--workers N``: ``threads`` torch threads, then :func:`work`."""
    import torch

    _die_with_parent()
    torch.set_num_threads(threads)
    storage = open_storage(url, heartbeat)
    config = read_config(storage)
    if config is None:
        raise CurvlabError(f"{_redact(url)}: holds no curvlab sweep")
    work(storage, config, device=device)


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it dies (a killed sweep stops
    whole; its running trials are then failed and retried by heartbeat as usual)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover (not Linux)
        pass


def threads_per_worker(workers: int) -> int:
    """Cores available to this process divided among ``workers`` (at least 1 each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def run_workers(url: str, config: SweepConfig, storage, *, workers: int, heartbeat: int, device: str,
                show: Callable[[Progress], None] | None = None, poll: float = 1.0,
                threads: int | None = None) -> None:
    """``workers`` processes running :func:`worker_main` on one machine; returns when all have ended.

    The first error of a worker (a :class:`CurvlabError` keeps its one-line message) is raised here.
    """
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = threads or threads_per_worker(workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(worker_main, url, heartbeat, device, threads) for _ in range(workers)]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=poll, return_when=FIRST_EXCEPTION)
            if show is not None:
                show(progress(storage, config))
            for future in finished:
                exc = future.exception()
                if exc is not None:
                    for other in pending:
                        other.cancel()
                    raise exc


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def show_progress(enabled: bool) -> Callable[[Progress], None]:
    """A progress line on stderr, rewritten in place, when ``enabled`` (stderr is a terminal)."""

    def show(p: Progress) -> None:
        if enabled:
            print("\r" + p.line(), end="", file=sys.stderr, flush=True)

    return show
