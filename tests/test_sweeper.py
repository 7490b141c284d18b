"""The sweeper past a plain loop: pruning, resume after a kill, parallel and cooperating processes, failures."""

import signal
import time
from types import SimpleNamespace
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import FAST, journal_study, run_kdsweep, runs_of_role, start_kdsweep, wait_for_success

STUDY = "test-study"


def write_sweep(tmp_path: Path, name: str, sweeper: dict) -> list[str]:
    """Write a sweep definition into an extra config folder; return the arguments that select it."""
    folder = tmp_path / "extra" / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    definition = {"hydra": {"mode": "MULTIRUN", "sweeper": {"study_name": STUDY, **sweeper}}}
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(definition))
    return ["-cd", str(tmp_path / "extra"), f"sweep={name}"]


def load_study(tmp_path: Path) -> optuna.Study:
    return journal_study(tmp_path, STUDY)


def student_runs(tmp_path: Path) -> list:
    return runs_of_role(f"sqlite:///{tmp_path / 'mlflow.db'}", "student")


def test_pruner_stops_badly_learning_trial(kdsweep, tmp_path, tracking_uri):
    arguments = write_sweep(tmp_path, "prune", {
        "n_trials": 3,
        "params": {"student.optimizer.lr": "choice(0.003, 0.004, 0.0000001)"},
        "enqueue": [{"student.optimizer.lr": 0.003}, {"student.optimizer.lr": 0.004},
                    {"student.optimizer.lr": 0.0000001}],
        "pruner": "median",
        "pruner_options": {"n_startup_trials": 2},
    })
    kdsweep(*arguments, *FAST, "distill.alpha=0", "student.max_epochs=5")

    study = load_study(tmp_path)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE, 2: TrialState.PRUNED}

    client = MlflowClient(tracking_uri)
    runs = {run.data.tags["optuna.trial_number"]: run for run in student_runs(tmp_path)}
    pruned = runs["2"]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["optuna.trial_state"] == "PRUNED"
    pruned_epochs = len(client.get_metric_history(pruned.info.run_id, "val/acc"))
    complete_epochs = len(client.get_metric_history(runs["0"].info.run_id, "val/acc"))
    assert pruned_epochs < complete_epochs == 5
    assert study.trials[2].intermediate_values, "the pruned trial reported no intermediate values"


def test_diverging_trial_fails_and_sweep_continues(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "diverge", {
        "n_trials": 2,
        "max_failure_rate": 0.5,
        "params": {"student.model.nan_after": "choice(-1, 2)"},
        "enqueue": [{"student.model.nan_after": -1}, {"student.model.nan_after": 2}],
    })
    result = kdsweep(*arguments, *FAST, "distill.alpha=0", "student.model._target_=failing_models.DivergingMLP",
                     "+student.model.nan_after=-1")

    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "NonFiniteLossError" in study.trials[1].user_attrs["fail_reason"]
    assert "batch 2" in study.trials[1].user_attrs["fail_reason"]
    runs = {run.data.tags["optuna.trial_number"]: run for run in student_runs(tmp_path)}
    assert runs["1"].info.status == "FAILED"
    assert "NonFiniteLossError" in runs["1"].data.tags["kdsweep.fail_reason"]
    assert "1 complete, 1 failed" in result.stdout


def test_failure_rate_above_limit_stops_sweep(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "diverge", {
        "n_trials": 3,
        "params": {"student.model.nan_after": "choice(-1, 1)"},
        "enqueue": [{"student.model.nan_after": 1}],
    })
    result = kdsweep(*arguments, *FAST, "distill.alpha=0", "student.model._target_=failing_models.DivergingMLP",
                     "+student.model.nan_after=-1", expect_success=False)

    assert result.returncode != 0
    assert "max_failure_rate=0.0" in result.stderr
    assert "trial 0: NonFiniteLossError" in result.stderr
    assert len(load_study(tmp_path).trials) == 1


def test_parallel_trials_overlap_slow_trial(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "parallel", {
        "n_trials": 3,
        "n_jobs": 2,
        "params": {"student.max_epochs": "choice(1, 60)"},
        "enqueue": [{"student.max_epochs": 60}, {"student.max_epochs": 1}],
    })
    kdsweep(*arguments, "trainer.enable_progress_bar=false", "distill.alpha=0")

    slow, fast, third = load_study(tmp_path).trials
    assert slow.params["student.max_epochs"] == 60
    assert all(t.state == TrialState.COMPLETE for t in (slow, fast, third))
    assert slow.datetime_start < fast.datetime_complete < slow.datetime_complete
    assert third.datetime_start < slow.datetime_complete, "the third trial waited for the slow one"


