"""Augmentation presets, the teacher under augmentation, and the two augmentation studies."""

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from conftest import CHECKOUT, FAST, kdsweep_environment, run_in_process, runs_of_role
from kdsweep.augmentation import build_augmentation
from kdsweep.data import DataSplits, TensorDataModule
from kdsweep.losses import distillation_loss
from kdsweep.models import MLP
from kdsweep.modules import ClassifierModule, DistillationModule, FrozenTeacher

PRESETS = CHECKOUT / "conf" / "augment_presets"
# The image shape of each preset family: digits for grey, CIFAR for colour.
FAMILY_SHAPES = {"grey": (1, 8, 8), "colour": (3, 32, 32)}
AUGMENTED_PRESETS = [f"{family}_{level}" for family in FAMILY_SHAPES for level in ("light", "heavy")]


def preset(name: str, mean=(0.3,), std=(0.4,)):
    family = name.split("_")[0]
    settings = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    channels = FAMILY_SHAPES[family][0]
    return build_augmentation(settings, FAMILY_SHAPES[family], 10, "student.augment", mean * channels, std * channels)


def images(name: str, count: int = 16) -> torch.Tensor:
    return torch.randn(count, *FAMILY_SHAPES[name.split("_")[0]], generator=torch.Generator().manual_seed(1))


def test_none_presets_build_no_augmentation():
    assert preset("grey_none") is None
    assert preset("colour_none") is None


@pytest.mark.parametrize("name", AUGMENTED_PRESETS)
def test_preset_changes_batch_and_repeats_with_seed(name):
    augment = preset(name)
    inputs, labels = images(name), torch.arange(16) % 10

    torch.manual_seed(7)
    first, first_labels = augment(inputs, labels)
    torch.manual_seed(7)
    again, again_labels = augment(inputs, labels)
    torch.manual_seed(8)
    other, _ = augment(inputs, labels)

    assert first.shape == inputs.shape
    assert not torch.equal(first, inputs)
    assert torch.equal(first, again)
    assert torch.equal(first_labels, again_labels)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", AUGMENTED_PRESETS)
def test_identical_images_are_augmented_differently(name):
    augment = preset(name)
    inputs = images(name, 1).repeat(8, 1, 1, 1)
    # Without the mixing ops, which pair images of the batch and would differ for that reason alone.
    augment.mixing = None

    torch.manual_seed(0)
    outputs, _ = augment(inputs, torch.zeros(8, dtype=torch.long))

    distinct = {tuple(output.flatten().tolist()) for output in outputs}
    # Continuous parameters give 8 different images. The light colour preset draws from 81 crops
    # times 2 flips, so a repeated pair is possible, but not 4 repeats.
    assert len(distinct) >= (5 if name == "colour_light" else 8)


