"""The deployable student: logged MLflow models, the registered best trial, the footprint metrics and kdsweep-export."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import FAST, journal_study, kdsweep_environment, runs_of_role
from kdsweep import export, footprint, provenance, registry, tracking
from kdsweep.data import load_splits, raw_split
from kdsweep.models import MLP

STUDY = "temperature_alpha-digits"
REGISTERED = "kdsweep-digits-student"
FOOTPRINT_METRICS = (footprint.PARAMETER_COUNT_METRIC, footprint.SIZE_METRIC, footprint.LATENCY_METRIC,
                     footprint.BATCH_LATENCY_METRIC, footprint.THROUGHPUT_METRIC)
DIGITS = OmegaConf.create({"name": "digits", "split_seed": 0, "test_fraction": 0.2, "val_fraction": 0.2})


@pytest.fixture
def fluent_store(tracking_uri):
    """Point MLflow's fluent API, which resolves models:/ URIs, at this test's store."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    yield tracking_uri
    mlflow.set_tracking_uri(previous)


def run_export(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdsweep.export", *arguments], cwd=cwd, env=kdsweep_environment(),
                          capture_output=True, text=True, timeout=300)


def run_config(client: MlflowClient, run_id: str, folder: Path):
    return OmegaConf.load(client.download_artifacts(run_id, tracking.CONFIG_ARTIFACT, str(folder)))


def test_measure_reports_size_and_speed():
    model = MLP((1, 8, 8), 10, hidden_sizes=(32,))
    timing = footprint.InferenceTiming(device=torch.device("cpu"), batch_size=64, min_run_time=0.01)

    metrics = footprint.measure(model, (1, 8, 8), timing)

    assert metrics[footprint.PARAMETER_COUNT_METRIC] == 64 * 32 + 32 + 32 * 10 + 10
    assert metrics[footprint.SIZE_METRIC] == footprint.size_bytes(model)
    assert metrics[footprint.SIZE_METRIC] > 4 * metrics[footprint.PARAMETER_COUNT_METRIC]
    assert metrics[footprint.LATENCY_METRIC] > 0
    assert metrics[footprint.BATCH_LATENCY_METRIC] > 0
    assert metrics[footprint.THROUGHPUT_METRIC] == pytest.approx(64 / metrics[footprint.BATCH_LATENCY_METRIC] * 1e3)
    assert not model.training


def test_sweep_registers_best_student(kdsweep, tmp_path, tracking_uri, fluent_store):
    result = kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=3", *FAST)

    client = MlflowClient(tracking_uri)
    best = journal_study(tmp_path, STUDY).best_trial
    (parent,) = runs_of_role(tracking_uri, "sweep")
    (teacher,) = runs_of_role(tracking_uri, "teacher")
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    assert version.tags["optuna.trial_number"] == str(best.number)
    assert version.tags["optuna.study_name"] == STUDY
    assert version.tags[registry.SWEEP_RUN_TAG] == parent.info.run_id
    assert float(version.tags["distill.temperature"]) == best.params["distill.temperature"]
    assert float(version.tags["distill.alpha"]) == best.params["distill.alpha"]
    expected_teacher = teacher.info.run_id if best.params["distill.alpha"] > 0 else "none"
    assert version.tags["kdsweep.teacher_run_id"] == expected_teacher
    assert float(version.tags["val/acc"]) == best.value
    assert parent.data.tags[registry.REGISTERED_VERSION_TAG] == f"{REGISTERED}/{version.version}"
    assert f"as {REGISTERED} version 1" in result.stdout + result.stderr

    # The registered model predicts on raw test images and reproduces the run's test accuracy.
    run = client.get_run(version.run_id)
    images, labels = raw_split(run_config(client, run.info.run_id, tmp_path).data, "test")
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/{version.version}")
    logits = model.predict(images.numpy())
    assert logits.shape == (len(labels), 10)
    accuracy = float((logits.argmax(1) == labels.numpy()).mean())
    assert accuracy == pytest.approx(run.data.metrics["test/acc"], abs=0.5 / len(labels))

    check_models_and_footprint(client, teacher, runs_of_role(tracking_uri, "student"), images, labels)
    check_footprint_columns(result.stdout, teacher)

    # A rerun of the finished study registers nothing new.
    rerun = kdsweep("sweep=temperature_alpha", "hydra.sweeper.n_trials=3", *FAST)
    assert "already registered as" in rerun.stdout + rerun.stderr
    assert len(client.search_model_versions(f"name='{REGISTERED}'")) == 1


