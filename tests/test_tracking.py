"""What a run leaves in MLflow: params, metrics per epoch, tags, the config artifact and the end status."""

import yaml
from mlflow import MlflowClient

from conftest import FAST, runs_of_role
from kdsweep.tracking import git_commit


def only_run(tracking_uri: str, role: str, experiment: str = "kdsweep-digits"):
    runs = runs_of_role(tracking_uri, role, experiment)
    assert len(runs) == 1, f"expected one {role} run, found {len(runs)}"
    return MlflowClient(tracking_uri), runs[0]


def test_student_run_logs_config_metrics_and_tags(kdsweep, tracking_uri):
    hidden_sizes = "[" + ", ".join(["16"] * 80) + "]"  # 319 characters, past Lightning's 250-character cut.
    kdsweep(*FAST, "distill.temperature=3.5", "distill.alpha=0.25", f"student.model.hidden_sizes={hidden_sizes}")

    client, run = only_run(tracking_uri, "student")
    params = run.data.params
    assert params["distill.temperature"] == "3.5"
    assert params["distill.alpha"] == "0.25"
    assert params["student.model.hidden_sizes"] == hidden_sizes
    assert params["data.name"] == "digits"

    for metric in ("val/acc", "val/loss", "val/agreement", "train/loss_hard", "train/loss_soft"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [point.step for point in history] == [0, 1], metric
    assert "test/acc" in run.data.metrics
    for metric in ("perf/epoch_seconds", "perf/fit_seconds", "perf/startup_seconds", "perf/run_seconds",
                   "perf/mlflow_seconds_per_epoch", "perf/mlflow_share", "perf/train_samples_per_second"):
        assert run.data.metrics[metric] > 0, metric
    assert run.data.metrics["perf/fit_seconds"] >= 2 * run.data.metrics["perf/epoch_seconds"]
    assert run.data.metrics["perf/run_seconds"] > run.data.metrics["perf/fit_seconds"]
    assert run.data.tags["kdsweep.teacher_logits"] == "computed"

    _, teacher = only_run(tracking_uri, "teacher")
    assert run.data.tags["kdsweep.teacher_run_id"] == teacher.info.run_id
    if git_commit() is not None:  # A checkout, as in CI: the run names its commit.
        assert run.data.tags["mlflow.source.git.commit"] == git_commit()

    artifact = client.download_artifacts(run.info.run_id, "config.yaml")
    with open(artifact) as file:
        logged_config = yaml.safe_load(file)
    assert logged_config["distill"] == {"temperature": 3.5, "alpha": 0.25}


def test_tracking_uri_from_environment(kdsweep, tmp_path):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    kdsweep(*FAST, "distill.alpha=0", environment={"MLFLOW_TRACKING_URI": elsewhere})

    assert not (tmp_path / "mlflow.db").exists()
    _, run = only_run(elsewhere, "student")
    assert run.info.status == "FINISHED"


def test_run_that_raises_ends_failed(kdsweep, tracking_uri):
    result = kdsweep(*FAST, "distill.alpha=0", "student.model._target_=failing_models.FailingMLP",
                     expect_success=False)

    assert result.returncode != 0
    assert "FailingMLP failed on purpose" in result.stderr
    _, run = only_run(tracking_uri, "student")
    assert run.info.status == "FAILED"
