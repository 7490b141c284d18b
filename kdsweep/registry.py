"""MLflow models of the trained networks: logged with each run, and the best student of a sweep registered.

Each teacher and student run logs its network as the MLflow model ``model`` (MLflow's PyTorch
flavor), behind the standardisation of its training data (see
:class:`kdsweep.models.StandardizedClassifier`), with a signature and an input example. So
``mlflow.pyfunc.load_model`` predicts logits from images of the dataset's shape with pixel
values in [0, 1]. MLflow stores it as a ``torch.export`` program, which loads without kdsweep.
"""

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from torch import nn

from kdsweep.data import DataSplits
from kdsweep.models import StandardizedClassifier

log = logging.getLogger(__name__)

# The name of the logged model of every teacher and student run.
MODEL_NAME = "model"
# Images in the input example. MLflow marks the batch dimension of the stored program dynamic
# only when the example has more than one image.
EXAMPLE_IMAGES = 2
# The tag of a registered model version that names the sweep's parent run. The trial's other
# tags use the names of the run tags and params: optuna.trial_number, distill.alpha, ...
SWEEP_RUN_TAG = "kdsweep.sweep_run_id"
# The sweep's parent run records the model version it registered, as NAME/VERSION.
REGISTERED_VERSION_TAG = "kdsweep.registered_model_version"


@dataclass(frozen=True)
class LoggedModel:
    """The MLflow model that a run logged."""

    model_id: str
    uri: str


def serving_model(network: nn.Module, splits: DataSplits) -> StandardizedClassifier:
    """Return a CPU copy of a trained network in eval mode that takes raw pixel values."""
    network = copy.deepcopy(network).cpu().eval()
    return StandardizedClassifier(network, splits.mean, splits.std).eval()


def input_example(splits: DataSplits) -> torch.Tensor:
    """Return the first validation images as raw pixel values: the standardisation undone."""
    images = splits.val.tensors[0][:EXAMPLE_IMAGES]
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


def log_model(model: nn.Module, example: torch.Tensor, *, tracking_uri: str, experiment_id: str,
              run_id: str) -> LoggedModel:
    """Log ``model`` (in eval mode, on the CPU) as the MLflow model of run ``run_id``.

    MLflow stores the model as a ``torch.export`` program. A network that ``torch.export``
    cannot trace is pickled instead, with a warning; loading it then needs kdsweep and the
    network's own module importable.
    """
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    # MLflow 3.17 puts a model logged outside an active run into the active experiment, not the run's.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    arguments = dict(name=MODEL_NAME, run_id=run_id, signature=signature, input_example=example.numpy(),
                     # Requirements given here, so that MLflow does not load the model in a subprocess to find them.
                     pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    try:
        info = mlflow.pytorch.log_model(model, serialization_format="pt2", **arguments)
    except Exception as error:  # torch.export raises many types for code it cannot trace.
        log.warning("torch.export cannot trace %s (%s: %s); logging the model pickled instead",
                    type(model.network).__name__, type(error).__name__, str(error).splitlines()[0])
        info = mlflow.pytorch.log_model(model, serialization_format="pickle", **arguments)
    return LoggedModel(model_id=info.model_id, uri=info.model_uri)


def logged_model(client: MlflowClient, run_id: str) -> Optional[LoggedModel]:
    """Return the model named ``model`` that run ``run_id`` logged, or None if it logged none."""
    outputs = client.get_run(run_id).outputs
    for output in (outputs.model_outputs if outputs else None) or []:
        model = client.get_logged_model(output.model_id)
        if model.name == MODEL_NAME:
            return LoggedModel(model_id=model.model_id, uri=model.model_uri)
    return None


def register_student(client: MlflowClient, name: str, run_id: str, tags: dict[str, str]) -> Optional[ModelVersion]:
    """Register the model of student run ``run_id`` as a version of registered model ``name``.

    A run already registered under ``name`` keeps its version, so a study that continues does not
    register its best trial twice. Return None, with a warning, if the run logged no model.
    """
    for version in client.search_model_versions(f"run_id='{run_id}'"):
        if version.name == name:
            log.info("The student of run %s is already registered as %s version %s", run_id, name, version.version)
            return version
    model = logged_model(client, run_id)
    if model is None:
        log.warning("Run %s logged no model, so no model version is registered under %s", run_id, name)
        return None
    try:
        client.create_registered_model(name, description="Students distilled by kdsweep sweeps: each version is "
                                                          "the best trial of one sweep.")
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(name, source=model.uri, run_id=run_id, tags=tags, model_id=model.model_id)
    log.info("Registered the student of run %s as %s version %s", run_id, name, version.version)
    return version
