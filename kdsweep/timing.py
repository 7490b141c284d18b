"""Wall-clock timing of a run, logged with the run as ``perf/*`` metrics.

The benchmarks read these metrics back from MLflow, so every figure they report traces to a
logged run. Timings differ from run to run, so comparisons of two runs' results leave out every
metric whose name starts with :data:`PERF_PREFIX`.
"""

import statistics
import time
from typing import Optional

import psutil
import pytorch_lightning as pl
import torch

PERF_PREFIX = "perf/"


def seconds_since_process_start() -> float:
    """Return the seconds since the operating system started this process (imports included)."""
    return time.time() - psutil.Process().create_time()


class TimingCallback(pl.Callback):
    """Time the epochs of a fit and the MLflow calls made during it, and log both when the fit ends.

    Logged metrics:
    ``perf/startup_seconds``: from the start of the process to the first training step. Only the
    first run of a process includes the imports.
    ``perf/epoch_seconds``: the median time of one training epoch with its validation.
    ``perf/train_samples_per_second``: training samples divided by ``perf/epoch_seconds``.
    ``perf/fit_seconds``: the whole ``Trainer.fit`` call.
    ``perf/mlflow_seconds_per_epoch`` and ``perf/mlflow_share``: the time spent in the logger's
    MLflow calls per epoch, and its ratio to ``perf/epoch_seconds``.
    ``perf/gpu_max_memory_mb``: on a GPU, the peak memory that PyTorch allocated during the fit.
    """

    def __init__(self, train_samples: int) -> None:
        self.train_samples = train_samples
        self.epoch_seconds: list[float] = []
        self.startup_seconds: Optional[float] = None
        self._fit_started = 0.0
        self._epoch_started = 0.0
        self._logger_seconds_at_fit_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._fit_started = time.perf_counter()
        self._logger_seconds_at_fit_start = _logger_seconds(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.startup_seconds is None:
            self.startup_seconds = seconds_since_process_start()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation loop before this hook, so the time includes it.
        self.epoch_seconds.append(time.perf_counter() - self._epoch_started)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.epoch_seconds or trainer.logger is None:
            return
        epoch_seconds = statistics.median(self.epoch_seconds)
        mlflow_per_epoch = (_logger_seconds(trainer) - self._logger_seconds_at_fit_start) / len(self.epoch_seconds)
        metrics = {
            f"{PERF_PREFIX}epoch_seconds": epoch_seconds,
            f"{PERF_PREFIX}train_samples_per_second": self.train_samples / epoch_seconds,
            f"{PERF_PREFIX}fit_seconds": time.perf_counter() - self._fit_started,
            f"{PERF_PREFIX}mlflow_seconds_per_epoch": mlflow_per_epoch,
            f"{PERF_PREFIX}mlflow_share": mlflow_per_epoch / epoch_seconds,
        }
        if self.startup_seconds is not None:
            metrics[f"{PERF_PREFIX}startup_seconds"] = self.startup_seconds
        if pl_module.device.type == "cuda":
            metrics[f"{PERF_PREFIX}gpu_max_memory_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        trainer.logger.log_metrics(metrics)


def _logger_seconds(trainer: pl.Trainer) -> float:
    return getattr(trainer.logger, "mlflow_seconds", 0.0)
