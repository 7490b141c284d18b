"""MLflow tracking: where runs go, how they are tagged, and the resolved config as params and artifact.

Every run goes through one Lightning ``MLFlowLogger`` (a subclass that keeps parameter values
whole); everything logged outside the Trainer uses that logger's own ``MlflowClient``.
"""

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from kdsweep import provenance

ROLE_TAG = "kdsweep.role"
TEACHER_RUN_TAG = "kdsweep.teacher_run_id"
TEACHER_KEY_TAG = "kdsweep.teacher_key"
STUDY_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.trial_state"
TEACHER_LOGITS_TAG = "kdsweep.teacher_logits"
ACCELERATOR_TAG = "kdsweep.accelerator"
DEVICE_NAME_TAG = "kdsweep.device_name"
DEVICE_COUNT_TAG = "kdsweep.device_count"
FAIL_REASON_TAG = "kdsweep.fail_reason"
STOP_REASON_TAG = "kdsweep.stop_reason"
REPRODUCTION_OF_TAG = "kdsweep.reproduction_of"
CONFIG_ARTIFACT = "config.yaml"

# A sweep passes its MLflow parent run and the Optuna trial to each trial job through these
# environment variables (set per job by Hydra's hydra.job.env_set).
PARENT_RUN_ENV = "KDSWEEP_PARENT_RUN_ID"
STUDY_NAME_ENV = "KDSWEEP_STUDY_NAME"
TRIAL_NUMBER_ENV = "KDSWEEP_TRIAL_NUMBER"
# kdsweep-reproduce passes the runs it repeats, as JSON {"student": run id, "teacher": run id}.
REPRODUCTION_ENV = "KDSWEEP_REPRODUCTION_OF"


def log_hardware(logger: "RunLogger", trainer: "pl.Trainer") -> None:
    """Tag the run with the accelerator, the device name and the number of processes that train it."""
    if logger.run_id is None:  # Data-parallel ranks other than 0 log nothing.
        return
    root_device = trainer.strategy.root_device
    if root_device.type == "cuda":
        device_name = torch.cuda.get_device_name(root_device)
    else:
        device_name = provenance.cpu_model()
    for key, value in ((ACCELERATOR_TAG, root_device.type), (DEVICE_NAME_TAG, device_name),
                       (DEVICE_COUNT_TAG, str(trainer.world_size))):
        logger.experiment.set_tag(logger.run_id, key, value)


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Return ``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the working directory.

    The SQLite default is the store that ``mlflow ui`` opens when started in the same directory.
    """
    if uri:
        return str(uri)
    from_environment = os.environ.get("MLFLOW_TRACKING_URI")
    if from_environment:
        return from_environment
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Flatten a resolved config to dotted keys (``distill.alpha``) with whole string values."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    visit("", container)
    return flat


def git_commit() -> Optional[str]:
    """Return the commit of the checkout that contains this package, or None outside a git checkout."""
    return provenance.code_state().commit


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, but parameter values are logged whole rather than cut at 250 characters.

    ``mlflow_seconds`` accumulates the wall-clock time spent in its metric and parameter calls.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mlflow_seconds = 0.0

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        started = time.perf_counter()
        log_params(self.experiment, self.run_id, params)
        self.mlflow_seconds += time.perf_counter() - started

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        started = time.perf_counter()
        super().log_metrics(metrics, step)
        self.mlflow_seconds += time.perf_counter() - started

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning calls this after every fit and test. The run stays open here and run_status
        # ends it once, with the status that fits how the whole run ended.
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params with whole values, in batches of the most MLflow takes in one call."""
    entries = []
    for key, value in params.items():
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            raise ValueError(
                f"config value {key} is {len(text)} characters long; MLflow stores at most "
                f"{MAX_PARAM_VAL_LENGTH} per parameter"
            )
        entries.append(Param(key=key, value=text))
    for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id=run_id, params=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def create_logger(tracking_cfg: DictConfig, *, role: str, run_name: str, tags: Mapping[str, str]) -> RunLogger:
    """Create the logger for one run, tagged with its provenance; the MLflow run itself starts on first use."""
    all_tags = {ROLE_TAG: role, **provenance.process_tags(), **tags}
    reproduced = reproduction_of(role)
    if reproduced:
        all_tags[REPRODUCTION_OF_TAG] = reproduced
    return RunLogger(
        experiment_name=tracking_cfg.experiment,
        tracking_uri=resolve_tracking_uri(tracking_cfg.uri),
        run_name=run_name,
        tags=all_tags,
    )


