"""Runs on several processes (Lightning's DDP strategies), alone or as sweep trials.

Lightning's ``ddp`` strategy starts ranks 1 and up by running the command line again. In a sweep
job that command line is the whole sweep, so a sweep job whose trainer needs several processes
runs its own config again as a single run in a new ``kdsweep`` process. Lightning then starts the
other ranks from that command, every rank trains the same trial, and the single run hands its
result back to the sweep job through a JSON file.
"""

import atexit
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

# Set in a single run started for a sweep job: the file where rank 0 writes the run's outcome.
RESULT_FILE_ENV = "KDSWEEP_RESULT_FILE"
CONFIG_NAME = "processes_config"
RESULT_FILE = "processes_result.json"
# Lightning names the log files of the ranks it starts train_ddp_process_<rank>; rank 0 matches them.
RANK_ZERO_JOB_NAME = "train_ddp_process_0"


class TrialProcessesError(RuntimeError):
    """The single run started for a multi-process sweep job failed or left no result."""


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupCleanup(pl.Callback):
    """Destroy the process group when the process exits.

    Lightning destroys it at exit for NCCL only. A gloo group left alive aborted a finished process
    ("terminate called without an active exception") in 3 of 12 two-process runs on 2 cores.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            atexit.unregister(_destroy_process_group)
            atexit.register(_destroy_process_group)


def starts_processes_by_command(trainer: pl.Trainer) -> bool:
    """Return whether Lightning starts this trainer's other processes itself, rather than SLURM or torchrun."""
    return trainer.world_size > 1 and not trainer.strategy.cluster_environment.creates_processes_externally


def end_with_parent() -> None:
    """Ask Linux to stop this process when its parent dies, so that no orphaned process keeps training."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_as_single_run(cfg: DictConfig, processes: int) -> dict[str, Any]:
    """Run this sweep job's config as a single run in a new process and return that run's result.

    The config is saved in the job's output folder and the run writes its logs there too. A pruned
    run raises ``optuna.TrialPruned`` here, and a failed one ``TrialProcessesError``.
    """
    folder = Path(HydraConfig.get().runtime.output_dir)
    config_path = folder / f"{CONFIG_NAME}.yaml"
    result_path = folder / RESULT_FILE
    result_path.unlink(missing_ok=True)
    OmegaConf.save(cfg, config_path)
    command = [
        sys.executable, "-m", "kdsweep.cli",
        "--config-path", str(folder), "--config-name", CONFIG_NAME,
        f'hydra.run.dir="{folder}"', "hydra.output_subdir=null", "hydra.job.chdir=false",
        f"hydra.job.name={RANK_ZERO_JOB_NAME}",
    ]
    log.info("Running the job's %d processes as a single run: %s", processes, " ".join(command))
    process = subprocess.Popen(command, cwd=get_original_cwd(), env={**os.environ, RESULT_FILE_ENV: str(result_path)},
                               preexec_fn=end_with_parent)
    try:
        returncode = process.wait()
    except BaseException:
        _stop(process)
        raise
    if returncode != 0:
        raise TrialProcessesError(f"the single run of this job's processes exited with code {returncode}; "
                                  f"its logs are in {folder}")
    if not result_path.is_file():
        raise TrialProcessesError(f"the single run of this job's processes wrote no {result_path}")
    outcome = json.loads(result_path.read_text())
    if "pruned" in outcome:
        raise optuna.TrialPruned(outcome["pruned"])
    return outcome["result"]


def _stop(process: subprocess.Popen, grace_seconds: float = 30) -> None:
    """Stop the single run as Ctrl-C would, so that Lightning ends the ranks it started; kill it if that hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_and_write_result(run: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig,
                         result_path: Path) -> dict[str, Any] | None:
    """Call ``run(cfg)`` and, in rank 0, write its result or its pruning message to ``result_path``.

    Every rank ends without an error when the trial is pruned: Lightning stops rank 0 when one of
    the ranks it started exits with an error.
    """
    try:
        outcome = {"result": run(cfg)}
    except optuna.TrialPruned as pruned:
        log.info("Trial pruned: %s", pruned)
        outcome = {"pruned": str(pruned)}
    if rank_zero_only.rank == 0:
        partial = result_path.with_suffix(".partial")
        partial.write_text(json.dumps(outcome))
        partial.replace(result_path)
    return outcome.get("result")
