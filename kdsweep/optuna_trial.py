"""The Optuna side of one trial job: storage, pruners, and reporting validation accuracy per epoch.

A sweep starts each trial job with ``KDSWEEP_OPTUNA_TRIAL`` set to a JSON object that names the
storage, the study, the trial id and the pruner. A job can therefore report to its trial from any
process or host that reaches the same storage.
"""

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import optuna
import pytorch_lightning as pl

TRIAL_ENV = "KDSWEEP_OPTUNA_TRIAL"
DEFAULT_JOURNAL = "optuna.journal"

PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}


def storage_location(storage: Optional[str]) -> str:
    """Return the database URL as given, or the absolute path of the journal file to use."""
    if storage and "://" in storage:
        return storage
    return str(Path(storage or DEFAULT_JOURNAL).expanduser().absolute())


def open_storage(location: str) -> optuna.storages.BaseStorage:
    """Open a database URL as an RDBStorage, or a file path as a journal file (safe for several processes)."""
    if "://" in location:
        return optuna.storages.RDBStorage(location)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(location))


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    return PRUNERS[name](**options)


def trial_settings(location: str, study_name: str, trial_id: int, monitor: str, pruner: str,
                   pruner_options: dict[str, Any]) -> str:
    """Return the value of ``KDSWEEP_OPTUNA_TRIAL`` for one trial job; ``monitor`` is the metric to report."""
    return json.dumps({"storage": location, "study_name": study_name, "trial_id": trial_id, "monitor": monitor,
                       "pruner": pruner, "pruner_options": pruner_options})


def trial_from_environment() -> Optional[tuple[optuna.Trial, str]]:
    """Return the Optuna trial this job runs for and the metric it reports, or None outside a sweep."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    settings = json.loads(text)
    study = optuna.load_study(
        study_name=settings["study_name"],
        storage=open_storage(settings["storage"]),
        pruner=make_pruner(settings["pruner"], settings["pruner_options"]),
    )
    # NOTE: Optuna's docs advise against calling this constructor directly, but it is the only
    # way to reopen a trial by its id in another process (checked with Optuna 5.1).
    return optuna.trial.Trial(study, settings["trial_id"]), settings["monitor"]


class PruningCallback(pl.Callback):
    """Report a validation metric to the trial after every epoch, and stop the trial once the pruner prunes it."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        epoch = trainer.current_epoch
        value = float(value)
        prune = False
        if trainer.is_global_zero:
            # Rank 0 alone reports and queries the pruner, and every rank follows its decision, so all
            # ranks stop together and the trial gets one value per epoch.
            if math.isfinite(value):
                self.trial.report(value, step=epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            raise optuna.TrialPruned(f"pruned after epoch {epoch} with {self.monitor}={value:.4f}")