def check_models_and_footprint(client: MlflowClient, teacher, students: list, images: torch.Tensor,
                               labels: torch.Tensor) -> None:
    """Check that every run logged one model with a signature, and its footprint; students are the smaller."""
    assert len(students) == 3
    for run in [teacher, *students]:
        for name in FOOTPRINT_METRICS:
            assert run.data.metrics[name] > 0, (run.info.run_id, name)
        assert len(run.outputs.model_outputs) == 1
        stored = mlflow.models.get_model_info(registry.logged_model(client, run.info.run_id).uri)
        assert stored.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec":
                                                      {"dtype": "float32", "shape": (-1, 1, 8, 8)}}]
        assert stored.saved_input_example_info is not None
    for run in students:
        assert run.data.metrics[footprint.PARAMETER_COUNT_METRIC] < teacher.data.metrics[footprint.PARAMETER_COUNT_METRIC]
        assert run.data.metrics[footprint.SIZE_METRIC] < teacher.data.metrics[footprint.SIZE_METRIC]

    # The teacher's logged model takes raw pixels too: its accuracy on the test split is the run's.
    logits = mlflow.pyfunc.load_model(registry.logged_model(client, teacher.info.run_id).uri).predict(images.numpy())
    accuracy = float((logits.argmax(1) == labels.numpy()).mean())
    assert accuracy == pytest.approx(teacher.data.metrics["test/acc"], abs=0.5 / len(labels))


def check_footprint_columns(output: str, teacher) -> None:
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("Study "))
    header, teacher_row = lines[start + 1:start + 3]
    for column in ("params", "size kB", "latency ms", "images/s"):
        assert column in header
    assert teacher_row.startswith("teacher")
    assert f"{teacher.data.metrics[footprint.PARAMETER_COUNT_METRIC]:.0f}" in teacher_row.split()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_matches_logged_model(kdsweep, tmp_path, tracking_uri, fluent_store):
    kdsweep(*FAST)
    client = MlflowClient(tracking_uri)
    (student,) = runs_of_role(tracking_uri, "student")

    elsewhere = tmp_path / "elsewhere"  # The store is found through --tracking-uri alone.
    elsewhere.mkdir()
    folder = tmp_path / "exported"
    result = run_export([student.info.run_id, "--output-dir", str(folder), "--tracking-uri", tracking_uri], elsewhere)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "MATCH: tolerance 0.0001" in result.stdout
    assert list(elsewhere.iterdir()) == []
    images, labels = raw_split(run_config(client, student.info.run_id, tmp_path).data, "test")
    logged = mlflow.pytorch.load_model(registry.logged_model(client, student.info.run_id).uri)
    with torch.no_grad():
        reference = logged(images).numpy()
        torchscript = torch.jit.load(str(folder / export.TORCHSCRIPT_FILE))(images).numpy()
    session = onnxruntime.InferenceSession(str(folder / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"pixels": images.numpy()})[0]
    single_image = session.run(None, {"pixels": images[:1].numpy()})[0]
    assert np.abs(torchscript - reference).max() <= export.DEFAULT_TOLERANCE
    assert np.abs(onnx_logits - reference).max() <= export.DEFAULT_TOLERANCE
    assert np.abs(single_image - reference[:1]).max() <= export.DEFAULT_TOLERANCE
    record = json.loads((folder / export.RECORD_FILE).read_text())
    assert record["run_id"] == student.info.run_id
    assert record["within_tolerance"] is True
    assert record["model_test_accuracy"] == pytest.approx(student.data.metrics["test/acc"], abs=0.5 / len(labels))
    assert [entry["bytes"] for entry in record["files"]] == [
        (folder / export.TORCHSCRIPT_FILE).stat().st_size, (folder / export.ONNX_FILE).stat().st_size]


def logged_student(tracking_uri: str, folder: Path, network: torch.nn.Module) -> str:
    """Log a student run with ``network`` as its model and the digits config, without training; return its id."""
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.experiment_id(client, "kdsweep-digits")
    splits = load_splits(DIGITS)
    run_id = client.create_run(experiment_id, tags={
        tracking.ROLE_TAG: "student", provenance.DATA_FINGERPRINT_TAG: splits.fingerprint}).info.run_id
    config = folder / tracking.CONFIG_ARTIFACT
    config.write_text(OmegaConf.to_yaml({"data": DIGITS}))
    client.log_artifact(run_id, str(config))
    model = registry.serving_model(network, splits)
    registry.log_model(model, registry.input_example(splits), tracking_uri=tracking_uri,
                       experiment_id=experiment_id, run_id=run_id)
    client.set_terminated(run_id)
    return run_id


