"""The ``kdsweep-export`` command: write a logged student as TorchScript and ONNX, and check both files.

The student is the MLflow model that its run logged (see :mod:`kdsweep.registry`): it takes
images of the dataset's shape with pixel values in [0, 1] and returns logits. Each exported file
is loaded again (TorchScript with ``torch.jit.load``, ONNX with onnxruntime) and must give the
logged model's logits on the run's test split within an absolute tolerance.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdsweep import provenance, registry, tracking
from kdsweep.data import LOCATION_KEYS, DatasetNotFoundError, load_splits, raw_split
from kdsweep.reproduce import ReproduceError, download_config, find_run

# The default largest absolute difference between an exported file's logits and the logged model's.
# On digits, the built-in MLP and CNN differed by at most 1.2e-7 on CPU (torch 2.14, onnxruntime 1.32).
DEFAULT_TOLERANCE = 1e-4
TORCHSCRIPT_FILE = "student.torchscript.pt"
ONNX_FILE = "student.onnx"
RECORD_FILE = "export.json"
# The packages that torch.onnx.export(dynamo=True) and the check of its file need.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Images per forward pass when the test split's logits are computed.
BATCH_SIZE = 1024


class ExportError(Exception):
    """Bad input: a run that cannot be exported, a folder that cannot be written, a missing package."""


@dataclass
class FileCheck:
    """One exported file, checked against the logged model on the test split."""

    format: str
    path: str
    bytes: int
    sha256: str
    max_abs_difference: float
    # The share of test images on which the file and the logged model predict the same class.
    agreement: float
    test_accuracy: float


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdsweep-export",
        description="Write the MLflow model of a kdsweep student run as TorchScript and ONNX files, and check that "
                    "each file gives the logged model's logits on the run's test split. Exit 0 when both match "
                    "within the tolerance, 1 when one does not, 2 on bad input.")
    parser.add_argument("run", help="the MLflow run id of a student run, a registered version as "
                                    "models:/NAME/VERSION, or a logged model as models:/MODEL_ID")
    parser.add_argument("overrides", nargs="*",
                        help="where the data is on this machine: data.root=PATH or data.download=true|false")
    parser.add_argument("--output-dir",
                        help="the folder to write to (default: exports/RUN_ID in the working directory)")
    parser.add_argument("--tracking-uri", help="the MLflow store of the run (default: $MLFLOW_TRACKING_URI, else "
                                               "mlflow.db in the working directory)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"the largest absolute difference of a logit allowed (default: {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--overwrite", action="store_true", help="replace exported files already in the folder")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        check_tolerance(arguments.tolerance)
        check_onnx_packages()
        client, uri = tracking.existing_store_client(arguments.tracking_uri)
        run = find_student_run(client, arguments.run, uri)
        model = registry.logged_model(client, run.info.run_id)
        if model is None:
            raise ExportError(f"run {run.info.run_id} logged no MLflow model: a run logs it after its test, "
                              f"so a run that failed or was stopped earlier has none")
        with tempfile.TemporaryDirectory(prefix="kdsweep-export-") as download:
            cfg = run_config(client, run, Path(download), arguments.overrides)
        images, labels = test_split(cfg, run)
        if arguments.output_dir is not None and not arguments.output_dir.strip():
            raise ExportError(f"--output-dir={arguments.output_dir!r}: give a folder")
        folder = Path(arguments.output_dir or Path("exports") / run.info.run_id).resolve()
        prepare_output_folder(folder, arguments.overwrite)
    except (ExportError, ReproduceError, FileNotFoundError) as error:
        print(f"kdsweep-export: error: {error}", file=sys.stderr)
        sys.exit(2)

    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the fluent API's store.
    logged = mlflow.pytorch.load_model(model.uri, map_location="cpu")
    reference = logits_in_batches(logged, images)
    checks = [
        check_file("TorchScript", export_torchscript(logged, images[:2], folder / TORCHSCRIPT_FILE),
                   load_torchscript, reference, labels, images),
        check_file("ONNX", export_onnx(logged, images[:2], folder / ONNX_FILE), load_onnx, reference, labels, images),
    ]
    within = all(check.max_abs_difference <= arguments.tolerance for check in checks)
    record = {
        "run_id": run.info.run_id,
        "model_uri": model.uri,
        "tracking_uri": uri,
        "data_fingerprint": run.data.tags.get(provenance.DATA_FINGERPRINT_TAG),
        "logged_test_accuracy": run.data.metrics.get("test/acc"),
        "model_test_accuracy": accuracy(reference, labels),
        "test_images": len(labels),
        "tolerance": arguments.tolerance,
        "within_tolerance": within,
        "files": [asdict(check) for check in checks],
        "packages": provenance.package_versions(),
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(format_report(record, checks, folder))
    sys.exit(0 if within else 1)


def check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"--tolerance={tolerance}: must be a finite number >= 0")


def check_onnx_packages() -> None:
    """Raise ExportError unless the ONNX exporter and onnxruntime can be imported."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"the ONNX export needs {', '.join(missing)}, which cannot be imported; install them "
                          f"with pip install 'kdsweep[export]'")


