"""Hardware paths that run without a GPU: the GPU split of parallel trials, and bf16 mixed precision."""

import re

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from hydra import compose, initialize_config_dir

from hydra_plugins.kdsweep_optuna_sweeper._workers import gpu_slots
from kdsweep import cli, default_precision
from kdsweep.data import DataSplits, TensorDataModule
from kdsweep.models import MLP
from kdsweep.modules import DistillationModule, FrozenTeacher


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_gpu_slots_two_gpus_per_trial(four_gpus, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert gpu_slots(n_jobs=2, devices_per_trial=2) == ["0,1", "2,3"]


def test_gpu_slots_named_as_sweep_sees_them(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")

    assert gpu_slots(n_jobs=2, devices_per_trial=2, accelerator="gpu") == ["4,5", "6,7"]


def test_gpu_slots_one_gpu_per_trial(four_gpus, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert gpu_slots(n_jobs=4, devices_per_trial=1) == ["0", "1", "2", "3"]


def test_gpu_slots_too_few_gpus(four_gpus):
    with pytest.raises(ValueError) as raised:
        gpu_slots(n_jobs=3, devices_per_trial=2, accelerator="gpu")

    message = str(raised.value)
    for count, meaning in ((3, "parallel trials"), (2, "GPUs per trial"), (6, "GPUs needed"), (4, "GPUs visible")):
        assert re.search(rf"\b{count}\b", message), f"the message does not name the {meaning} ({count}): {message}"


def test_gpu_slots_too_few_gpus_shared_by_auto(four_gpus):
    assert gpu_slots(n_jobs=3, devices_per_trial=2, accelerator="auto") == [None, None, None]


def test_gpu_slots_hidden_from_cpu_trials(four_gpus):
    assert gpu_slots(n_jobs=2, devices_per_trial=1, accelerator="cpu") == ["", ""]


def test_gpu_slots_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    assert gpu_slots(n_jobs=2, devices_per_trial=1) == [None, None]
    assert gpu_slots(n_jobs=3, devices_per_trial=2, accelerator="gpu") == [None, None, None]


class DtypeRecordingMLP(MLP):
    """An MLP that records the dtype of its output at every call, to show that autocast was on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = super().forward(x)
        self.output_dtypes.append(output.dtype)
        return output


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def one_hot_teacher_splits(size: int = 64, num_classes: int = 10) -> DataSplits:
    """Return random 8x8 images whose training and validation samples carry near one-hot teacher logits.

    The teacher's logit is +30 for the sample's label and -30 for every other class, as the cached
    logits of a very confident teacher would be.
    """
    generator = torch.Generator().manual_seed(0)

    def split(with_logits: bool) -> TensorDataset:
        images = torch.randn(size, 1, 8, 8, generator=generator)
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        if not with_logits:
            return TensorDataset(images, labels)
        logits = torch.full((size, num_classes), -30.0)
        logits[torch.arange(size), labels] = 30.0
        return TensorDataset(images, labels, logits)

    return DataSplits(split(True), split(True), split(False), input_shape=(1, 8, 8), num_classes=num_classes)


def test_bf16_mixed_one_hot_teacher_finite():
    splits = one_hot_teacher_splits()
    student = DtypeRecordingMLP((1, 8, 8), 10, hidden_sizes=(32,))
    # The training and validation batches carry the cached logits, so the teacher network is never called.
    teacher = FrozenTeacher(MLP((1, 8, 8), 10, hidden_sizes=(8,)))
    module = DistillationModule(student, lambda parameters: torch.optim.AdamW(parameters, lr=0.01), 10,
                                teacher=teacher, temperature=20.0, alpha=0.9)
    recorder = LossRecorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[recorder])

    trainer.fit(module, datamodule=TensorDataModule(splits, batch_size=16, seed=0))

    assert torch.bfloat16 in student.output_dtypes, f"autocast to bf16 was not on: {set(student.output_dtypes)}"
    assert len(recorder.losses) == 8, f"expected 2 epochs of 4 steps, got {len(recorder.losses)} steps"
    losses = torch.stack(recorder.losses)
    assert torch.isfinite(losses).all(), f"non-finite training losses: {losses.tolist()}"
    for name in ("train/loss", "train/loss_hard", "train/loss_soft"):
        assert torch.isfinite(trainer.callback_metrics[name]), f"{name} is {trainer.callback_metrics[name]}"
    assert trainer.callback_metrics["train/loss_soft"] > 0, "the soft-target term was not trained"
    for name, parameter in student.named_parameters():
        assert torch.isfinite(parameter).all(), f"student parameter {name} is not finite"


@pytest.mark.parametrize("accelerator, available, bf16, expected", [
    ("auto", True, True, "bf16-mixed"),
    ("gpu", True, True, "bf16-mixed"),
    ("gpu", True, False, "32-true"),
    ("auto", False, False, "32-true"),
    ("cpu", True, True, "32-true"),
])
def test_default_precision(monkeypatch, accelerator, available, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)

    assert default_precision(accelerator) == expected


@pytest.mark.parametrize("trainer", ["default", "ddp_cpu", "ddp"])
def test_trainer_configs_resolve_precision(monkeypatch, trainer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer={trainer}"])

    assert cfg.trainer.precision == ("32-true" if trainer == "ddp_cpu" else "bf16-mixed")
