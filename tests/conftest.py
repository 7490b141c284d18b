import logging
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from kdsweep import cli

torch.set_num_threads(1)  # See OMP_NUM_THREADS in run_kdsweep.

CHECKOUT = Path(__file__).resolve().parents[1]
MNIST_ROOT = CHECKOUT.parent / "shared" / "data"

# Short trainings and short inference timings, so that the command-line tests finish in seconds.
FAST = ["trainer.enable_progress_bar=false", "teacher.max_epochs=2", "student.max_epochs=2",
        "inference.batch_size=64", "inference.min_run_time=0.01"]


def kdsweep_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a kdsweep command in a test: no inherited MLflow or sweep settings.

    ``tests/models`` is importable in the command, so configs can name the test networks there.
    """
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KDSWEEP_"))},
        "PYTHONUNBUFFERED": "1",
        # pytest-xdist runs two tests at once on two cores, and OpenMP threads that outnumber the
        # cores spin against each other: one thread per process keeps every test fast.
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(CHECKOUT / "tests" / "models"),
        **(extra or {}),
    }


def start_kdsweep(arguments: list[str], cwd: Path, log_name: str) -> subprocess.Popen:
    """Start the real ``kdsweep`` command in the background, its output going to ``cwd/log_name``."""
    with open(cwd / log_name, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "kdsweep.cli", *arguments], cwd=cwd,
                                env=kdsweep_environment(), stdout=log, stderr=subprocess.STDOUT)


def wait_for_success(process: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, log.read_text()[-3000:]


def run_kdsweep(arguments: list[str], cwd: Path, timeout: float = 300,
                environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``kdsweep`` command in ``cwd``, by default with MLflow's default store in that folder."""
    return subprocess.run(
        [sys.executable, "-m", "kdsweep.cli", *arguments],
        cwd=cwd,
        env=kdsweep_environment(environment),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def kdsweep(tmp_path):
    """Return a function that runs kdsweep in this test's temporary folder and fails loudly on error."""

    def invoke(*arguments: str, expect_success: bool = True,
               environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = run_kdsweep(list(arguments), tmp_path, environment=environment)
        if expect_success and result.returncode != 0:
            pytest.fail(f"kdsweep {' '.join(arguments)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    return invoke


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def runs_of_role(tracking_uri: str, role: str, experiment: str = "kdsweep-digits") -> list:
    """Return the MLflow runs of ``experiment`` whose tag ``kdsweep.role`` is ``role``."""
    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.`kdsweep.role` = '{role}'")


def journal_study(folder: Path, name: str) -> optuna.Study:
    """Load study ``name`` from the Optuna journal file ``optuna.journal`` in ``folder``."""
    backend = optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def run_in_process(arguments: list[str], folder, monkeypatch, capfd) -> tuple[int, str]:
    """Run the ``kdsweep`` command's entry point in this process and return its exit status and stderr.

    A new Python process takes about 5 s to start, so the many cases here run in this process.
    ``test_command_exits_with_one_line`` checks the same path through the real command.
    """
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(folder)
    for name in [name for name in os.environ if name.startswith(("MLFLOW_", "KDSWEEP_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["kdsweep", *arguments])
    capfd.readouterr()
    try:
        cli.main()
        status = 0
    except SystemExit as exit:
        status = exit.code
    finally:
        GlobalHydra.instance().clear()
        logging.getLogger().handlers.clear()  # Hydra's job logging writes to this test's folder.
    return status, capfd.readouterr().err
