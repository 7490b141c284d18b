"""The study loop: ask Optuna for a trial, launch it as a Hydra job, tell Optuna its result.

Each trial job is one kdsweep run (see ``kdsweep.train``). It logs a nested MLflow run under the
sweep's parent run and returns its metrics, one of which the study optimises.
"""

import logging
import math
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from hydra_plugins.kdsweep_optuna_sweeper._search_space import (
    SearchSpace,
    build_search_space,
    corner_values,
    describe,
    format_override_value,
)
from kdsweep import summary, tracking
from kdsweep.checks import ConfigError, exit_on_config_error

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random", "qmc", "gp", "nsgaii", "grid")


class SweepFailedError(RuntimeError):
    """Too many trials of a sweep failed."""


class OptunaSweeperImpl(Sweeper):
    def __init__(
        self,
        params: DictConfig,
        metric: str,
        direction: str,
        n_trials: int,
        sampler: str,
        sampler_options: DictConfig,
        seed: Optional[int],
        enqueue: Any,
        storage: Optional[str],
        study_name: str,
        max_failure_rate: float,
    ) -> None:
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}
        self.metric = metric
        self.direction = direction
        self.n_trials = n_trials
        self.sampler_name = sampler
        self.sampler_options = OmegaConf.to_container(sampler_options, resolve=True) if sampler_options else {}
        self.seed = seed
        self.enqueue = OmegaConf.to_container(enqueue, resolve=True) if enqueue else []
        self.storage = storage
        self.study_name = study_name
        self.max_failure_rate = max_failure_rate

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        with exit_on_config_error():
            self._check_settings()
            space = build_search_space(self.params, arguments)
            if not space.distributions:
                raise ConfigError("hydra.sweeper.params is empty: give at least one search range, "
                                  "e.g. distill.alpha=interval(0,1)")
            base_cfg = self._check_trial_configs(space)
            self._check_enqueued_points(space)
            study = self._open_study(space)

        client = tracking.client_for(base_cfg.tracking)
        parent_run_id = self._open_parent_run(client, study, space, base_cfg)
        log.info(
            "Study %s (storage %s, sampler %s, %s %s, %d trials) logging to MLflow experiment %s, parent run %s",
            self.study_name, self._storage_description(), self.sampler_name, self.direction, self.metric,
            self.n_trials, base_cfg.tracking.experiment, parent_run_id,
        )
        try:
            results = self._run_trials(study, space, parent_run_id)
        except BaseException:
            client.set_terminated(parent_run_id, "FAILED")
            raise

        table = summary.summarize(study, self.metric, tracking.resolve_tracking_uri(base_cfg.tracking.uri))
        print(table)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "summary.txt").write_text(table + "\n")
        client.log_artifact(parent_run_id, str(sweep_dir / "summary.txt"))
        self._log_best(client, study, parent_run_id)
        client.set_terminated(parent_run_id, "FINISHED")
        return results

    # Checks made before the study or any MLflow run is touched.

    def _check_settings(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials!r}: must be a whole number >= 1")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.direction={self.direction!r}: choose maximize or minimize")
        if not self.metric or self.metric.startswith("test/"):
            raise ConfigError(f"hydra.sweeper.metric={self.metric!r}: optimise a validation metric such as "
                              f"val/acc; the test split is only reported")
        if self.sampler_name not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={self.sampler_name!r}: choose one of {', '.join(SAMPLERS)}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: must be in [0, 1]")

    def _check_enqueued_points(self, space: SearchSpace) -> None:
        for index, point in enumerate(self.enqueue):
            for key, value in point.items():
                where = f"hydra.sweeper.enqueue[{index}].{key}={value!r}"
                distribution = space.distributions.get(key)
                if distribution is None:
                    raise ConfigError(f"{where}: not a swept parameter; swept: {', '.join(space.distributions)}")
                if not _contains(distribution, value):
                    raise ConfigError(f"{where}: outside its search range {describe(distribution)}")

    def _check_trial_configs(self, space: SearchSpace) -> DictConfig:
        """Compose and check the base config and the config at each end of every search range."""
        from kdsweep.train import prepare

        base_cfg = self._compose(space.fixed)
        prepare(base_cfg)
        for key, distribution in space.distributions.items():
            for value in corner_values(distribution):
                override = f"{key}={format_override_value(value)}"
                try:
                    prepare(self._compose([*space.fixed, override]))
                except ConfigError as error:
                    raise ConfigError(f"search range {key}={describe(distribution)} reaches {error}") from None
        return base_cfg

    def _compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    # The study and its MLflow parent run.

    def _open_study(self, space: SearchSpace) -> optuna.Study:
        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self._open_storage(),
                sampler=self._make_sampler(space),
                direction=self.direction,
                load_if_exists=True,
            )
        except ValueError as error:  # For example a stored study with the other direction.
            raise ConfigError(f"hydra.sweeper.study_name={self.study_name!r}: {error}") from None
        for point in self.enqueue:
            study.enqueue_trial(point, skip_if_exists=True)
        return study

    def _open_storage(self) -> optuna.storages.BaseStorage:
        if self.storage and "://" in self.storage:
            try:
                return optuna.storages.RDBStorage(self.storage)
            except Exception as error:  # SQLAlchemy raises many types for a URL it cannot open.
                raise ConfigError(f"hydra.sweeper.storage={self.storage!r}: cannot be opened "
                                  f"({type(error).__name__}: {error})") from None
        path = Path(self.storage or "optuna.journal").expanduser().absolute()
        if not path.parent.is_dir():
            raise ConfigError(f"hydra.sweeper.storage={self.storage!r}: folder {path.parent} does not exist")
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)

    def _storage_description(self) -> str:
        return self.storage or str(Path("optuna.journal").absolute())

    def _make_sampler(self, space: SearchSpace) -> optuna.samplers.BaseSampler:
        options = {"seed": self.seed, **self.sampler_options}
        if self.sampler_name == "grid":
            return optuna.samplers.GridSampler(_grid(space), **options)
        sampler_class = {
            "tpe": optuna.samplers.TPESampler,
            "random": optuna.samplers.RandomSampler,
            "qmc": optuna.samplers.QMCSampler,
            "gp": optuna.samplers.GPSampler,
            "nsgaii": optuna.samplers.NSGAIISampler,
        }[self.sampler_name]
        try:
            return sampler_class(**options)
        except TypeError as error:
            raise ConfigError(f"hydra.sweeper.sampler_options={self.sampler_options}: {error}") from None

    def _open_parent_run(self, client, study: optuna.Study, space: SearchSpace, base_cfg: DictConfig) -> str:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id and tracking.run_exists(client, run_id):
            client.update_run(run_id, status="RUNNING")
            log.info("Continuing study %s and its MLflow parent run %s", self.study_name, run_id)
            return run_id

        tags = {tracking.ROLE_TAG: "sweep", tracking.STUDY_TAG: self.study_name}
        commit = tracking.git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        experiment = tracking.experiment_id(client, base_cfg.tracking.experiment)
        run_id = client.create_run(experiment, run_name=self.study_name, tags=tags).info.run_id
        params = {f"sweeper.{key}": str(value) for key, value in self._describe(space).items()}
        task_cfg = OmegaConf.masked_copy(base_cfg, [k for k in base_cfg if k != "hydra"])
        params.update(tracking.flatten_config(task_cfg))
        tracking.log_params(client, run_id, params)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id

    def _describe(self, space: SearchSpace) -> dict[str, Any]:
        described = {
            "study_name": self.study_name, "storage": self._storage_description(), "sampler": self.sampler_name,
            "seed": self.seed, "n_trials": self.n_trials, "metric": self.metric, "direction": self.direction,
        }
        described.update({f"params.{key}": describe(dist) for key, dist in space.distributions.items()})
        return described

    # The trials.

    def _run_trials(self, study: optuna.Study, space: SearchSpace, parent_run_id: str) -> list[Any]:
        results = []
        sampler = study.sampler
        while _count(study, finished=True) < self.n_trials:
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                log.info("The grid is exhausted after %d trials", _count(study, finished=True))
                break
            trial = study.ask(space.distributions)
            overrides = [*space.fixed, *(f"{k}={format_override_value(v)}" for k, v in trial.params.items())]
            overrides += [
                f"++hydra.job.env_set.{tracking.PARENT_RUN_ENV}={parent_run_id}",
                f"++hydra.job.env_set.{tracking.STUDY_NAME_ENV}={format_override_value(self.study_name)}",
                f"++hydra.job.env_set.{tracking.TRIAL_NUMBER_ENV}={trial.number}",
            ]
            (job,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            results.append(self._tell(study, trial, job))
            self._check_failure_rate(study)
        return results

    def _tell(self, study: optuna.Study, trial: optuna.Trial, job) -> Any:
        try:
            result = job.return_value
        except Exception as error:  # The job's own exception, re-raised by JobReturn.
            return self._fail(study, trial, f"{type(error).__name__}: {error}")

        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        if self.metric not in metrics:
            return self._fail(study, trial, f"the job returned no {self.metric!r}; it returned {sorted(metrics)}")
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            return self._fail(study, trial, f"{self.metric} is {value}")

        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        trial.set_user_attr("teacher", result.get("teacher"))
        trial.set_user_attr("distill", result.get("distill"))
        study.tell(trial, value)
        log.info("Trial %d finished: %s, %s=%.4f, state=COMPLETE", trial.number, _describe_params(trial.params),
                 self.metric, value)
        return result

    def _fail(self, study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d finished: %s, state=FAIL (%s)", trial.number, _describe_params(trial.params), reason)
        return None

    def _check_failure_rate(self, study: optuna.Study) -> None:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        failed = [t for t in finished if t.state == TrialState.FAIL]
        if failed and len(failed) / len(finished) > self.max_failure_rate:
            reasons = "; ".join(f"trial {t.number}: {t.user_attrs.get('fail_reason', 'unknown')}" for t in failed)
            raise SweepFailedError(
                f"{len(failed)} of {len(finished)} finished trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: {reasons}"
            )

    def _log_best(self, client, study: optuna.Study, parent_run_id: str) -> None:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed:
            return
        best = study.best_trial
        client.log_metric(parent_run_id, f"best/{self.metric}", best.value)
        client.set_tag(parent_run_id, "optuna.best_trial_number", str(best.number))
        for key, value in best.params.items():
            client.set_tag(parent_run_id, f"optuna.best.{key}", str(value))


def _count(study: optuna.Study, *, finished: bool) -> int:
    return sum(t.state.is_finished() == finished for t in study.get_trials(deepcopy=False))


def _describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items())


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return isinstance(value, (int, float)) and distribution.low <= value <= distribution.high


def _grid(space: SearchSpace) -> dict[str, list[Any]]:
    grid = {}
    for key, distribution in space.distributions.items():
        if isinstance(distribution, CategoricalDistribution):
            grid[key] = list(distribution.choices)
        elif distribution.step is not None:
            count = round((distribution.high - distribution.low) / distribution.step) + 1
            grid[key] = [distribution.low + i * distribution.step for i in range(count)]
        else:
            raise ConfigError(f"hydra.sweeper.params.{key}: the grid sampler needs choice() or range(), "
                              f"not a continuous interval")
    return grid