def find_student_run(client: MlflowClient, reference: str, uri: str) -> Run:
    """Return the student run that ``reference`` names: a run id, or a registered version models:/NAME/VERSION."""
    if reference.startswith("models:/"):
        reference = registered_run_id(client, reference, uri)
    run = find_run(client, reference, uri)
    role = run.data.tags.get(tracking.ROLE_TAG)
    if role != "student":
        raise ExportError(f"run_id={reference}: a {role or 'non-kdsweep'} run (tag {tracking.ROLE_TAG}={role!r}); "
                          f"give the run id of a student run")
    return run


def registered_run_id(client: MlflowClient, model_uri: str, uri: str) -> str:
    """Return the run of ``models:/NAME/VERSION`` or of a logged model ``models:/MODEL_ID``."""
    from mlflow.exceptions import MlflowException

    path = model_uri.removeprefix("models:/")
    name, _, version = path.rpartition("/")
    try:
        if not name and path.startswith("m-"):
            return client.get_logged_model(path).source_run_id
        if name and version.isdigit():
            return client.get_model_version(name, version).run_id
    except MlflowException:
        raise ExportError(f"run={model_uri}: no such registered model version or logged model in {uri}") from None
    raise ExportError(f"run={model_uri}: give a registered version as models:/NAME/VERSION, e.g. "
                      f"models:/kdsweep-digits-student/1, or a logged model as models:/m-...")


def prepare_output_folder(folder: Path, overwrite: bool) -> None:
    """Create ``folder`` and check that a file can be written in it.

    Raise ExportError if it cannot, or if it contains an earlier export and ``overwrite`` is false.
    """
    present = [name for name in (TORCHSCRIPT_FILE, ONNX_FILE, RECORD_FILE) if (folder / name).exists()]
    if present and not overwrite:
        raise ExportError(f"--output-dir={folder}: already contains {', '.join(present)}; choose another folder "
                          f"or pass --overwrite")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ExportError(f"--output-dir={folder}: cannot be written ({error.strerror})") from None


def run_config(client: MlflowClient, run: Run, folder: Path, overrides: list[str]) -> DictConfig:
    """Return the run's logged config with ``overrides`` of where its data is applied."""
    cfg = OmegaConf.load(download_config(client, run, folder))
    allowed = [f"data.{key}" for key in LOCATION_KEYS if key in cfg.data]
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or key not in allowed:
            choices = " or ".join(allowed) if allowed else "none: the run's data has no location settings"
            raise ExportError(f"{override}: give only where the data is on this machine, as key=value; "
                              f"allowed keys: {choices}")
        if key == "data.download" and value not in ("true", "false"):
            raise ExportError(f"{override}: must be true or false")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def test_split(cfg: DictConfig, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the raw test images and labels, after checking that the data is the run's."""
    try:
        splits = load_splits(cfg.data)
    except (DatasetNotFoundError, ValueError) as error:
        raise ExportError(f"the run's test split cannot be loaded: {error}") from None
    logged = run.data.tags.get(provenance.DATA_FINGERPRINT_TAG)
    if logged and logged != splits.fingerprint:
        fix = "point data.root at the run's data" if "root" in cfg.data else "the data's source changed since the run"
        raise ExportError(f"the data differs from the run's: fingerprint {splits.fingerprint[:12]}, but the run "
                          f"logged {logged[:12]}; {fix}")
    return raw_split(cfg.data, "test")


def logits_in_batches(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(model(batch)) for batch in images.split(BATCH_SIZE)])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Trace the model on ``example`` and save the TorchScript program.

    The logged model is a ``torch.export`` program, which ``torch.jit.script`` cannot compile, so
    it is traced. Its input checks become constants in the trace, which TracerWarning reports.
    """
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated, but it is one of the two formats this command writes.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
    return path


def load_torchscript(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        return torch.jit.load(str(path), map_location="cpu")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export the model with torch's dynamo ONNX exporter, with a dynamic batch dimension, to one file."""
    with warnings.catch_warnings():
        # The loaded torch.export program cannot switch to eval mode, but it was exported in eval mode.
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["pixels"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False, verbose=False)
    return path


def load_onnx(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"pixels": images.numpy()})[0]


def check_file(name: str, path: Path, load: Callable[[Path], Callable], reference: torch.Tensor,
               labels: torch.Tensor, images: torch.Tensor) -> FileCheck:
    """Load an exported file and compare its logits on the test images with the logged model's."""
    logits = logits_in_batches(load(path), images)
    return FileCheck(
        format=name,
        path=str(path),
        bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        max_abs_difference=float((logits - reference).abs().max()),
        agreement=float((logits.argmax(1) == reference.argmax(1)).float().mean()),
        test_accuracy=accuracy(logits, labels),
    )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def format_report(record: dict, checks: list[FileCheck], folder: Path) -> str:
    logged = record["logged_test_accuracy"]
    lines = [f"Student run {record['run_id']} ({record['model_uri']}), {record['test_images']} test images: "
             f"test/acc {record['model_test_accuracy']:.4f} from the logged model, "
             f"{'-' if logged is None else f'{logged:.4f}'} logged by the run"]
    header = ("format", "file", "size kB", "max |logit difference|", "agreement", "test/acc")
    rows = [(check.format, Path(check.path).name, f"{check.bytes / 1e3:.1f}", f"{check.max_abs_difference:.3g}",
             f"{check.agreement:.4f}", f"{check.test_accuracy:.4f}") for check in checks]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    verdict = "MATCH" if record["within_tolerance"] else "MISMATCH"
    lines.append(f"{verdict}: tolerance {record['tolerance']:g}; files and {RECORD_FILE} in {folder}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