def test_export_reports_mismatch(tmp_path, tracking_uri, monkeypatch, capsys):
    run_id = logged_student(tracking_uri, tmp_path, MLP((1, 8, 8), 10, hidden_sizes=(16,)))
    original = export.export_onnx

    def export_other_network(model, example, path):
        return original(MLP((1, 8, 8), 10, hidden_sizes=(16,)).eval(), example, path)

    monkeypatch.setattr(export, "export_onnx", export_other_network)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exit:
        export.main([run_id, "--tracking-uri", tracking_uri])

    assert exit.value.code == 1
    output = capsys.readouterr().out
    assert "MISMATCH" in output
    record = json.loads((tmp_path / "exports" / run_id / export.RECORD_FILE).read_text())
    torchscript, onnx = record["files"]
    assert torchscript["max_abs_difference"] <= export.DEFAULT_TOLERANCE
    assert onnx["max_abs_difference"] > export.DEFAULT_TOLERANCE


BAD_EXPORTS = {
    "unknown run": (["0123456789abcdef"], ["run_id=0123456789abcdef", "no such run"]),
    "teacher run": (["{teacher}"], ["a teacher run", "kdsweep.role='teacher'", "student run"]),
    "student without model": (["{bare}"], ["logged no MLflow model"]),
    "unknown registered version": (["models:/nothing/3"], ["models:/nothing/3", "no such registered model version"]),
    "unknown logged model": (["models:/m-0123456789abcdef"], ["models:/m-0123456789abcdef", "no such"]),
    "malformed registered version": (["models:/nothing"], ["models:/NAME/VERSION"]),
    "output under a file": (["{student}", "--output-dir", "/dev/null/exports"],
                            ["--output-dir=/dev/null/exports", "cannot be written (Not a directory)"]),
    # The kernel's /proc takes no new folders, from root either.
    "output not writable": (["{student}", "--output-dir", "/proc/kdsweep-exports"],
                            ["--output-dir=/proc/kdsweep-exports", "cannot be written"]),
    "negative tolerance": (["{student}", "--tolerance", "-1"], ["--tolerance=-1.0", ">= 0"]),
    "setting outside data": (["{student}", "distill.alpha=1"], ["distill.alpha=1", "where the data is"]),
    "data choice": (["{student}", "data.name=mnist"], ["data.name=mnist", "none: the run's data has no location"]),
    "empty output folder": (["{student}", "--output-dir", ""], ["--output-dir=''"]),
    "file store": (["{student}", "--tracking-uri", "{folder}"], ["file store", "sqlite:///"]),
}


@pytest.fixture
def export_store(tmp_path, tracking_uri) -> dict[str, str]:
    """A store with a student run that logged a model, a student run without one, and a teacher run."""
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.experiment_id(client, "kdsweep-digits")
    return {
        "student": logged_student(tracking_uri, tmp_path, MLP((1, 8, 8), 10, hidden_sizes=(16,))),
        "bare": client.create_run(experiment_id, tags={tracking.ROLE_TAG: "student"}).info.run_id,
        "teacher": client.create_run(experiment_id, tags={tracking.ROLE_TAG: "teacher"}).info.run_id,
    }


@pytest.mark.parametrize("arguments, expected", BAD_EXPORTS.values(), ids=BAD_EXPORTS.keys())
def test_export_bad_input_rejected(export_store, tmp_path, tracking_uri, monkeypatch, capsys, arguments, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        export.main([argument.format(**export_store, folder=tmp_path) for argument in arguments]
                    + ([] if "--tracking-uri" in arguments else ["--tracking-uri", tracking_uri]))

    assert exit.value.code == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1, error_lines
    for fragment in expected:
        assert fragment.format(**export_store) in error_lines[0]
    assert not (tmp_path / "exports").exists()


def test_export_without_onnx_rejected(export_store, tmp_path, tracking_uri, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # Importing it now raises ImportError.
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exit:
        export.main([export_store["student"], "--tracking-uri", tracking_uri])

    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == ("kdsweep-export: error: the ONNX export needs onnxscript, which cannot "
                                               "be imported; install them with pip install 'kdsweep[export]'")


def test_export_keeps_existing_files(export_store, tmp_path, tracking_uri, monkeypatch, capsys):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / export.ONNX_FILE).write_text("an earlier export")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exit:
        export.main([export_store["student"], "--output-dir", str(folder), "--tracking-uri", tracking_uri])

    assert exit.value.code == 2
    assert "already contains student.onnx" in capsys.readouterr().err
    assert (folder / export.ONNX_FILE).read_text() == "an earlier export"
