"""Trial jobs that run ``n_jobs`` at a time, so that a new one starts as soon as any ends.

Hydra's launchers run a batch of jobs and return when the whole batch is done. The sweeper instead
submits one job at a time and waits for the first to end, in one of two ways:

- ``TrialProcessPool``, with Hydra's basic launcher: a pool of ``n_jobs`` spawned processes. Each
  worker runs the job with Hydra's own ``run_job``, limits its CPU threads to its share of the
  cores, and, where GPUs exist, is given only its own GPUs through ``CUDA_VISIBLE_DEVICES``.
- ``LauncherPool``, with any other launcher (submitit for SLURM): each job is a batch of one,
  launched from its own thread, and the launcher places it and its GPUs.
"""

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Optional, Sequence

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from kdsweep.distributed import end_with_parent

log = logging.getLogger(__name__)


def gpu_slots(n_jobs: int, devices_per_trial: int, accelerator: str = "auto") -> list[Optional[str]]:
    """Return one ``CUDA_VISIBLE_DEVICES`` value per worker, or None where a worker keeps the sweep's own.

    CPU trials see no GPU. Otherwise each worker gets ``devices_per_trial`` GPUs of its own, named
    as in the sweep's own ``CUDA_VISIBLE_DEVICES``. When the GPUs do not suffice, GPU trials raise
    ValueError, and trials with accelerator auto share the visible GPUs.
    """
    import torch

    if accelerator == "cpu":
        return [""] * n_jobs
    count = torch.cuda.device_count()
    if count == 0:
        return [None] * n_jobs
    needed = devices_per_trial * n_jobs
    if needed > count:
        if accelerator in ("gpu", "cuda"):
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs} trials with trainer.devices={devices_per_trial} GPUs "
                             f"each need {needed} GPUs, but {count} are visible; lower hydra.sweeper.n_jobs or "
                             f"trainer.devices")
        log.warning("%d parallel trials of %d GPUs each need %d GPUs, but %d are visible, so the trials share them",
                    n_jobs, devices_per_trial, needed, count)
        return [None] * n_jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
    return [",".join(names[slot * devices_per_trial:(slot + 1) * devices_per_trial]) for slot in range(n_jobs)]


class TrialProcessPool:
    """A pool of spawned processes, each running one trial job at a time."""

    def __init__(self, n_jobs: int, hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction,
                 slots: list[Optional[str]]) -> None:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for slot in slots:
            queue.put(slot)
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        self._executor = ProcessPoolExecutor(max_workers=n_jobs, mp_context=context, initializer=_start_worker,
                                             initargs=(queue, threads))
        # cloudpickle, because the task function is the body of a @hydra.main function.
        self._payload = cloudpickle.dumps((hydra_context, config, task_function))

    def submit(self, overrides: Sequence[str], job_num: int) -> Future:
        """Start one trial job; the future's result is a JobReturn with its status and return value."""
        state = cloudpickle.dumps(Singleton.get_state())  # It contains OmegaConf's resolvers, local functions.
        return self._executor.submit(_run_trial_job, self._payload, state, list(overrides), job_num)

    @staticmethod
    def job_return(future: Future) -> JobReturn:
        status, value = cloudpickle.loads(future.result())
        job = JobReturn()
        job.status = status
        job.return_value = value
        return job

    def shutdown(self, *, cancel: bool) -> None:
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)


class LauncherPool:
    """Trial jobs launched through a Hydra launcher, each as a batch of one from its own thread."""

    def __init__(self, launcher: Launcher) -> None:
        self._launcher = launcher

    def submit(self, overrides: Sequence[str], job_num: int) -> Future:
        """Start one trial job; the future's result is its JobReturn."""
        future: Future = Future()

        def launch() -> None:
            try:
                (job,) = self._launcher.launch([list(overrides)], initial_job_idx=job_num)
            except BaseException as error:  # The launcher's own errors, e.g. a rejected cluster submission.
                future.set_exception(error)
            else:
                future.set_result(job)

        # Daemon threads, so that an interrupted sweep does not wait at exit for jobs to finish.
        threading.Thread(target=launch, name=f"trial-job-{job_num}", daemon=True).start()
        return future

    @staticmethod
    def job_return(future: Future) -> JobReturn:
        return future.result()

    def shutdown(self, *, cancel: bool) -> None:
        # NOTE: a cancelled sweep stops waiting, but jobs already submitted to a cluster keep
        # running until they end or the cluster's own tools (scancel) stop them.
        return None


def _start_worker(slots: Any, threads: int) -> None:
    end_with_parent()
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_trial_job(payload: bytes, singleton_state: bytes, overrides: list[str], job_num: int) -> bytes:
    hydra_context, config, task_function = cloudpickle.loads(payload)
    Singleton.set_state(cloudpickle.loads(singleton_state))
    setup_globals()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"trial_{job_num}"
        sweep_config.hydra.job.num = job_num
    HydraConfig.instance().set_config(sweep_config)
    job = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    # Only the outcome travels back: the job's configs hold classes that plain pickle cannot send.
    return cloudpickle.dumps((job.status, job._return_value))
