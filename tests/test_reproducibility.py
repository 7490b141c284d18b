"""Repeatable runs: seeds, provenance in every run, kdsweep-reproduce and kdsweep-report."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import FAST, journal_study, kdsweep_environment, run_in_process, runs_of_role
from kdsweep import provenance, report, reproduce
from kdsweep.data import load_splits

# Augmented teacher and student batches, so that the augmentation's randomness is covered too.
AUGMENTED = ["teacher_augment=light", "augment=light"]
# provenance.code_state without its cache, which the fixture below replaces.
READ_CODE_STATE = provenance.code_state.__wrapped__


def metric_histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Return every metric's (step, value) history, the perf/ and inference/ timings left out."""
    return {name: [(point.step, point.value) for point in client.get_metric_history(run.info.run_id, name)]
            for name in run.data.metrics if not name.startswith(("perf/", "inference/"))}


def run_command(module: str, arguments: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=cwd, env=kdsweep_environment(),
                          capture_output=True, text=True, timeout=300)


def test_same_seed_repeats_every_epoch(kdsweep, tracking_uri):
    for seed, experiment in ((7, "first"), (7, "second"), (8, "other-seed")):
        kdsweep(*FAST, *AUGMENTED, f"seed={seed}", f"tracking.experiment={experiment}", f"teacher_cache_dir=cache-{experiment}")

    client = MlflowClient(tracking_uri)
    for role in ("teacher", "student"):
        (first,) = runs_of_role(tracking_uri, role, "first")
        (second,) = runs_of_role(tracking_uri, role, "second")
        (other,) = runs_of_role(tracking_uri, role, "other-seed")
        first_history = metric_histories(client, first)
        assert len(first_history["val/acc"]) == 2, role
        assert metric_histories(client, second) == first_history, role
        assert metric_histories(client, other)["train/loss"] != first_history["train/loss"], role
        assert second.data.tags[provenance.CHECKPOINT_HASH_TAG] == first.data.tags[provenance.CHECKPOINT_HASH_TAG]
        assert other.data.tags[provenance.CHECKPOINT_HASH_TAG] != first.data.tags[provenance.CHECKPOINT_HASH_TAG]


def test_absent_seed_is_drawn_and_logged(kdsweep, tracking_uri):
    result = kdsweep(*FAST, "distill.alpha=0", "seed=null")

    (run,) = runs_of_role(tracking_uri, "student")
    seed = run.data.params["seed"]
    assert seed.isdigit()
    assert run.data.tags[provenance.SEED_TAG] == seed
    assert f"drew seed={seed}" in result.stdout + result.stderr
    config = MlflowClient(tracking_uri).download_artifacts(run.info.run_id, "config.yaml")
    with open(config) as file:
        assert yaml.safe_load(file)["seed"] == int(seed)


def test_sweep_draws_one_seed_and_keeps_it(kdsweep, tmp_path, tracking_uri):
    sweep = ["sweep=temperature_alpha", "seed=null", "distill.alpha=interval(0.5, 1)", "hydra.sweeper.enqueue=[]",
             *FAST]
    kdsweep(*sweep, "hydra.sweeper.n_trials=1")
    result = kdsweep(*sweep, "hydra.sweeper.n_trials=2")

    seeds = {run.data.params["seed"] for run in runs_of_role(tracking_uri, "student")}
    (seed,) = seeds
    assert seed.isdigit()
    assert len(runs_of_role(tracking_uri, "teacher")) == 1  # The continued study reused the seed and its teacher.
    assert journal_study(tmp_path, "temperature_alpha-digits").user_attrs["kdsweep.seed"] == int(seed)
    assert f"uses seed={seed}" in result.stdout + result.stderr


