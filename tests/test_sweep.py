"""curvlab sweep: options and bad input, the cadence, the Sobol search, a trial against an independent
re-run, the search bookkeeping, resumption after a SIGKILL, two workers sharing one storage."""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from curvlab.commands import main
from curvlab.errors import OptionError
from curvlab.sweep.config import SweepConfig, evaluation_steps, parse_cadence, parse_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny MLP on 256 digits: a trial of 30 steps takes well under a second on one thread.
TINY = ["--model", "mlp", "--model-arg", "widths=16", "--examples", "256", "--device", "cpu",
        "--threads", "1"]


def small_config(**over) -> SweepConfig:
    base = dict(model="mlp", data="digits", optimizers=["sgd"], batch_sizes=[32, 64], target="loss=1.0",
                trials=4, max_steps=30, seeds=2, model_args={"widths": [16]}, examples=256,
                space={"lr": "0.05:2"})
    base.update(over)
    return SweepConfig(**base).check()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------ options


def test_target_and_cadence_parsing():
    assert parse_target("loss=0.1") == ("loss", 0.1)
    assert parse_target("error=0.05") == ("error", 0.05)
    for bad in ("loss", "acc=0.1", "loss=x", "loss=nan", "error=1.5", "loss=-1"):
        with pytest.raises(OptionError):
            parse_target(bad)
    assert parse_cadence("50") == ("every", 50.0)
    assert parse_cadence("5%") == ("geometric", 0.05)
    for bad in ("0", "x", "0%", "200%"):
        with pytest.raises(OptionError):
            parse_cadence(bad)


