"""The study loop: ask Optuna for a trial, launch it as a Hydra job, tell Optuna its result.

Each trial job is one kdsweep run (see ``kdsweep.train``). It logs a nested MLflow run under the
sweep's parent run, reports its validation metric to its trial after every epoch (for the pruner),
and returns its final metrics, from which the study takes its objectives.
"""

import logging
import math
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.plugins import Plugins
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from hydra_plugins.kdsweep_optuna_sweeper._search_space import (
    SearchSpace,
    build_search_space,
    corner_values,
    describe,
    format_override_value,
)
from hydra_plugins.kdsweep_optuna_sweeper._study_tools import (
    Heartbeat,
    fail_orphaned_trials,
    fail_running_trial,
    mark_trial_owner,
    trial_claim_lock,
    write_plots,
    write_results,
)
from kdsweep import optuna_trial, provenance, registry, summary, tracking
from kdsweep.checks import ConfigError, exit_on_config_error
from kdsweep.seeding import draw_seed

log = logging.getLogger(__name__)

class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its stop call, which works only inside ``study.optimize``.

    The sweeper calls ``is_exhausted`` before each trial instead.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


PARENT_RUN_ATTR = "mlflow_parent_run_id"
# The seed drawn for a study whose config sets none, kept so that a continued study reuses it.
SEED_ATTR = "kdsweep.seed"
# Launchers whose jobs run on other machines (submitit's SLURM launcher, Ray's on AWS): the sweep
# process checks their trainer settings without its own accelerators.
REMOTE_LAUNCHERS = ("SlurmLauncher", "RayAWSLauncher")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": AskTellGridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}


class SweepFailedError(CompactHydraException):
    """Too many trials of a sweep failed."""


