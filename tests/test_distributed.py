"""Data parallelism on CPU processes (gloo): sharding, metrics and a 2-process run end to end."""

import functools
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState
from torch.utils.data import TensorDataset

from conftest import FAST, journal_study, kdsweep_environment, runs_of_role
from kdsweep import train
from kdsweep.checks import ConfigError
from kdsweep.data import DataSplits, IndexBatchSampler, TensorDataModule
from kdsweep.distributed import ProcessGroupCleanup
from kdsweep.models import MLP
from kdsweep.modules import DistillationModule

SWEEP = ["sweep=temperature_alpha", "trainer=ddp_cpu"]
STUDY = "temperature_alpha-digits"


@pytest.mark.parametrize("size", [10, 11, 97])
def test_eval_shards_cover_each_sample_once(size):
    shards = [torch.cat(list(IndexBatchSampler(size, 4, shuffle=False, num_replicas=3, rank=rank)))
              for rank in range(3)]

    assert sorted(torch.cat(shards).tolist()) == list(range(size))
    for rank, shard in enumerate(shards):
        assert len(list(IndexBatchSampler(size, 4, shuffle=False, num_replicas=3, rank=rank))) == -(-len(shard) // 4)


@pytest.mark.parametrize("size", [10, 11, 97])
def test_training_shards_equal_and_shared_order(size):
    batches = [list(IndexBatchSampler(size, 4, shuffle=True, seed=5, num_replicas=2, rank=rank)) for rank in range(2)]
    shards = [torch.cat(rank_batches) for rank_batches in batches]

    assert len(batches[0]) == len(batches[1])
    assert len(shards[0]) == len(shards[1]) == -(-size // 2)
    assert set(torch.cat(shards).tolist()) == set(range(size))


def validation_metrics(splits: DataSplits, state: dict, devices: int) -> dict[str, float]:
    model = MLP((1, 8, 8), 4, hidden_sizes=(16,))
    model.load_state_dict(state)
    module = DistillationModule(model, functools.partial(torch.optim.SGD, lr=0.1), 4, teacher=None,
                                temperature=1.0, alpha=0.0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         callbacks=[ProcessGroupCleanup()],
                         use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    data = TensorDataModule(splits, batch_size=16, seed=0, eval_batch_size=16)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return metrics


def test_validation_metrics_same_on_two_processes():
    generator = torch.Generator().manual_seed(0)
    # 97 samples: a multiple of neither the batch size (16) nor the process count (2).
    inputs, labels = torch.randn(97, 1, 8, 8, generator=generator), torch.randint(0, 4, (97,), generator=generator)
    splits = DataSplits(TensorDataset(inputs, labels), TensorDataset(inputs, labels), TensorDataset(inputs, labels),
                        input_shape=(1, 8, 8), num_classes=4)
    state = MLP((1, 8, 8), 4, hidden_sizes=(16,)).state_dict()

    one_process = validation_metrics(splits, state, devices=1)
    two_processes = validation_metrics(splits, state, devices=2)

    assert one_process["val/acc"] == pytest.approx(two_processes["val/acc"], abs=1e-7)
    assert one_process["val/loss"] == pytest.approx(two_processes["val/loss"], rel=1e-5)


def test_process_group_destroyed_at_exit(tmp_path):
    # Run in a fresh interpreter: the check calls the exit handlers, and the group is process-wide.
    script = f"""
import atexit
import torch.distributed as dist
from kdsweep.distributed import ProcessGroupCleanup

dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
for stage in ("fit", "test"):  # One trainer sets up twice: fit, then test.
    ProcessGroupCleanup().setup(None, None, stage)
atexit._run_exitfuncs()
print("initialized after exit handlers:", dist.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "initialized after exit handlers: False" in result.stdout


def trial_folder(tmp_path, number: int):
    (folder,) = tmp_path.glob(f"multirun/*/*/{number}")
    return folder


def test_two_process_trials_in_sweep(kdsweep, tmp_path, tracking_uri):
    # Trial 0 is the alpha = 0 baseline. Trial 1 distils, so its single run trains the teacher too.
    result = kdsweep(*FAST, *SWEEP, "hydra.sweeper.n_trials=2")

    trials = journal_study(tmp_path, STUDY).trials
    assert [trial.state for trial in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    students = runs_of_role(tracking_uri, "student")
    assert sorted(run.data.tags["optuna.trial_number"] for run in students) == ["0", "1"]
    (teacher,) = runs_of_role(tracking_uri, "teacher")
    for run in [*students, teacher]:
        assert run.info.status == "FINISHED"
        assert run.data.tags["kdsweep.accelerator"] == "cpu"
        assert run.data.tags["kdsweep.device_count"] == "2"
        assert run.data.tags["kdsweep.device_name"]
        # Process 0 alone logs the model and the footprint.
        assert len(run.outputs.model_outputs) == 1
        assert run.data.metrics["inference/latency_ms"] > 0
    # Process 1 writes its log lines to its own file only, not to the console.
    console = result.stdout + result.stderr
    assert "Process 0 of 2 distils" in console
    assert "Process 1 of 2 distils" not in console
    for trial in trials:
        expected = (f"distils with temperature {trial.params['distill.temperature']} "
                    f"and alpha {trial.params['distill.alpha']}")
        for rank in (0, 1):
            log = (trial_folder(tmp_path, trial.number) / f"train_ddp_process_{rank}.log").read_text()
            assert f"Process {rank} of 2 {expected}" in log


def test_pruned_two_process_trial_stops_both_ranks(kdsweep, tmp_path, tracking_uri):
    # No validation accuracy reaches 2, so the threshold pruner prunes after the first epoch.
    kdsweep(*FAST, *SWEEP, "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=threshold",
            "+hydra.sweeper.pruner_options.lower=2.0")

    (trial,) = journal_study(tmp_path, STUDY).trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]
    (run,) = runs_of_role(tracking_uri, "student")
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.trial_state"] == "PRUNED"
    for rank in (0, 1):
        log = (trial_folder(tmp_path, 0) / f"train_ddp_process_{rank}.log").read_text()
        assert re.search(r"Trial pruned: pruned after epoch 0 with val/acc=", log), log


def test_cpu_processes_without_gloo_rejected(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": "ddp", "devices": 2}})

    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp, trainer.accelerator=cpu: .* gloo"):
        train._check_trainer(cfg)


def handle_sigint_by_default() -> None:
    """Let the command's Python turn SIGINT into KeyboardInterrupt, as it does when started from a terminal.

    A shell runs a background job (``make test &``) with SIGINT ignored, its children inherit that,
    and Python then leaves SIGINT ignored, so the sweep would not see the test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_two_process_trial_leaves_no_process(tmp_path, tracking_uri):
    arguments = ["trainer.enable_progress_bar=false", "student.max_epochs=1000", *SWEEP, "hydra.sweeper.n_trials=1"]
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", *arguments], cwd=tmp_path,
                                 env=kdsweep_environment(), stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=handle_sigint_by_default)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("multirun/*/*/0/train_ddp_process_1.log")):
        assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "process 1 did not start within 120 s"
        time.sleep(1)
    time.sleep(3)  # Both processes are training now.

    sweep.send_signal(signal.SIGINT)

    assert sweep.wait(timeout=120) == 130
    assert "kdsweep: interrupted" in (tmp_path / "sweep.log").read_text()
    leftover = [process.info["cmdline"] for process in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(process.info["cmdline"] or [])]
    assert leftover == []
    (trial,) = journal_study(tmp_path, STUDY).trials
    assert trial.state == TrialState.FAIL
    (run,) = runs_of_role(tracking_uri, "student")
    assert run.info.status == "KILLED"
