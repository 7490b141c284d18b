"""The sweeper's settings (``hydra.sweeper.*``), registered as ``hydra/sweeper=kdsweep_optuna``."""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    """Settings of an Optuna study run through Hydra's multirun."""

    _target_: str = "hydra_plugins.kdsweep_optuna_sweeper.optuna_sweeper.OptunaSweeper"

    # Search space in Hydra's override grammar, e.g. {"distill.alpha": "interval(0, 1)"}.
    # Sweep overrides on the command line are added to it and win over it.
    params: dict[str, str] = field(default_factory=dict)

    # The metric that the trial job returns and the study optimises, or a list of metrics for a
    # multi-objective study (with one direction each). Only validation metrics and model
    # properties may be optimised: test metrics are reported, never optimised on.
    metric: Any = "val/acc"
    direction: Any = "maximize"

    # The study's total number of trials: rerunning a study continues it up to this count, and
    # several sweep processes on one study share it.
    n_trials: int = 20
    # Trials run at once, each in its own process with its share of the CPU cores and its own GPUs.
    n_jobs: int = 1

    # One of tpe, random, grid, cmaes, gp, qmc, nsgaii, seeded with `seed` so that a sweep repeats.
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = 0

    # One of none, median, percentile, successive_halving, hyperband, threshold, with the pruner class's
    # keyword arguments in pruner_options. Each trial reports the first metric after every epoch.
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)

    # Points tried first when the study is new, e.g. [{"distill.alpha": 0.0}] for the baseline.
    enqueue: list[Any] = field(default_factory=list)

    # Optuna storage: None for a journal file `optuna.journal` in the working directory, a path
    # for a journal file elsewhere, or a database URL such as postgresql://user@host/db.
    storage: Optional[str] = None
    study_name: str = "kdsweep"

    # The sweep stops once more than this fraction of the trials it ran have failed.
    max_failure_rate: float = 0.0

    # Seconds between the timestamps a sweep writes on its running trials. A later sweep fails a
    # RUNNING trial of another host whose timestamp is 3 intervals old (same-host trials are
    # checked by process id instead).
    heartbeat_interval: float = 60.0


ConfigStore.instance().store(group="hydra/sweeper", name="kdsweep_optuna", node=OptunaSweeperConf,
                             provider="kdsweep")