def test_killed_sweep_resumes_to_total(tmp_path):
    arguments = write_sweep(tmp_path, "resume", {
        "n_trials": 6,
        "params": {"distill.temperature": "tag(log, interval(1, 20))", "distill.alpha": "interval(0, 1)"},
    })
    arguments += ["trainer.enable_progress_bar=false", "teacher.max_epochs=2", "student.max_epochs=20"]
    process = start_kdsweep(arguments, tmp_path, "killed.log")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if not (tmp_path / "optuna.journal").exists():
                continue
            trials = load_study(tmp_path).trials
            running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and running:
                break
        else:
            pytest.fail("the sweep did not reach a running third trial in time")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    killed = [t for t in load_study(tmp_path).trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    result = run_kdsweep(arguments, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    study = load_study(tmp_path)
    assert len(study.trials) == 6
    assert all(t.state.is_finished() for t in study.trials)
    assert study.trials[killed[0].number].state == TrialState.FAIL
    assert sorted(t.number for t in study.trials) == list(range(6))

    runs = {run.info.run_id: run for run in student_runs(tmp_path)}
    assert not [run for run in runs.values() if run.info.status == "RUNNING"]
    assert runs[killed[0].user_attrs["mlflow_run_id"]].info.status == "KILLED"
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["distill.temperature"]) == trial.params["distill.temperature"]
        assert float(run.data.params["distill.alpha"]) == trial.params["distill.alpha"]
        assert run.data.metrics["val/acc"] == trial.value


def test_two_sweep_processes_share_trial_count(tmp_path):
    arguments = write_sweep(tmp_path, "shared", {
        "n_trials": 5,
        "params": {"distill.temperature": "tag(log, interval(1, 20))"},
    })
    arguments += [*FAST, "distill.alpha=0"]
    processes = [start_kdsweep(arguments, tmp_path, f"sweep-{index}.log") for index in range(2)]
    for index, process in enumerate(processes):
        wait_for_success(process, tmp_path / f"sweep-{index}.log")

    trials = load_study(tmp_path).trials
    assert len(trials) == 5
    assert sorted(t.number for t in trials) == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["kdsweep.process"] for t in trials}) == 2, "one process ran every trial"
    assert len(student_runs(tmp_path)) == 5


def test_multi_objective_sweep_prints_pareto_front(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "pareto", {
        "n_trials": 3,
        "metric": ["val/acc", "model/parameters"],
        "direction": ["maximize", "minimize"],
        "sampler": "nsgaii",
        "params": {"student.model.hidden_sizes": "choice([8],[32],[64])"},
    })
    result = kdsweep(*arguments, *FAST, "distill.alpha=0")

    assert "Pareto front" in result.stdout
    study = load_study(tmp_path)
    assert len(study.directions) == 2
    assert study.best_trials
    results = yaml.safe_load(next((tmp_path / "multirun").glob("*/*/results.yaml")).read_text())
    assert {t["number"] for t in results["pareto_front"]} == {t.number for t in study.best_trials}


def test_sweep_logs_results_and_plots_to_parent_run(kdsweep, tmp_path, tracking_uri):
    kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=3", *FAST)

    client = MlflowClient(tracking_uri)
    (parent,) = runs_of_role(tracking_uri, "sweep")
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"results.yaml", "summary.txt", "optimization_history.png", "parallel_coordinate.png"} <= artifacts
    results = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "results.yaml")))
    assert results["best"]["value"] == journal_study(tmp_path, "temperature_alpha-digits").best_value


def make_sweeper(tmp_path: Path, **settings):
    from hydra_plugins.kdsweep_optuna_sweeper._impl import OptunaSweeperImpl

    defaults = dict(params={}, metric="val/acc", direction="maximize", n_trials=4, n_jobs=1, sampler="tpe",
                    sampler_options={}, seed=0, pruner="none", pruner_options={}, enqueue=[], storage=None,
                    study_name=STUDY, max_failure_rate=0.0, heartbeat_interval=60.0)
    sweeper = OptunaSweeperImpl(**{**defaults, **settings})
    sweeper.location = str(tmp_path / "optuna.journal")
    sweeper.started_here = set()
    sweeper.heartbeat = SimpleNamespace(trial_ids=set())
    return sweeper


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes", "gp", "qmc", "nsgaii"])
def test_seeded_sampler_repeats_exactly(tmp_path, sampler):
    from hydra_plugins.kdsweep_optuna_sweeper._search_space import build_search_space

    arguments = ["a=range(1, 5)", "b=choice(2, 4)"] if sampler == "grid" else [
        "a=interval(0, 1)", "b=tag(log, interval(1, 20))"]
    drawn = []
    for attempt in range(2):
        sweeper = make_sweeper(tmp_path, sampler=sampler, seed=3)
        space = build_search_space({}, arguments)
        study = optuna.create_study(sampler=sweeper._make_sampler(space, sweeper.seed), direction="maximize")
        points = []
        for _ in range(6):
            trial = study.ask(space.distributions)
            points.append(trial.params)
            study.tell(trial, sum(trial.params.values()))
        drawn.append(points)

    assert drawn[0] == drawn[1]
    assert len({tuple(point.items()) for point in drawn[0]}) > 1