def test_evaluation_steps():
    assert evaluation_steps(10, "3") == [3, 6, 9, 10]
    steps = evaluation_steps(1000, "10%")
    assert steps[:10] == list(range(1, 11)) and steps[-1] == 1000
    # consecutive checks are at most 10 % (rounded up) apart: the measured steps overshoot by at most that
    for a, b in zip(steps, steps[1:-1], strict=False):
        assert b - a <= max(1, -(-a // 10))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "sgd,rmsprop", "--batch-sizes", "32"], "unknown optimizer 'rmsprop'"),
        (["--optimizers", "sgd", "--batch-sizes", ""], "--batch-sizes"),
        (["--optimizers", "sgd", "--batch-sizes", "32,,64"], "--batch-sizes"),
        (["--optimizers", "sgd", "--batch-sizes", "32,32"], "listed twice"),
        (["--optimizers", "sgd", "--batch-sizes", "4096"], "exceeds the 256 training examples"),
        (["--optimizers", "sgd", "--batch-sizes", "32", "--space", "sgd.damping=1e-3"],
         "no parameter 'damping'"),
        (["--optimizers", "sgd", "--batch-sizes", "32", "--space", "lr=2:1"], "LOW <= HIGH"),
        (["--optimizers", "sgd", "--batch-sizes", "32", "--target", "acc=1"], "--target"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--trials", "2", "--max-steps", "5", "-o", str(out), *argv]
    if "--target" not in argv:
        args += ["--target", "loss=0.1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curvlab: error:") and message in err and "\n" not in err
    assert not (out / "results.json").exists()


def test_existing_sweep_needs_resume_and_same_options(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sweep", *TINY, "--optimizers", "sgd", "--batch-sizes", "32", "--target", "loss=0.0",
            "--trials", "1", "--max-steps", "3", "--seeds", "1", "-o", str(out), "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds a sweep already" in capsys.readouterr().err
    changed = [a if a != "3" else "4" for a in argv] + ["--resume"]
    assert main(changed) == 2
    assert "max_steps" in capsys.readouterr().err
    # options from the storage
    assert main(["sweep", "--resume", "-o", str(out), "--json", "--threads", "1"]) == 0


# ------------------------------------------------------------------------------------ search space


def test_sobol_sampler_gives_trial_n_the_nth_point(tmp_path):
    import math

    import optuna

    from curvlab.sweep.space import make_sampler, sobol_point

    names = ["lr", "final_lr_factor"]
    study = optuna.create_study(sampler=make_sampler(names, seed=7))
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 10, log=True)
                   + t.suggest_float("final_lr_factor", 1e-3, 1, log=True), n_trials=5)
    for trial in study.trials:
        u = sobol_point(2, trial.number, 7)
        assert math.log(trial.params["lr"]) == pytest.approx(math.log(1e-3) + u[0] * math.log(1e4), rel=1e-12)
        assert math.log(trial.params["final_lr_factor"]) == pytest.approx(math.log(1e-3) * (1 - u[1]),
                                                                          rel=1e-12)
    assert len({t.params["lr"] for t in study.trials}) == 5


def test_space_overrides_and_fields():
    from curvlab.sweep.space import space_for, to_train_fields

    space = space_for("kfac", {"lr": "0.01:0.1", "kfac.lr": "0.02:0.2", "one_minus_momentum": "0.1"})
    assert (space["lr"].low, space["lr"].high) == (0.02, 0.2)  # OPT.NAME wins
    assert space["one_minus_momentum"].fixed
    params = {"lr": 0.1, "decay_fraction": 0.5, "one_minus_momentum": 0.1, "damping": 1e-3}
    fields = to_train_fields(params, 40)
    assert fields == {"schedule": "linear-decay", "lr": 0.1, "decay_steps": 20, "momentum": 0.9,
                      "damping": 1e-3}


# ------------------------------------------------------------------------------------ one trial


def test_trial_stops_at_the_first_checked_step_without_using_the_future():
    """An independent re-run: train the same configuration for the whole budget through the same
    update generator, evaluate at every checked step, and find the first one under the threshold."""
    import torch

    from curvlab.optim.train import prepare, updates
    from curvlab.sweep.trial import Evaluator, load_splits, run_trial, train_config

    torch.set_num_threads(1)
    config = small_config(target="loss=1.2", max_steps=40, eval_every="4")
    fields = {"schedule": "linear-decay", "lr": 0.5, "decay_steps": 30, "final_lr_factor": 0.1}
    result = run_trial(config, "sgd", 32, fields, seed=3)
    assert result.outcome == "reached"
    run = prepare(train_config(config, "sgd", 32, fields, 3), "cpu", data=load_splits(config)[0])
    evaluate = Evaluator(config, load_splits(config)[1])
    metrics = {t: evaluate(run.model, torch.device("cpu")) for t, _, _ in updates(run) if t % 4 == 0}
    first = min(t for t, m in metrics.items() if m <= 1.2)
    assert result.steps == first
    assert result.curve[-1] == (first, pytest.approx(metrics[first], rel=1e-6))
    assert all(m > 1.2 for t, m in metrics.items() if t < first)


def test_unreachable_target_spends_the_budget_and_says_so():
    from curvlab.sweep.trial import run_trial

    result = run_trial(small_config(target="loss=0.0", max_steps=7), "sgd", 32,
                       {"schedule": "constant", "lr": 0.1}, seed=0)
    assert (result.outcome, result.steps, result.updates) == ("not reached", None, 7)
    diverged = run_trial(small_config(max_steps=20), "sgd", 32, {"schedule": "constant", "lr": 1e20}, seed=0)
    assert diverged.outcome == "diverged" and diverged.steps is None


def test_outputs_gone_non_finite_inside_an_update_are_a_divergence():
    """The loss's check raises NonFiniteOutputError when an update left NaN weights (seen in a
    simple_cnn sweep with momentum); the trial ends as diverged instead of the sweep dying."""
    import math

    from curvlab.errors import NonFiniteOutputError
    from curvlab.sweep.trial import _finite_updates

    def steps():
        yield 1, 0.5, 0.1
        yield 2, 0.4, 0.1
        raise NonFiniteOutputError("the model's outputs hold NaN or infinite values")

    out = list(_finite_updates(steps()))
    assert out[:2] == [(1, 0.5, 0.1), (2, 0.4, 0.1)]
    assert out[2][0] == 3 and math.isnan(out[2][1])


# ------------------------------------------------------------------------------------ bookkeeping


def _storage(folder):
    from curvlab.sweep.study import default_storage, open_storage

    return open_storage(default_storage(str(folder)), 30)


def test_search_bookkeeping(tmp_path):
    from curvlab.sweep import sweep
    from curvlab.sweep.results import load_results
    from curvlab.sweep.study import cell_state

    config = small_config(optimizers=["sgd", "adam"], space={"sgd.lr": "0.05:2", "adam.lr": "3e-3:0.1"})
    results = sweep(config, str(tmp_path / "s"), threads=1, replicates=50)
    assert results == load_results(tmp_path / "s" / "results.json")
    assert results["complete"]
    storage = _storage(tmp_path / "s")
    for opt in ("sgd", "adam"):
        for cell in results["optimizers"][opt]["cells"]:
            state = cell_state(storage, opt, cell["batch_size"])
            assert cell["trials"] == len(state.complete) == 4 and state.running == state.waiting == 0
            reached = [t for t in state.complete if t.user_attrs["outcome"] == "reached"]
            assert cell["reached"] == len(reached)
            if not reached:
                assert cell["best"] is None and cell["steps"] is None
                continue
            # the best trial: fewest steps; its value is its steps; seeds re-run its exact parameters
            best = min(reached, key=lambda t: (t.user_attrs["steps"], t.user_attrs["metric"], t.number))
            assert cell["best"]["trial"] == best.number and best.value == best.user_attrs["steps"]
            runs = sorted(state.seed_trials, key=lambda t: t.params["seed_index"])
            assert [t.params["seed_index"] for t in runs] == [1, 2]
            assert [t.user_attrs["seed"] for t in runs] == [1, 2] == cell["seeds"]["seeds"]
            for t in runs:
                assert {k: v for k, v in t.params.items() if k != "seed_index"} == best.params
            steps = [t.user_attrs["steps"] for t in runs]
            assert cell["seeds"]["steps"] == steps
            if None not in steps:
                assert cell["steps"] == sum(steps) / 2
            # a search trial's outcome agrees with its value and its evaluations
            for t in state.complete:
                reached_at = [s for s, m in t.user_attrs["curve"] if m is not None and m <= 1.0]
                if t.user_attrs["outcome"] == "reached":
                    assert t.user_attrs["steps"] == reached_at[0] == t.user_attrs["curve"][-1][0]
                else:
                    assert not reached_at and t.value == float("inf")
    assert (tmp_path / "s" / "steps.png").stat().st_size > 0


def test_unreachable_target_is_a_clear_result(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sweep", *TINY, "--optimizers", "sgd", "--batch-sizes", "32,64", "--target", "loss=0",
            "--trials", "2", "--max-steps", "5", "--seeds", "1", "-o", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["optimizers"]["sgd"]["steps"] == [None, None]
    assert summary["optimizers"]["sgd"]["reached"] == ["0/2", "0/2"]
    results = json.loads((out / "results.json").read_text())
    assert "error" in results["optimizers"]["sgd"]["fit"] and results["complete"]


# ------------------------------------------------------------------------------------ resumption


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


_OPENED: dict = {}


def _search_trials(folder, name="sgd/B=32/search", cached=False):
    """The search study's trials (``cached``: one storage per folder, opened once, for fast polls)."""
    from optuna.trial import TrialState

    if not (folder / "study.db").exists():
        return [], TrialState
    storage = _OPENED.setdefault(folder, _storage(folder)) if cached else _storage(folder)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return [], TrialState
    return storage.get_all_trials(study_id), TrialState


def test_sigkill_then_resume(tmp_path):
    """Killed in the middle of a trial: the finished trials are kept as they are, the killed one is
    failed by heartbeat and retried with the same parameters, and only complete trials count."""
    out = tmp_path / "s"
    # target loss=0 is never reached: a trial runs its whole budget (~2-4 s) unless it diverges (then it
    # ends at once). The kill comes after two complete trials, early in a running one (within half the
    # longest finished trial's time). The poll's view can still be older than the signal (the trial may
    # diverge or finish in between, under load): then the sweep is resumed and killed again, at most
    # three times.
    argv = [sys.executable, "-m", "curvlab", "sweep", *TINY, "--optimizers", "sgd", "--batch-sizes", "32",
            "--target", "loss=0", "--trials", "8", "--max-steps", "200", "--seeds", "1", "--heartbeat", "1",
            "--eval-every", "10", "-o", str(out), "--quiet"]

    def early_in_a_trial_after_two():
        trials, state = _search_trials(out, cached=True)
        done = [t for t in trials if t.state == state.COMPLETE]
        running = [t for t in trials if t.state == state.RUNNING and t.datetime_start is not None]
        if not (2 <= len(done) <= 6 and running):
            return False
        longest = max((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
        elapsed = (datetime.datetime.now() - running[0].datetime_start).total_seconds()
        return elapsed < 0.5 * longest

    for attempt in range(3):
        proc = subprocess.Popen([*argv, *(["--resume"] if attempt else [])], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait(lambda p=proc: p.poll() is not None or early_in_a_trial_after_two(), 240,
                  "two complete trials and one early in its run")
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        before, state = _search_trials(out)
        killed = [t for t in before if t.state == state.RUNNING]
        if killed:
            break
    finished = {t.number: (t.params, t.datetime_complete) for t in before if t.state == state.COMPLETE}
    assert len(killed) == 1 and 2 <= len(finished) <= 7, [(t.number, t.state.name) for t in before]
    # the killed trial's point: what it recorded, and (killed between two suggestions) what it had not
    # yet, drawn by the retry from the same Sobol point
    from curvlab.sweep.space import sobol_point, space_for, study_seed
    from curvlab.sweep.study import search_name

    space = {n: p for n, p in space_for("sgd", {}).items() if not p.fixed}
    point = sobol_point(len(space), killed[0].number, study_seed(search_name("sgd", 32)))
    killed_point = {
        n: math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low)))
        for (n, p), u in zip(space.items(), point, strict=True)
    }
    assert all(killed_point[n] == pytest.approx(v, rel=1e-12) for n, v in killed[0].params.items())

    resumed = subprocess.run([*argv, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after, state = _search_trials(out)
    by_number = {t.number: t for t in after}
    for number, (params, completed) in finished.items():  # not redone
        assert by_number[number].state == state.COMPLETE
        assert (by_number[number].params, by_number[number].datetime_complete) == (params, completed)
    assert by_number[killed[0].number].state == state.FAIL  # never counted
    retry = [t for t in after if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retry) == 1 and retry[0].state == state.COMPLETE
    assert {n: retry[0].params[n] for n in killed[0].params} == killed[0].params  # exactly as recorded
    assert retry[0].params == pytest.approx(killed_point, rel=1e-12)  # the rest from the same point
    complete = [t for t in after if t.state == state.COMPLETE]
    assert len(complete) == 8
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["optimizers"]["sgd"]["cells"][0]["trials"] == 8


def test_two_workers_share_one_storage(tmp_path):
    """A sweep and a --worker started on the same folder: one study, every point once, both worked."""
    out = tmp_path / "s"
    argv = [sys.executable, "-m", "curvlab", "sweep", *TINY, "--optimizers", "sgd", "--batch-sizes", "32,64",
            "--target", "loss=0.0", "--trials", "6", "--max-steps", "400", "--seeds", "2",
            "--eval-every", "100",
            "-o", str(out), "--quiet", "--space", "lr=0.05:2"]
    main_proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (out / "study.db").exists() and _search_trials(out)[0], 120, "the sweep to start")
    worker = subprocess.run([sys.executable, "-m", "curvlab", "sweep", "--worker", "-o", str(out), "--quiet",
                             "--threads", "1"], env=_env(), capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr
    stdout, stderr = main_proc.communicate(timeout=300)
    assert main_proc.returncode == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    workers = set()
    for b in (32, 64):
        trials, state = _search_trials(out, f"sgd/B={b}/search")
        complete = [t for t in trials if t.state == state.COMPLETE]
        # two workers may both start the last trial: at most one extra, never fewer
        assert 6 <= len(complete) <= 7
        assert len({t.number for t in complete}) == len(complete)
        assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == len(complete)
        workers |= {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2


# ------------------------------------------------------------------------------------ recorded factories


def test_a_recorded_factory_runs_only_when_named(tmp_path, capsys):
    """A study database is a file (or a server) someone else may have written: a factory spec it
    records is code. --resume and --worker refuse it unless the user names the same factory, and the
    factory is not run (its marker file stays absent)."""
    from curvlab.sweep.study import store_config

    marker = tmp_path / "ran"
    factory = tmp_path / "evil.py"
    factory.write_text(f"open({str(marker)!r}, 'w').close()\ndef build(**kw):\n    raise SystemExit(3)\n")
    folder = tmp_path / "sweep"
    folder.mkdir()
    spec = f"{factory}:build"
    store_config(_storage(folder), SweepConfig(**{**small_config().to_json(), "model": spec,
                                                  "model_args": {"width": 4}}))
    for argv in (["sweep", "--resume", "-o", str(folder)], ["sweep", "--worker", "-o", str(folder)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not run on a file's say-so" in err[0]
        assert "--model-arg width=4" in err[0]
    capsys.readouterr()
    assert main(["sweep", "--worker", "-o", str(folder), "--model", spec]) == 2  # named, other arguments
    assert "must name the same" in capsys.readouterr().err
    assert not marker.exists()