class OptunaSweeperImpl(Sweeper):
    def __init__(
        self,
        params: DictConfig,
        metric: Any,
        direction: Any,
        n_trials: int,
        n_jobs: int,
        sampler: str,
        sampler_options: DictConfig,
        seed: Optional[int],
        pruner: str,
        pruner_options: DictConfig,
        enqueue: Any,
        storage: Optional[str],
        study_name: str,
        max_failure_rate: float,
        heartbeat_interval: float,
    ) -> None:
        self.params = _plain(params) or {}
        self.metrics = _as_list(metric)
        self.directions = _as_list(direction)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler_name = sampler
        self.sampler_options = _plain(sampler_options) or {}
        self.seed = seed
        self.pruner_name = pruner
        self.pruner_options = _plain(pruner_options) or {}
        self.enqueue = _plain(enqueue) or []
        self.storage = storage
        self.study_name = study_name
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval = heartbeat_interval

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        with exit_on_config_error():
            self._check_settings()
            self._check_launcher()
            space = build_search_space(self.params, arguments)
            if not space.distributions:
                raise ConfigError("hydra.sweeper.params is empty: give at least one search range, "
                                  "e.g. distill.alpha=interval(0,1)")
            seed_override = self._draw_absent_seed(space)
            base_cfg = self._check_trial_configs(space)
            self._gpu_slots(base_cfg)
            self._check_enqueued_points(space)
            self.location = optuna_trial.storage_location(self.storage)
            study = self._open_study(space)
            if seed_override is not None:
                self._keep_study_seed(study, space, seed_override)

        client, parent_run_id = self._open_parent_run(study, space, base_cfg)
        self._end_orphaned_trials(client, study)
        log.info(
            "Study %s (storage %s, sampler %s, pruner %s, %s %s, %d trials, %d at once) logging to MLflow "
            "experiment %s, parent run %s",
            self.study_name, self.location, self.sampler_name, self.pruner_name, "/".join(self.directions),
            "/".join(self.metrics), self.n_trials, self.n_jobs, base_cfg.tracking.experiment, parent_run_id,
        )
        self.started_here: set[int] = set()
        self.heartbeat = Heartbeat(study, self.heartbeat_interval)
        try:
            results = self._run_trials(study, space, parent_run_id, base_cfg)
        except BaseException as error:
            self.heartbeat.stop()
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            self._fail_unfinished_trials(study, "the sweep was interrupted" if interrupted else
                                         f"the sweep stopped ({type(error).__name__})")
            client.set_terminated(parent_run_id, "KILLED" if interrupted else "FAILED")
            raise

        self.heartbeat.stop()
        self._report(client, study, parent_run_id, base_cfg)
        client.set_terminated(parent_run_id, "FINISHED")
        return results

    def _draw_absent_seed(self, space: SearchSpace) -> Optional[int]:
        """Draw the seed of every trial when the config sets none (``seed=null``) and the sweep does not vary it.

        Each trial job would otherwise draw its own seed, and with it train its own teacher.
        Return the index in ``space.fixed`` of the added ``seed=N`` override, or None.
        """
        if "seed" in space.distributions or self._compose(space.fixed).get("seed") is not None:
            return None
        space.fixed.append(f"seed={draw_seed()}")
        return len(space.fixed) - 1

    def _keep_study_seed(self, study: optuna.Study, space: SearchSpace, index: int) -> None:
        """Store the drawn seed with a new study, or take the stored one when the study continues."""
        stored = study.user_attrs.get(SEED_ATTR)
        if stored is None:
            study.set_user_attr(SEED_ATTR, int(space.fixed[index].partition("=")[2]))
        else:
            space.fixed[index] = f"seed={stored}"
        log.info("The config sets no seed; every trial of study %s uses %s", self.study_name, space.fixed[index])

    # Checks made before the study or any MLflow run is touched.

    def _check_settings(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials!r}: must be a whole number >= 1")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={self.n_jobs!r}: must be a whole number >= 1")
        for direction in self.directions:
            if direction not in DIRECTIONS:
                raise ConfigError(f"hydra.sweeper.direction={direction!r}: choose maximize or minimize")
        if len(self.directions) != len(self.metrics):
            raise ConfigError(f"hydra.sweeper.direction={self.directions}: give one direction per metric "
                              f"in hydra.sweeper.metric={self.metrics}")
        from kdsweep.train import OPTIMISABLE_METRICS

        for metric in self.metrics:
            if not metric or str(metric).startswith("test/"):
                raise ConfigError(f"hydra.sweeper.metric={metric!r}: optimise a validation metric such as "
                                  f"val/acc; the test split is only reported")
            if metric not in OPTIMISABLE_METRICS:
                raise ConfigError(f"hydra.sweeper.metric={metric!r}: not a metric that trials return; "
                                  f"choose from {', '.join(OPTIMISABLE_METRICS)}")
        if self.sampler_name not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={self.sampler_name!r}: choose one of {', '.join(SAMPLERS)}")
        if self.pruner_name not in optuna_trial.PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={self.pruner_name!r}: choose one of "
                              f"{', '.join(optuna_trial.PRUNERS)}")
        if self.pruner_name != "none" and len(self.metrics) > 1:
            raise ConfigError(f"hydra.sweeper.pruner={self.pruner_name!r}: Optuna cannot prune a multi-objective "
                              f"study; set hydra.sweeper.pruner=none or optimise one metric")
        try:
            optuna_trial.make_pruner(self.pruner_name, self.pruner_options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"hydra.sweeper.pruner_options={self.pruner_options}: invalid for pruner "
                              f"{self.pruner_name} ({error})") from None
        interval = self.heartbeat_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ConfigError(f"hydra.sweeper.heartbeat_interval={interval!r}: must be a number of seconds > 0")
        rate = self.max_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={rate!r}: must be a number in [0, 1]")

    def _check_launcher(self) -> None:
        if type(self.launcher).__name__ == "SlurmLauncher" and not shutil.which("srun"):
            choice = self.config.hydra.runtime.choices.get("hydra/launcher")
            raise ConfigError(f"hydra/launcher={choice}: SLURM's srun is not on PATH; start the sweep on a "
                              f"machine of the SLURM cluster, or use hydra/launcher=submitit_local")

    def _check_enqueued_points(self, space: SearchSpace) -> None:
        for index, point in enumerate(self.enqueue):
            if "val/agreement" in self.metrics and point.get("distill.alpha") == 0:
                raise ConfigError(f"hydra.sweeper.enqueue[{index}].distill.alpha=0: hydra.sweeper.metric="
                                  f"val/agreement needs a teacher; remove the alpha = 0 point")
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

        hardware = self._trials_run_here()
        base_cfg = self._compose(space.fixed)
        prepare(base_cfg, check_hardware=hardware)
        if "distill.alpha" not in space.distributions:
            self._check_metrics_available(base_cfg)
        for key, distribution in space.distributions.items():
            for value in corner_values(distribution):
                override = f"{key}={format_override_value(value)}"
                try:
                    cfg = self._compose([*space.fixed, override])
                    prepare(cfg, check_hardware=hardware)
                    self._check_metrics_available(cfg)
                except ConfigError as error:
                    raise ConfigError(f"search range {key}={describe(distribution)} reaches {error}") from None
        return base_cfg

    def _gpu_slots(self, base_cfg: DictConfig) -> list[Optional[str]]:
        """Return the GPUs of each parallel trial worker (see ``gpu_slots``), raising ConfigError if they do not fit."""
        from hydra_plugins.kdsweep_optuna_sweeper._workers import gpu_slots

        if self.n_jobs == 1 or not isinstance(self.launcher, BasicLauncher):
            return [None] * self.n_jobs
        accelerator, devices = base_cfg.trainer.get("accelerator", "auto"), base_cfg.trainer.get("devices", 1)
        import torch

        if accelerator != "cpu" and not (isinstance(devices, int) and devices > 0) and torch.cuda.device_count() > 0:
            raise ConfigError(f"trainer.devices={devices!r} with hydra.sweeper.n_jobs={self.n_jobs}: give the number "
                              f"of devices per trial, so that each parallel trial gets GPUs of its own")
        try:
            return gpu_slots(self.n_jobs, devices if isinstance(devices, int) else 1, accelerator)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _trials_run_here(self) -> bool:
        """Return whether the launcher runs trials on this machine, so that its GPUs can be checked here."""
        return type(self.launcher).__name__ not in REMOTE_LAUNCHERS

    def _check_metrics_available(self, cfg: DictConfig) -> None:
        if "val/agreement" in self.metrics and cfg.distill.alpha == 0:
            raise ConfigError(f"distill.alpha=0: hydra.sweeper.metric=val/agreement needs a teacher, which a "
                              f"trial with alpha = 0 does not load")

    def _compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    # The study and its MLflow parent run.

    def _open_study(self, space: SearchSpace) -> optuna.Study:
        sampler = self._make_sampler(space, self.seed)
        pruner = optuna_trial.make_pruner(self.pruner_name, self.pruner_options)
        where = f"hydra.sweeper.storage={self.storage!r}"
        if "://" not in self.location:
            path = Path(self.location)
            if not path.parent.is_dir():
                raise ConfigError(f"{where}: folder {path.parent} does not exist")
            if path.is_dir():
                raise ConfigError(f"{where}: {path} is a folder; give the path of a journal file")
        try:
            # Locked, because processes that create a new database's tables at once collide.
            with trial_claim_lock(self.location):
                storage = optuna_trial.open_storage(self.location)
                study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                            pruner=pruner, directions=self.directions, load_if_exists=True)
        except Exception as error:  # SQLAlchemy, the database drivers and the journal raise many types here.
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise ConfigError(f"{where}: cannot be opened as an Optuna storage "
                              f"({type(error).__name__}: {first_line})") from None

        stored = [direction.name.lower() for direction in study.directions]
        if stored != self.directions:
            raise ConfigError(f"hydra.sweeper.direction={self.directions}: study {self.study_name!r} was created "
                              f"with {stored}; use those directions or a new hydra.sweeper.study_name")
        if study.trials and self.seed is not None:
            # A resumed study draws from a seed moved on by its trial count, so it does not repeat
            # the points of its first session, and a rerun of the same history still repeats exactly.
            study.sampler = self._make_sampler(space, self.seed + len(study.trials))
        existing = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
        for point in self.enqueue:
            # A point whose every trial failed (a baseline cut short by Ctrl-C, say) is tried again.
            if not any(_has_point(trial, point) for trial in existing):
                study.enqueue_trial(point)
        return study

    def _make_sampler(self, space: SearchSpace, seed: Optional[int]) -> optuna.samplers.BaseSampler:
        options = {"seed": seed, **self.sampler_options}
        sampler_class = SAMPLERS[self.sampler_name]
        try:
            if self.sampler_name == "grid":
                return sampler_class(_grid(space), **options)
            return sampler_class(**options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"hydra.sweeper.sampler_options={self.sampler_options}: invalid for sampler "
                              f"{self.sampler_name} ({error})") from None

    def _open_parent_run(self, study: optuna.Study, space: SearchSpace, base_cfg: DictConfig) -> tuple[Any, str]:
        """Return an MLflow client and the sweep's parent run, created on the study's first sweep."""
        with trial_claim_lock(self.location):
            # Under the lock, because MLflow creates a new SQLite store's tables on first use,
            # and two processes doing so at once collide.
            client = tracking.client_for(base_cfg.tracking)
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)
            if run_id and tracking.run_exists(client, run_id):
                client.update_run(run_id, status="RUNNING")
                log.info("Continuing study %s and its MLflow parent run %s", self.study_name, run_id)
                return client, run_id

            tags = {tracking.ROLE_TAG: "sweep", tracking.STUDY_TAG: self.study_name, **provenance.process_tags()}
            experiment = tracking.experiment_id(client, base_cfg.tracking.experiment)
            run_id = client.create_run(experiment, run_name=self.study_name, tags=tags).info.run_id
            params = {f"sweeper.{key}": str(value) for key, value in self._describe(space).items()}
            task_cfg = OmegaConf.masked_copy(base_cfg, [k for k in base_cfg if k != "hydra"])
            params.update(tracking.flatten_config(task_cfg))
            tracking.log_params(client, run_id, params)
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
            return client, run_id

    def _describe(self, space: SearchSpace) -> dict[str, Any]:
        described = {
            "study_name": self.study_name, "storage": self.location, "sampler": self.sampler_name,
            "seed": self.seed, "pruner": self.pruner_name, "n_trials": self.n_trials, "n_jobs": self.n_jobs,
            "metric": ",".join(self.metrics), "direction": ",".join(self.directions),
        }
        described.update({f"params.{key}": describe(dist) for key, dist in space.distributions.items()})
        return described

    def _end_orphaned_trials(self, client, study: optuna.Study) -> None:
        """Fail the trials a killed sweep left RUNNING, and end their MLflow runs as KILLED."""
        with trial_claim_lock(self.location):
            orphaned = fail_orphaned_trials(study, self.heartbeat_interval)
        for trial in orphaned:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id and tracking.run_exists(client, run_id):
                client.set_tag(run_id, tracking.TRIAL_STATE_TAG, "FAIL")
                client.set_terminated(run_id, "KILLED")

    # The trials.

    def _run_trials(self, study: optuna.Study, space: SearchSpace, parent_run_id: str,
                    base_cfg: DictConfig) -> list[Any]:
        if self.n_jobs == 1:
            return self._run_trials_in_launcher(study, space, parent_run_id)

        from hydra_plugins.kdsweep_optuna_sweeper._workers import LauncherPool, TrialProcessPool

        if isinstance(self.launcher, BasicLauncher):
            pool = TrialProcessPool(self.n_jobs, self.hydra_context, self.config, self.task_function,
                                    self._gpu_slots(base_cfg))
        else:
            pool = LauncherPool(self.launcher)
        results: list[Any] = []
        running: dict[Future, optuna.Trial] = {}
        stopped = False
        try:
            while True:
                while len(running) < self.n_jobs:
                    trial = self._claim_trial(study, space)
                    if trial is None:
                        break
                    running[pool.submit(self._trial_overrides(trial, space, parent_run_id), trial.number)] = trial
                if not running:
                    return results
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    trial = running.pop(future)
                    try:
                        job = pool.job_return(future)
                    except Exception as error:  # The worker process died or its result could not be sent back.
                        results.append(self._fail(study, trial, f"{type(error).__name__}: {error}"))
                    else:
                        results.append(self._tell(study, trial, job))
                self._check_failure_rate(study)
        except BaseException:
            stopped = True
            pool.shutdown(cancel=True)
            raise
        finally:
            if not stopped:
                pool.shutdown(cancel=False)

    def _run_trials_in_launcher(self, study: optuna.Study, space: SearchSpace, parent_run_id: str) -> list[Any]:
        results = []
        while (trial := self._claim_trial(study, space)) is not None:
            overrides = self._trial_overrides(trial, space, parent_run_id)
            (job,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            results.append(self._tell(study, trial, job))
            self._check_failure_rate(study)
        return results

    def _claim_trial(self, study: optuna.Study, space: SearchSpace) -> Optional[optuna.Trial]:
        """Ask for the next trial unless the study already has n_trials trials, counting other processes'."""
        with trial_claim_lock(self.location):
            sampler = study.sampler
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                log.info("The grid is exhausted")
                return None
            claimed = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
            if len(claimed) >= self.n_trials:
                return None
            trial = study.ask(space.distributions)
            mark_trial_owner(trial)
            self.started_here.add(trial.number)
            self.heartbeat.trial_ids.add(trial._trial_id)
            return trial

    def _trial_overrides(self, trial: optuna.Trial, space: SearchSpace, parent_run_id: str) -> list[str]:
        settings = optuna_trial.trial_settings(self.location, self.study_name, trial._trial_id, self.metrics[0],
                                               self.pruner_name, self.pruner_options)
        environment = {
            tracking.PARENT_RUN_ENV: parent_run_id,
            tracking.STUDY_NAME_ENV: self.study_name,
            tracking.TRIAL_NUMBER_ENV: trial.number,
            optuna_trial.TRIAL_ENV: settings,
        }
        return [
            *space.fixed,
            *(f"{key}={format_override_value(value)}" for key, value in trial.params.items()),
            *(f"++hydra.job.env_set.{key}={format_override_value(str(value))}" for key, value in environment.items()),
        ]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, job: JobReturn) -> Any:
        self.heartbeat.trial_ids.discard(trial._trial_id)
        try:
            if job.status != JobStatus.COMPLETED:
                # JobReturn keeps a failed job's exception here; its public getter also prints it.
                raise job._return_value
            result = job.return_value
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Trial %d finished: %s, state=PRUNED (%s)", trial.number, _describe_params(trial.params), pruned)
            return None
        except Exception as error:  # The job's own exception, raised again by JobReturn.
            return self._fail(study, trial, f"{type(error).__name__}: {error}")

        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        missing = [metric for metric in self.metrics if metric not in metrics]
        if missing:
            return self._fail(study, trial, f"the job returned no {missing}; it returned {sorted(metrics)}")
        values = [float(metrics[metric]) for metric in self.metrics]
        if not all(math.isfinite(value) for value in values):
            return self._fail(study, trial, f"{self.metrics} = {values}")

        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        trial.set_user_attr("teacher", result.get("teacher"))
        trial.set_user_attr("distill", result.get("distill"))
        study.tell(trial, values if len(values) > 1 else values[0])
        scores = ", ".join(f"{metric}={value:.4f}" for metric, value in zip(self.metrics, values))
        log.info("Trial %d finished: %s, %s, state=COMPLETE", trial.number, _describe_params(trial.params), scores)
        return result

    def _fail(self, study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        self.heartbeat.trial_ids.discard(trial._trial_id)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d finished: %s, state=FAIL (%s)", trial.number, _describe_params(trial.params), reason)
        return None

    def _check_failure_rate(self, study: optuna.Study) -> None:
        """Stop the sweep when too many of the trials this process ran have failed.

        Trials of earlier sessions do not count, so a study with old failures can still continue.
        """
        finished = [t for t in study.get_trials(deepcopy=False)
                    if t.number in self.started_here and t.state.is_finished()]
        failed = [t for t in finished if t.state == TrialState.FAIL]
        if failed and len(failed) / len(finished) > self.max_failure_rate:
            reasons = "; ".join(f"trial {t.number}: {t.user_attrs.get('fail_reason', 'unknown')}" for t in failed)
            raise SweepFailedError(
                f"{len(failed)} of {len(finished)} finished trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: {reasons}"
            )

    def _fail_unfinished_trials(self, study: optuna.Study, reason: str) -> None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in self.started_here:
                fail_running_trial(study, trial, reason)

    # The results.

    def _report(self, client, study: optuna.Study, parent_run_id: str, base_cfg: DictConfig) -> None:
        """Print the summary table, and write and log the results file, the table and the plots."""
        uri = tracking.resolve_tracking_uri(base_cfg.tracking.uri)
        table = summary.summarize(study, self.metrics, uri)
        print(table)
        folder = Path(str(self.config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.txt").write_text(table + "\n")
        files = [folder / "summary.txt", write_results(study, folder)]
        files += write_plots(study, folder, summary.TEMPERATURE_KEY, summary.ALPHA_KEY)
        for path in files:
            client.log_artifact(parent_run_id, str(path))
        log.info("Results, table and plots written to %s and logged to MLflow run %s", folder, parent_run_id)

        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed and len(self.metrics) == 1:
            best = study.best_trial
            client.log_metric(parent_run_id, f"best/{self.metrics[0]}", best.value)
            client.set_tag(parent_run_id, "optuna.best_trial_number", str(best.number))
            for key, value in best.params.items():
                client.set_tag(parent_run_id, f"optuna.best.{key}", str(value))
            name = base_cfg.tracking.get("registered_model_name")
            if name:
                self._register_best_student(client, best, parent_run_id, name)

    def _register_best_student(self, client, best: optuna.trial.FrozenTrial, parent_run_id: str, name: str) -> None:
        """Register the best trial's student as a version of registered model ``name``, tagged with the trial.

        A registry error is logged, not raised: the trials and their runs are complete by now.
        """
        from mlflow.exceptions import MlflowException

        run_id = best.user_attrs.get("mlflow_run_id")
        if not run_id:
            log.warning("Trial %d has no MLflow run, so no student is registered", best.number)
            return
        distill = best.user_attrs.get("distill") or {}
        teacher = best.user_attrs.get("teacher") or {}
        tags = {
            registry.SWEEP_RUN_TAG: parent_run_id,
            tracking.STUDY_TAG: self.study_name,
            tracking.TRIAL_NUMBER_TAG: str(best.number),
            summary.TEMPERATURE_KEY: str(distill.get(summary.TEMPERATURE_KEY)),
            summary.ALPHA_KEY: str(distill.get(summary.ALPHA_KEY)),
            # A baseline trial (alpha = 0) trains without a teacher.
            tracking.TEACHER_RUN_TAG: teacher.get("run_id") or "none",
            self.metrics[0]: str(best.value),
        }
        try:
            version = registry.register_student(client, name, run_id, tags)
        except MlflowException as error:
            log.error("Registering the student of trial %d (run %s) as %s failed: %s", best.number, run_id, name,
                      error)
            return
        if version is not None:
            client.set_tag(parent_run_id, registry.REGISTERED_VERSION_TAG, f"{name}/{version.version}")
            log.info("The best student, of trial %d (run %s), is %s version %s; export it with: "
                     "kdsweep-export %s", best.number, run_id, name, version.version, run_id)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _as_list(value: Any) -> list[Any]:
    value = _plain(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items())


def _has_point(trial: optuna.trial.FrozenTrial, point: dict[str, Any]) -> bool:
    """Return whether the trial has, or is queued with, the parameter values of ``point``."""
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    for key, value in point.items():
        if key not in params:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isclose(float(params[key]), float(value), rel_tol=0.0, abs_tol=1e-12):
                return False
        elif params[key] != value:
            return False
    return True


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
