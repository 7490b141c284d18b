"""Cluster settings: the submitit launchers, the SLURM profile and an MLflow tracking server."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import FAST, journal_study, kdsweep_environment, runs_of_role
from kdsweep import cli, train
from kdsweep.checks import ConfigError
from test_postgres import free_port, postgres_url  # noqa: F401 (a fixture)

CLUSTER_VARIABLES = {
    "KDSWEEP_MLFLOW_URI": "http://127.0.0.1:5999",
    "KDSWEEP_OPTUNA_STORAGE": "postgresql://kdsweep@127.0.0.1:5998/optuna",
}


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_missing_submitit_rejected(monkeypatch):
    monkeypatch.setattr(cli, "_submitit_installed", lambda: False)

    error = cli.check_arguments(["sweep=temperature_alpha", "hydra/launcher=submitit_slurm"])

    assert error.startswith("hydra/launcher=submitit_slurm: the hydra-submitit-launcher package is not installed")
    assert "pip install 'kdsweep[cluster]'" in error


def test_slurm_launcher_sized_by_trainer():
    cfg = composed(["hydra/launcher=kdsweep_slurm", "trainer=ddp", "trainer.devices=4", "+trainer.num_nodes=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)


def test_remote_trainer_checked_without_local_gpus():
    cfg = composed(["trainer=ddp", "trainer.devices=4"])
    task_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])

    with pytest.raises(ConfigError, match="trainer.devices=4: 0 CUDA GPUs are present"):
        train.prepare(task_cfg)
    assert train.prepare(task_cfg, check_hardware=False).processes == 4


def test_slurm_profile_reads_environment(monkeypatch, tmp_path):
    for name, value in {**CLUSTER_VARIABLES, "KDSWEEP_SHARED_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)

    cfg = composed(["cluster=slurm"])

    assert cfg.tracking.uri == CLUSTER_VARIABLES["KDSWEEP_MLFLOW_URI"]
    assert cfg.hydra.sweeper.storage == CLUSTER_VARIABLES["KDSWEEP_OPTUNA_STORAGE"]
    assert cfg.teacher_cache_dir == f"{tmp_path}/teacher_cache"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_submitit_local_sweep_reaches_optuna_and_mlflow(kdsweep, tmp_path, tracking_uri):
    kdsweep(*FAST, "sweep=temperature_alpha", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
            "hydra/launcher=submitit_local")

    study = journal_study(tmp_path, "temperature_alpha-digits")
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    (parent,) = runs_of_role(tracking_uri, "sweep")
    students = runs_of_role(tracking_uri, "student")
    assert {run.data.tags["mlflow.parentRunId"] for run in students} == {parent.info.run_id}
    assert {run.info.run_id for run in students} == {trial.user_attrs["mlflow_run_id"] for trial in study.trials}
    # submitit writes one folder per job, with the job's own output.
    job_logs = list(tmp_path.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert len(job_logs) == 2


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow server at {url} did not answer within {timeout} s")


def test_mlflow_server_with_database_and_artifact_store(kdsweep, tmp_path, postgres_url):  # noqa: F811
    url = f"http://127.0.0.1:{free_port()}"
    artifacts = tmp_path / "artifacts"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_url,
             "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--workers", "1"],
            cwd=tmp_path, env=kdsweep_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(url, server)
        kdsweep(*FAST, f"tracking.uri={url}")

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("kdsweep-digits")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(run.data.tags["kdsweep.role"] for run in runs) == ["student", "teacher"]
        assert all(run.info.status == "FINISHED" for run in runs)
        # The server stores the artifacts that the runs uploaded through it.
        assert len(list(artifacts.rglob("config.yaml"))) == 2
        assert not (tmp_path / "mlruns").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_slurm_launcher_without_slurm_rejected(kdsweep, tmp_path):
    result = kdsweep(*FAST, "sweep=temperature_alpha", "hydra/launcher=kdsweep_slurm", "trainer=ddp",
                     "trainer.devices=4", expect_success=False, environment={"PATH": os.path.dirname(sys.executable)})

    assert result.returncode == 2
    assert result.stderr.strip() == ("kdsweep: error: hydra/launcher=kdsweep_slurm: SLURM's srun is not on PATH; "
                                     "start the sweep on a machine of the SLURM cluster, or use "
                                     "hydra/launcher=submitit_local")
    assert not (tmp_path / "optuna.journal").exists()
