"""Checks on a composed config, run before any data is trained on or any MLflow run starts.

Each failure raises :class:`ConfigError` with one line that names the key, the value given and
what is allowed; :func:`exit_on_config_error` turns it into that line on stderr and exit status 2.
"""

import contextlib
import math
import posixpath
import sys
from collections.abc import Sequence
from numbers import Real
from typing import Optional

import torch
from hydra.errors import CompactHydraException
from hydra.utils import get_object, instantiate
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from omegaconf import DictConfig
from torch import nn

from kdsweep.data import DATASETS


# NumPy's seeds are 32-bit, and Lightning seeds NumPy with the run's seed.
MAX_SEED = 2**32 - 1
# Tracking URI schemes that MLflow stores accept; an empty scheme is a local path.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# The maximum length of a registered model name: MLflow's SQL stores keep it in a VARCHAR(256) column.
MAX_MODEL_NAME_LENGTH = 256
# The maximum large batch of the inference timing, and the maximum seconds of timing per batch size.
MAX_INFERENCE_BATCH_SIZE = 65536
MAX_MIN_RUN_TIME = 60.0


class ConfigError(CompactHydraException, ValueError):
    """An invalid setting in the composed config."""


@contextlib.contextmanager
def exit_on_config_error():
    """Print a ConfigError raised in the block as one line and exit with status 2.

    Hydra would add a second line (a hint about HYDRA_FULL_ERROR) and, for a job, the overrides.
    """
    try:
        yield
    except ConfigError as error:
        print(f"kdsweep: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_config(cfg: DictConfig) -> None:
    """Check the values of a composed kdsweep config without loading data or building models."""
    temperature = _number(cfg, "distill.temperature")
    if not temperature > 0:
        raise ConfigError(f"distill.temperature={temperature}: the temperature T must be > 0")
    alpha = _number(cfg, "distill.alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha={alpha}: alpha (the weight of the soft targets) must be in [0, 1]")

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r}: unknown dataset; choose one of {', '.join(DATASETS)}")
    _check_data(cfg.data)
    if cfg.get("seed") is not None:  # An absent seed is drawn when the run starts.
        _check_whole(cfg.seed, "seed", 0, MAX_SEED)
    _check_tracking(cfg.tracking)
    _check_whole(cfg.inference.batch_size, "inference.batch_size", 1, MAX_INFERENCE_BATCH_SIZE)
    min_run_time = _number(cfg, "inference.min_run_time")
    if not 0 < min_run_time <= MAX_MIN_RUN_TIME:
        raise ConfigError(f"inference.min_run_time={min_run_time}: must be a number of seconds in "
                          f"(0, {MAX_MIN_RUN_TIME:g}]")

    for role in ("teacher", "student"):
        for key in ("max_epochs", "batch_size"):
            _check_whole(cfg[role][key], f"{role}.{key}", 1)
        _check_target(cfg[role].model._target_, f"{role}.model._target_")
        _check_target(cfg[role].optimizer._target_, f"{role}.optimizer._target_")


def check_logit_widths(teacher: nn.Module, student: nn.Module, input_shape: Sequence[int], num_classes: int,
                       dataset: str) -> None:
    """Check that teacher and student both output one logit per class of the dataset."""
    sample = torch.zeros(2, *input_shape)
    for role, model in (("teacher", teacher), ("student", student)):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            width = model(sample).shape[-1]
        model.train(was_training)
        if width != num_classes:
            raise ConfigError(
                f"{role}.model outputs {width} logits, but data={dataset} has {num_classes} classes; "
                f"teacher and student must both output {num_classes}"
            )


def check_optimizer(optimizer_cfg: DictConfig, model: nn.Module, key: str) -> None:
    """Build the optimizer once on ``model``, so that invalid arguments fail before training."""
    try:
        instantiate(optimizer_cfg)(model.parameters())
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}: invalid optimizer settings ({error})") from None


def _check_whole(value: object, key: str, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{key}={value!r}: must be a whole number {allowed}")


def _check_data(data: DictConfig) -> None:
    _check_whole(data.split_seed, "data.split_seed", 0, MAX_SEED)
    if data.name == "digits":
        for key in ("test_fraction", "val_fraction"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
                raise ConfigError(f"data.{key}={value!r}: must be a fraction between 0 and 1, exclusive")
        return
    _check_whole(data.val_size, "data.val_size", 1)
    if not isinstance(data.download, bool):
        raise ConfigError(f"data.download={data.download!r}: must be true or false")


def _check_tracking(tracking: DictConfig) -> None:
    if not isinstance(tracking.experiment, str) or not tracking.experiment.strip():
        raise ConfigError(f"tracking.experiment={tracking.experiment!r}: give a non-empty experiment name")
    name = tracking.get("registered_model_name")
    if name is not None and not _valid_model_name(name):
        raise ConfigError(f"tracking.registered_model_name={name!r}: give a name of 1 to {MAX_MODEL_NAME_LENGTH} "
                          f"characters without / or :, not . and not starting with .., or null to register no model (the default "
                          f"is tracking.experiment followed by -student)")
    if tracking.uri is not None:
        scheme = str(tracking.uri).partition("://")[0] if "://" in str(tracking.uri) else ""
        if scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ConfigError(f"tracking.uri={tracking.uri!r}: unsupported scheme; use a path or one of "
                              f"{', '.join(s + '://' for s in TRACKING_SCHEMES if s)}")
        if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
            raise ConfigError(f"tracking.uri={tracking.uri!r}: MLflow's file store is disabled unless "
                              f"MLFLOW_ALLOW_FILE_STORE=true; use a database such as sqlite:///PATH/mlflow.db")


def _valid_model_name(name: object) -> bool:
    """Return whether MLflow's registry accepts ``name``: MLflow 3.17 also rejects names that a path would change."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_MODEL_NAME_LENGTH:
        return False
    normalised = posixpath.normpath(name)
    return not any(c in name for c in "/:") and normalised == name and normalised != "." \
        and not normalised.startswith("..")


def _number(cfg: DictConfig, key: str) -> float:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    return float(value)


def _check_target(target: str, key: str) -> None:
    try:
        get_object(target)
    except Exception as error:  # Hydra wraps every import failure in a plain ImportError or its own type.
        raise ConfigError(f"{key}={target!r}: cannot be imported ({type(error).__name__}); "
                          f"give a dotted path such as kdsweep.models.MLP") from None