@pytest.fixture
def dirty_checkout(tmp_path, monkeypatch):
    """A git checkout with one committed file changed and one untracked file, standing in for kdsweep's."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "model.py").write_text("width = 8\n")

    def git(*arguments):
        return subprocess.run(["git", "-c", "user.name=kdsweep tests", "-c", "user.email=tests@localhost",
                               *arguments], cwd=checkout, check=True, capture_output=True, text=True).stdout

    git("init", "--quiet")
    git("add", "model.py")
    git("commit", "--quiet", "-m", "Add the model")
    (checkout / "model.py").write_text("width = 16\n")
    (checkout / "notes.txt").write_text("an untracked file\n")
    state = provenance.code_state(checkout)
    monkeypatch.setattr(provenance, "code_state", lambda: state)
    return checkout, git


def test_run_logs_provenance(tmp_path, monkeypatch, capfd, dirty_checkout):
    checkout, git = dirty_checkout
    folder = tmp_path / "work"
    folder.mkdir()
    status, stderr = run_in_process([*FAST, "distill.alpha=0.5", "seed=0"], folder, monkeypatch, capfd)
    assert status == 0, stderr

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    (student,) = runs_of_role(uri, "student")
    (teacher,) = runs_of_role(uri, "teacher")
    tags = student.data.tags
    assert tags[provenance.GIT_COMMIT_TAG] == git("rev-parse", "HEAD").strip()
    assert tags[provenance.GIT_DIRTY_TAG] == "true"
    assert tags[provenance.GIT_DIFF_HASH_TAG] == provenance.code_state().diff_sha256
    assert "distill.alpha=0.5" in json.loads(tags[provenance.OVERRIDES_TAG])
    assert "distill.alpha=0.5" in tags[provenance.COMMAND_TAG]
    for package in ("python", "torch", "pytorch-lightning", "hydra-core", "optuna", "mlflow", "torchmetrics"):
        assert tags[f"{provenance.VERSION_TAG_PREFIX}{package}"][0].isdigit(), package
    assert tags[provenance.CPU_MODEL_TAG]
    assert tags[provenance.GPU_COUNT_TAG].isdigit()
    assert provenance.GPU_NAMES_TAG in tags
    assert tags[provenance.SEED_TAG] == "0"

    data_cfg = yaml.safe_load(open(client.download_artifacts(student.info.run_id, "config.yaml")))["data"]
    assert tags[provenance.DATA_FINGERPRINT_TAG] == load_splits(OmegaConf.create(data_cfg)).fingerprint
    assert teacher.data.tags[provenance.DATA_FINGERPRINT_TAG] == tags[provenance.DATA_FINGERPRINT_TAG]
    assert tags["kdsweep.teacher_run_id"] == teacher.info.run_id
    assert tags[provenance.TEACHER_CHECKPOINT_HASH_TAG] == teacher.data.tags[provenance.CHECKPOINT_HASH_TAG]

    record = json.load(open(client.download_artifacts(student.info.run_id, provenance.RECORD_ARTIFACT)))
    assert record[provenance.SEED_TAG] == "0"
    assert record[provenance.GIT_DIRTY_TAG] == "true"

    # The diff artifact contains both changes, and git applies it to a clean checkout of the commit.
    patch = client.download_artifacts(student.info.run_id, provenance.DIFF_ARTIFACT, str(tmp_path))
    text = open(patch).read()
    assert "+width = 16" in text
    assert "+an untracked file" in text
    git("stash", "--include-untracked", "--quiet")
    git("apply", patch)
    assert (checkout / "model.py").read_text() == "width = 16\n"
    assert (checkout / "notes.txt").exists()


def test_clean_checkout_has_no_diff(dirty_checkout):
    checkout, git = dirty_checkout
    git("add", "--all")
    git("commit", "--quiet", "-m", "Widen the model")

    state = READ_CODE_STATE(checkout)

    assert state.commit == git("rev-parse", "HEAD").strip()
    assert state.dirty is False
    assert state.diff == ""


def test_reproduce_passes_then_names_changed_metric(kdsweep, tmp_path, tracking_uri):
    kdsweep(*FAST, *AUGMENTED, "distill.alpha=0.5")
    (original,) = runs_of_role(tracking_uri, "student")
    run_id = original.info.run_id

    result = run_command("kdsweep.reproduce", [run_id], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPRODUCED" in result.stdout
    students = runs_of_role(tracking_uri, "student")
    (copy,) = [run for run in students if run.info.run_id != run_id]
    assert copy.data.tags["kdsweep.reproduction_of"] == run_id
    assert copy.data.tags[reproduce.MATCH_TAG] == "true"
    assert copy.data.metrics["test/acc"] == original.data.metrics["test/acc"]

    client = MlflowClient(tracking_uri)
    client.log_metric(run_id, "test/acc", original.data.metrics["test/acc"] - 0.25, step=99)
    result = run_command("kdsweep.reproduce", [run_id], tmp_path)
    assert result.returncode == 1
    assert "DIFFERENT: 1 differ beyond tolerance 0: test/acc" in result.stdout

    client.set_tag(run_id, provenance.GIT_COMMIT_TAG, "0" * 40)
    result = run_command("kdsweep.reproduce", [run_id], tmp_path)
    assert result.returncode == 2
    assert f"ran commit {'0' * 40}" in result.stderr
    assert "--allow-code-change" in result.stderr
    assert len(runs_of_role(tracking_uri, "student")) == 3  # The refusal started no run.


def test_reproduce_teacher_trains_it_again(kdsweep, tmp_path, tracking_uri):
    kdsweep(*FAST, "distill.alpha=0.5")
    (teacher,) = runs_of_role(tracking_uri, "teacher")

    result = run_command("kdsweep.reproduce", [teacher.info.run_id], tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    teachers = runs_of_role(tracking_uri, "teacher")
    assert len(teachers) == 2
    assert len(runs_of_role(tracking_uri, "student")) == 1  # The teacher alone ran again.
    assert f"{provenance.CHECKPOINT_HASH_TAG}: equal" in result.stdout


def test_report_tables_and_plots_match_runs(kdsweep, tmp_path, tracking_uri):
    kdsweep("sweep=seeds", *FAST, "distill.temperature=3", "distill.alpha=0,0.5,0.9", "seed=0,1")

    result = run_command("kdsweep.report", ["kdsweep-digits", "--output", "report"], tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "report"
    for name in ("table.md", "table.tex", "table.csv", "runs.csv", "val_vs_temperature.png", "val_vs_alpha.png",
                 "param_importances.png"):
        assert (folder / name).stat().st_size > 0, name
    assert r"\pm" in (folder / "table.tex").read_text()
    assert "kdsweep sweep=seeds" in result.stdout

    client = MlflowClient(tracking_uri)
    rows = {row["model"]: row for row in csv.DictReader(open(folder / "table.csv"))}
    students = runs_of_role(tracking_uri, "student")
    assert len(rows) == 3
    for label, row in rows.items():
        runs = [client.get_run(run_id) for run_id in row["runs"].split()]
        accuracies = [run.data.metrics["test/acc"] for run in runs]
        assert int(row["seeds"]) == 2 == len({run.data.params["seed"] for run in runs}), label
        assert float(row["test/acc mean"]) == pytest.approx(statistics.fmean(accuracies), abs=1e-12), label
        assert float(row["test/acc std"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-12), label
    best = max(students, key=lambda run: run.data.metrics["val/acc"] if run.data.params["distill.alpha"] != "0" else -1)
    assert best.info.run_id in rows["best distilled student"]["runs"]
    assert all(client.get_run(run_id).data.params["distill.alpha"] == "0"
               for run_id in rows["baseline student (alpha = 0)"]["runs"].split())

    (report_run,) = runs_of_role(tracking_uri, "report")
    logged = {item.path for item in client.list_artifacts(report_run.info.run_id, "report")}
    assert "report/table.csv" in logged
    assert "report/param_importances.png" in logged


BAD_INPUT = {
    "unknown run id": (reproduce.main, ["0123456789abcdef"], ["run_id=0123456789abcdef", "no such run"]),
    "run without a config": (reproduce.main, ["{bare}"], ["run_id={bare}", "no logged config"]),
    "sweep parent run": (reproduce.main, ["{sweep}"], ["run_id={sweep}", "parent run"]),
    "negative tolerance": (reproduce.main, ["{bare}", "--tolerance=-1"], ["--tolerance=-1.0", ">= 0"]),
    "report without students": (report.main, ["teachers-only"], ["target=teachers-only", "no finished student runs"]),
    "report on unknown target": (report.main, ["nowhere"], ["target=nowhere", "neither"]),
    "report on a test metric": (report.main, ["teachers-only", "--metric=test/acc"], ["--metric=test/acc"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_commands_reject_bad_input(case, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("other")
    ids = {"bare": client.create_run(experiment, tags={"kdsweep.role": "student"}).info.run_id,
           "sweep": client.create_run(experiment, tags={"kdsweep.role": "sweep"}).info.run_id}
    client.set_terminated(ids["bare"], "FINISHED")
    teachers_only = client.create_experiment("teachers-only")
    teacher = client.create_run(teachers_only, tags={"kdsweep.role": "teacher"}).info.run_id
    client.set_terminated(teacher, "FINISHED")
    command, arguments, expected = BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()  # MLflow's messages from creating the store above.

    with pytest.raises(SystemExit) as exit:
        command([argument.format(**ids) for argument in arguments])

    assert exit.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1, stderr
    for text in expected:
        assert text.format(**ids) in stderr
    assert len(client.search_runs([experiment, teachers_only])) == 3  # Nothing was run or logged.
