"""A real sweep through the command line: Hydra multirun, the Optuna sweeper, Lightning and MLflow."""

import subprocess

import optuna
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conftest import CHECKOUT, FAST, journal_study, runs_of_role


def test_three_trial_sweep_end_to_end(kdsweep, tmp_path, tracking_uri):
    result = kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=3", *FAST)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("kdsweep-digits")
    runs = client.search_runs([experiment.experiment_id])
    by_role = {}
    for run in runs:
        by_role.setdefault(run.data.tags["kdsweep.role"], []).append(run)

    (parent,) = by_role["sweep"]
    trials = by_role["student"]
    (teacher,) = by_role["teacher"]
    assert len(runs) == 5
    assert len(trials) == 3
    assert all(run.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id for run in trials)
    assert MLFLOW_PARENT_RUN_ID not in teacher.data.tags
    assert all(run.info.status == "FINISHED" for run in runs)
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2"]

    for run in trials:
        assert 1.0 <= float(run.data.params["distill.temperature"]) <= 20.0
        assert 0.0 <= float(run.data.params["distill.alpha"]) <= 1.0
        if float(run.data.params["distill.alpha"]) > 0:
            assert run.data.tags["kdsweep.teacher_run_id"] == teacher.info.run_id

    study = journal_study(tmp_path, "temperature_alpha-digits")
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == 3
    assert len(completed) == 3
    logged_accuracy = {run.data.tags["optuna.trial_number"]: run.data.metrics["val/acc"] for run in trials}
    for trial in completed:
        assert trial.value == logged_accuracy[str(trial.number)]
        assert trial.user_attrs["mlflow_run_id"] in {run.info.run_id for run in trials}

    output = result.stdout + result.stderr
    assert "baseline (alpha=0)" in result.stdout
    assert "best distilled" in result.stdout
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in result.stdout
    assert output.count("is not cached; training it") == 1
    assert output.count("state=COMPLETE") == 3

    # Run from a checkout, as in the README, the sweep's files must not mark the checkout's code as
    # changed in the provenance of later runs.
    written = [path.name + ("/" if path.is_dir() else "") for path in tmp_path.iterdir()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=CHECKOUT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(written)


def test_sweep_rerun_continues_finished_study(kdsweep, tracking_uri):
    kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=1", *FAST)
    result = kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=2", *FAST)

    parents = runs_of_role(tracking_uri, "sweep")
    trials = runs_of_role(tracking_uri, "student")
    assert len(parents) == 1
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1"]
    assert "Continuing study temperature_alpha-digits" in result.stdout + result.stderr