class Recorder(nn.Module):
    """Wrap a network and keep every input it is called on, with whether it was in training mode."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, inputs.detach().clone()))
        return self.network(inputs)

    def inputs(self, training: bool) -> torch.Tensor:
        return torch.cat([inputs for mode, inputs in self.calls if mode == training])


def digit_splits(size: int = 48) -> DataSplits:
    generator = torch.Generator().manual_seed(0)

    def split() -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.randn(size, 1, 8, 8, generator=generator),
                                              torch.randint(10, (size,), generator=generator))

    return DataSplits(split(), split(), split(), input_shape=(1, 8, 8), num_classes=10)


def fit_and_test(module: pl.LightningModule, splits: DataSplits, **trainer_settings) -> None:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         **trainer_settings)
    data = TensorDataModule(splits, batch_size=16, seed=0, eval_batch_size=16)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)


def adam(parameters):
    return torch.optim.Adam(parameters, lr=1e-3)


def test_training_batches_augmented_and_evaluation_batches_not():
    splits = digit_splits()
    model = Recorder(MLP((1, 8, 8), 10, hidden_sizes=[16]))
    module = ClassifierModule(model, adam, 10, augment=preset("grey_heavy"))

    fit_and_test(module, splits)

    evaluated = model.inputs(training=False)
    assert torch.equal(evaluated, torch.cat([splits.val.tensors[0], splits.test.tensors[0]]))
    trained = model.inputs(training=True)
    assert len(trained) == len(splits.train)
    # Every training image was changed: none of them occurs unchanged in the training split.
    assert not any(torch.equal(image, original) for image in trained for original in splits.train.tensors[0])


def test_teacher_sees_the_students_augmented_batch():
    splits = digit_splits()
    student = Recorder(MLP((1, 8, 8), 10, hidden_sizes=[16]))
    teacher = Recorder(MLP((1, 8, 8), 10, hidden_sizes=[16]))
    module = DistillationModule(student, adam, 10, teacher=FrozenTeacher(teacher), temperature=4.0, alpha=0.9,
                                augment=preset("grey_heavy"))

    fit_and_test(module, splits, limit_val_batches=0)

    student_inputs = student.inputs(training=True)
    teacher_inputs = torch.cat([inputs for _, inputs in teacher.calls])
    assert torch.equal(teacher_inputs, student_inputs)
    assert not torch.equal(teacher_inputs, splits.train.tensors[0][:len(teacher_inputs)])


def test_mixup_hard_term_uses_mixed_labels():
    augment = build_augmentation({"mixup": {"alpha": 0.4}}, (1, 8, 8), 10, "student.augment")
    inputs = torch.randn(16, 1, 8, 8)
    labels = torch.arange(16) % 10
    logits = torch.randn(16, 10)

    torch.manual_seed(3)
    mixed, mixed_labels = augment(inputs, labels)

    # torchvision mixes each image with the one before it in the batch, with one weight per batch.
    partner, partner_labels = inputs.roll(1, 0), labels.roll(1, 0)
    weight = ((mixed - partner) * (inputs - partner)).sum() / ((inputs - partner) ** 2).sum()
    assert 0 < weight < 1
    assert torch.allclose(mixed, weight * inputs + (1 - weight) * partner, atol=1e-5)
    expected = weight * F.cross_entropy(logits, labels) + (1 - weight) * F.cross_entropy(logits, partner_labels)
    for alpha in (0.0, 0.5):
        loss = distillation_loss(logits, torch.randn(16, 10), mixed_labels, temperature=2.0, alpha=alpha)
        assert loss.hard.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cutmix_labels_weigh_each_image_by_its_area():
    augment = build_augmentation({"cutmix": {"alpha": 1.0}}, (1, 8, 8), 10, "student.augment")
    inputs = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    labels = torch.tensor([0, 1, 2, 3])

    torch.manual_seed(5)
    mixed, mixed_labels = augment(inputs, labels)

    own_area = (mixed == inputs).float().mean(dim=(1, 2, 3))
    assert torch.allclose(mixed_labels[torch.arange(4), labels], own_area)
    assert torch.allclose(mixed_labels.sum(dim=1), torch.ones(4))


def test_logits_cached_without_augmentation_and_not_under_it(tmp_path, monkeypatch, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*FAST, f"tracking.uri={uri}"]
    cases = [("none", "distill.alpha=0.5"), ("none", "distill.alpha=0.9"), ("heavy", "distill.alpha=0.5"),
             ("light", "+student.augment.mixup.alpha=0.4")]
    for level, override in cases:
        status, errors = run_in_process([*common, f"augment={level}", override], tmp_path, monkeypatch, capfd)
        assert status == 0, errors

    students = sorted(runs_of_role(uri, "student"), key=lambda run: run.info.start_time)
    assert [run.data.tags["kdsweep.teacher_logits"] for run in students] == ["computed", "cached", "online", "online"]
    assert [run.data.tags["kdsweep.choice.augment"] for run in students] == ["none", "none", "heavy", "light"]
    assert len({run.data.tags["kdsweep.teacher_run_id"] for run in students}) == 1
    # One teacher, whose logits the first run wrote and the runs under augmentation did not touch.
    (logits_file,) = (tmp_path / "teacher_cache").glob("*.logits.pt")
    assert logits_file.stat().st_mtime < students[2].info.start_time / 1000


def run_study(sweep: str, overrides: list[str], folder: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdsweep.cli", f"sweep={sweep}", *FAST, *overrides]
    return subprocess.run(command, cwd=folder, env=kdsweep_environment(), capture_output=True, text=True,
                          timeout=600)


def report(parent_run_id: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdsweep.report", parent_run_id, "--output", "report"], cwd=folder,
                          env=kdsweep_environment(), capture_output=True, text=True, timeout=300)


def test_augmentation_studies_produce_their_tables_and_plots(tmp_path, tracking_uri):
    studies = [
        ("alpha_under_augmentation", ["distill.alpha=choice(0, 0.9)", "seed=choice(0, 1)"],
         "val_vs_alpha_by_augmentation.png", 3 * 2 * 2),
        ("temperature_under_augmentation", ["distill.temperature=choice(1, 8)", "seed=choice(0, 1)"],
         "val_vs_temperature_by_augmentation.png", 2 * 2 * 2),
    ]
    client = MlflowClient(tracking_uri)
    for sweep, overrides, plot, trials in studies:
        result = run_study(sweep, overrides, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        (parent,) = [run for run in runs_of_role(tracking_uri, "sweep") if run.info.run_name.startswith(sweep)]
        children = [run for run in runs_of_role(tracking_uri, "student")
                    if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == trials

        reported = report(parent.info.run_id, tmp_path)

        assert reported.returncode == 0, reported.stderr[-3000:]
        folder = tmp_path / "report"
        assert (folder / plot).stat().st_size > 0
        levels = [row["augment"] for row in csv.DictReader(open(folder / "augmentation_curves.csv"))]
        expected_levels = ["none", "light", "heavy"] if sweep.startswith("alpha") else ["none", "heavy"]
        table = (folder / "augmentation.md").read_text()
        assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == expected_levels
        assert sorted(set(levels)) == sorted(expected_levels)
        _check_curves_match_runs(client, folder / "augmentation_curves.csv")


def _check_curves_match_runs(client: MlflowClient, path: Path) -> None:
    for row in csv.DictReader(open(path)):
        runs = [client.get_run(run_id) for run_id in row["runs"].split()]
        assert {run.data.tags["kdsweep.choice.augment"] for run in runs} == {row["augment"]}
        assert len({run.data.params["seed"] for run in runs}) == int(row["seeds"]) == 2
        assert float(row["val/acc mean"]) == pytest.approx(
            statistics.fmean(run.data.metrics["val/acc"] for run in runs), abs=1e-12)
        assert float(row["test/acc std"]) == pytest.approx(
            statistics.stdev(run.data.metrics["test/acc"] for run in runs), abs=1e-12)


def test_teacher_accuracy_script_reads_cached_teachers(tmp_path, monkeypatch, capfd):
    status, errors = run_in_process([*FAST, "teacher_only=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                                    tmp_path, monkeypatch, capfd)
    assert status == 0, errors

    environment = {**kdsweep_environment(), "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.teacher_under_augmentation", "teacher_cache",
                             "--data", "digits"], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    cases = ["none", "light", "heavy", *(f"heavy: {op} alone" for op in ("translate", "rotate", "scale", "noise",
                                                                          "erase"))]
    assert [line.split("  ")[1].strip() for line in lines] == cases
    accuracies = [float(line.split("accuracy ")[1].split()[0]) for line in lines]
    assert accuracies[0] > 0.8
    assert accuracies[2] < accuracies[0]