def test_grid_sweep_stops_when_exhausted(tmp_path):
    from hydra_plugins.kdsweep_optuna_sweeper._search_space import build_search_space

    sweeper = make_sweeper(tmp_path, sampler="grid", n_trials=10)
    space = build_search_space({}, ["a=choice(1, 2)", "b=choice(x, y)"])
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(sweeper.location))
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sweeper._make_sampler(space, sweeper.seed))

    claimed = []
    while (trial := sweeper._claim_trial(study, space)) is not None:
        claimed.append(tuple(sorted(trial.params.items())))
        study.tell(trial, 0.0)

    assert len(claimed) == 4
    assert len(set(claimed)) == 4


def test_resumed_study_draws_new_points(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "resume-points", {
        "n_trials": 2,
        "sampler": "random",
        "params": {"distill.temperature": "tag(log, interval(1, 20))"},
    })
    kdsweep(*arguments, *FAST, "distill.alpha=0")
    kdsweep(*arguments, *FAST, "distill.alpha=0", "hydra.sweeper.n_trials=4")

    temperatures = [t.params["distill.temperature"] for t in load_study(tmp_path).trials]
    assert len(temperatures) == 4
    assert len(set(temperatures)) == 4, f"a resumed study repeated a point: {temperatures}"


def test_direction_change_on_existing_study_rejected(kdsweep, tmp_path):
    arguments = write_sweep(tmp_path, "direction", {"n_trials": 1,
                                                  "params": {"distill.temperature": "interval(1, 5)"}})
    kdsweep(*arguments, *FAST, "distill.alpha=0")
    result = kdsweep(*arguments, *FAST, "distill.alpha=0", "hydra.sweeper.direction=minimize", expect_success=False)

    assert result.returncode == 2
    assert "hydra.sweeper.direction=['minimize']" in result.stderr
    assert "['maximize']" in result.stderr


def test_stale_trial_of_other_host_failed(tmp_path):
    from hydra_plugins.kdsweep_optuna_sweeper._study_tools import fail_orphaned_trials

    study = optuna.create_study()
    stale, fresh = study.ask(), study.ask()
    for trial, age in ((stale, 1000.0), (fresh, 10.0)):
        trial.set_user_attr("kdsweep.host", "another-host")
        trial.set_user_attr("kdsweep.process", "4242:1")
        trial.set_user_attr("kdsweep.heartbeat", time.time() - age)

    orphaned = fail_orphaned_trials(study, heartbeat_interval=60.0)

    assert [t.number for t in orphaned] == [stale.number]
    assert study.trials[stale.number].state == TrialState.FAIL
    assert "another-host" in study.trials[stale.number].user_attrs["fail_reason"]
    assert study.trials[fresh.number].state == TrialState.RUNNING


def test_heartbeat_stamps_running_trials():
    from hydra_plugins.kdsweep_optuna_sweeper._study_tools import HEARTBEAT_ATTR, Heartbeat

    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr(HEARTBEAT_ATTR, 0.0)
    heartbeat = Heartbeat(study, interval=0.05)
    heartbeat.trial_ids.add(trial._trial_id)
    time.sleep(0.5)
    heartbeat.stop()

    assert study.trials[0].user_attrs[HEARTBEAT_ATTR] > time.time() - 5


def test_failed_enqueued_point_queued_again(tmp_path):
    from hydra_plugins.kdsweep_optuna_sweeper._search_space import build_search_space

    space = build_search_space({}, ["distill.alpha=interval(0, 1)", "distill.temperature=interval(1, 20)"])
    baseline, other = {"distill.alpha": 0.0, "distill.temperature": 1.0}, {"distill.alpha": 0.5, "distill.temperature": 4.0}
    sweeper = make_sweeper(tmp_path, enqueue=[baseline, other])
    study = sweeper._open_study(space)
    for state in (TrialState.FAIL, TrialState.COMPLETE):  # The baseline failed; the other point completed.
        trial = study.ask(space.distributions)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)

    reopened = make_sweeper(tmp_path, enqueue=[baseline, other])._open_study(space)

    waiting = reopened.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [trial.system_attrs["fixed_params"] for trial in waiting] == [baseline]


def test_summary_names_failed_baseline():
    from kdsweep import summary

    study = optuna.create_study(direction="maximize")
    alpha = optuna.distributions.FloatDistribution(0, 1)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"distill.alpha": 0.0},
                                              distributions={"distill.alpha": alpha}))
    study.add_trial(optuna.trial.create_trial(
        value=0.9, params={"distill.alpha": 0.5}, distributions={"distill.alpha": alpha},
        user_attrs={"distill": {"distill.alpha": 0.5, "distill.temperature": 4.0}, "metrics": {"test/acc": 0.8}}))

    table = summary.summarize(study, ["val/acc"], "sqlite:///mlflow.db")

    assert "The alpha = 0 baseline did not complete (trial 0 FAIL)" in table