def reproduction_of(role: str) -> Optional[str]:
    """Return the run that a run of ``role`` repeats under kdsweep-reproduce, or None."""
    runs = json.loads(os.environ.get(REPRODUCTION_ENV) or "{}")
    return runs.get(role)


def sweep_tags_from_environment() -> dict[str, str]:
    """Return the parent-run and trial tags for a job that a sweep started, or {} outside a sweep."""
    tags = {}
    if os.environ.get(PARENT_RUN_ENV):
        tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(STUDY_NAME_ENV):
        tags[STUDY_TAG] = os.environ[STUDY_NAME_ENV]
    if os.environ.get(TRIAL_NUMBER_ENV):
        tags[TRIAL_NUMBER_TAG] = os.environ[TRIAL_NUMBER_ENV]
    return tags


def log_config(logger: RunLogger, cfg: DictConfig) -> None:
    """Log the resolved config as flattened params and as a YAML artifact, with the provenance artifacts.

    The provenance record contains the run's tags. A checkout with uncommitted changes adds them as
    the patch ``git_diff.patch``, which ``git apply`` takes on a checkout of the logged commit.
    """
    if logger.run_id is None:  # Data-parallel ranks other than 0 log nothing.
        return
    logger.log_hyperparams(flatten_config(cfg))
    files = {CONFIG_ARTIFACT: OmegaConf.to_yaml(cfg, resolve=True), provenance.RECORD_ARTIFACT: provenance.record(logger.tags)}
    code = provenance.code_state()
    if code.dirty:
        files[provenance.DIFF_ARTIFACT] = code.diff
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            path = Path(folder) / name
            path.write_text(text)
            logger.experiment.log_artifact(logger.run_id, str(path))


@contextlib.contextmanager
def run_status(logger: RunLogger, *, pruned: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """End the logger's MLflow run as FINISHED, or by how the block raised.

    An exception of a type in ``pruned`` ends the run as KILLED with the tag ``optuna.trial_state``
    set to PRUNED, Ctrl-C (or SystemExit) ends it as KILLED, and any other exception as FAILED with
    the reason in the tag ``kdsweep.fail_reason``. The exception is raised again in every case.
    """
    try:
        yield
    except pruned as error:
        logger.experiment.set_tag(logger.run_id, TRIAL_STATE_TAG, "PRUNED")
        logger.experiment.set_tag(logger.run_id, STOP_REASON_TAG, _truncate(str(error)))
        _terminate(logger, RunStatus.to_string(RunStatus.KILLED))
        raise
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C during fit into SystemExit.
        _terminate(logger, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        logger.experiment.set_tag(logger.run_id, FAIL_REASON_TAG, _truncate(f"{type(error).__name__}: {error}"))
        _terminate(logger, RunStatus.to_string(RunStatus.FAILED))
        raise
    _terminate(logger, RunStatus.to_string(RunStatus.FINISHED))


def set_tag(logger: RunLogger, key: str, value: str) -> None:
    """Set a tag on the logger's run; data-parallel ranks other than 0 have no run and set nothing."""
    if logger.run_id is not None:
        logger.experiment.set_tag(logger.run_id, key, value)


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def _terminate(logger: RunLogger, status: str) -> None:
    if logger.run_id is not None:
        logger.experiment.set_terminated(logger.run_id, status)


def existing_store_client(uri: Optional[str]) -> tuple[MlflowClient, str]:
    """Return a client of an existing MLflow store and its URI; ``uri`` None means the default store.

    Raise FileNotFoundError for a SQLite file that does not exist, which MLflow would create empty.
    """
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"--tracking-uri={uri}: no such SQLite file; run the command in the folder that "
                                f"holds mlflow.db, or pass the store's URI")
    if "://" not in uri or uri.startswith("file:"):
        raise FileNotFoundError(f"--tracking-uri={uri}: a folder or file path is MLflow's file store, which kdsweep "
                                f"does not write; give the database URI, such as sqlite:///PATH/mlflow.db")
    return MlflowClient(uri), uri


def client_for(tracking_cfg: DictConfig) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(tracking_cfg.uri))


def experiment_id(client: MlflowClient, name: str) -> str:
    """Return the id of experiment ``name``, creating it if needed (safe when processes race to create it)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_exists(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
