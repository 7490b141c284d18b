import os

import pytorch_lightning as pl
import torch
from torch import nn

from kdsweep.data import DataSplits, TensorDataModule
from kdsweep.models import MLP, SmallCNN
from kdsweep.modules import DistillationModule, FrozenTeacher
from torch.utils.data import TensorDataset


def random_splits(size: int = 96) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    parts = [TensorDataset(torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 4, (size,),
                                                                                          generator=generator))
             for _ in range(3)]
    return DataSplits(*parts, input_shape=(1, 8, 8), num_classes=4)


def fit_one_epoch(module: pl.LightningModule, splits: DataSplits) -> None:
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=TensorDataModule(splits, batch_size=16, seed=0))


class RecordingStudent(MLP):
    """An MLP with dropout that records whether it and its dropout were in training mode at each call."""

    def __init__(self) -> None:
        super().__init__((1, 8, 8), 4, hidden_sizes=(16,), dropout=0.5)
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x):
        dropout = next(m for m in self.modules() if isinstance(m, nn.Dropout))
        self.modes.append((self.training, dropout.training))
        return super().forward(x)


def test_batchnorm_teacher_unchanged_by_student_epoch():
    splits = random_splits()
    teacher_model = SmallCNN((1, 8, 8), 4, channels=(4,), hidden_size=8, dropout=0.5)
    teacher_model.train()
    teacher_model(torch.randn(32, 1, 8, 8))  # Give BatchNorm non-trivial running statistics.
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    teacher = FrozenTeacher(teacher_model)
    module = DistillationModule(MLP((1, 8, 8), 4), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                teacher=teacher, temperature=4.0, alpha=0.5)

    fit_one_epoch(module, splits)

    after = teacher_model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"teacher {key} changed during student training"
    assert not teacher_model.training, "teacher left eval mode after the validation loop"
    assert all(not p.requires_grad for p in teacher_model.parameters())


def test_teacher_outside_student_checkpoint_and_optimizer():
    teacher = FrozenTeacher(MLP((1, 8, 8), 4, hidden_sizes=(8,)))
    module = DistillationModule(MLP((1, 8, 8), 4, hidden_sizes=(8,)), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                teacher=teacher, temperature=2.0, alpha=0.5)

    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}

    assert all(not key.startswith("teacher") for key in module.state_dict())
    assert not optimised & {id(p) for p in teacher.model.parameters()}
    assert "teacher" not in module.hparams


def test_student_dropout_active_in_training_steps():
    splits = random_splits()
    student = RecordingStudent()
    teacher = FrozenTeacher(MLP((1, 8, 8), 4, hidden_sizes=(8,)))
    module = DistillationModule(student, lambda p: torch.optim.SGD(p, lr=0.1), 4, teacher=teacher,
                                temperature=4.0, alpha=0.9)

    fit_one_epoch(module, splits)

    training_calls = student.modes[: len(splits.train) // 16]
    assert training_calls, "the student was never called"
    assert all(model_mode and dropout_mode for model_mode, dropout_mode in training_calls)
    validation_calls = student.modes[len(training_calls):]
    assert validation_calls and not any(model_mode for model_mode, _ in validation_calls)


def test_alpha_above_zero_requires_teacher():
    try:
        DistillationModule(MLP((1, 8, 8), 4), lambda p: torch.optim.SGD(p, lr=0.1), 4, teacher=None,
                           temperature=2.0, alpha=0.5)
    except ValueError as error:
        assert "teacher" in str(error)
    else:
        raise AssertionError("DistillationModule accepted alpha > 0 without a teacher")


def test_cached_logits_equal_online_logits():
    splits = random_splits()
    teacher = FrozenTeacher(SmallCNN((1, 8, 8), 4, channels=(4,), hidden_size=8, dropout=0.5))
    inputs = splits.train.tensors[0]

    cached = teacher.logits_in_batches(inputs, batch_size=40, device=torch.device("cpu"))
    online = torch.cat([teacher.logits(batch) for batch in inputs.split(16)])

    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)


def test_training_step_same_with_cached_logits():
    splits = random_splits()
    teacher = FrozenTeacher(MLP((1, 8, 8), 4, hidden_sizes=(8,)))
    module = DistillationModule(MLP((1, 8, 8), 4, hidden_sizes=(8,)), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                teacher=teacher, temperature=3.0, alpha=0.7)
    inputs, labels = splits.train.tensors[0][:16], splits.train.tensors[1][:16]
    cached_logits = teacher.logits_in_batches(inputs, batch_size=1024, device=torch.device("cpu"))

    online_loss = module.training_step((inputs, labels), 0)
    cached_loss = module.training_step((inputs, labels, cached_logits), 0)

    torch.testing.assert_close(cached_loss, online_loss)
    assert module.train_losses["loss_soft"].compute() > 0


def test_train_losses_logged_once_per_epoch():
    splits = random_splits()
    teacher = FrozenTeacher(MLP((1, 8, 8), 4, hidden_sizes=(8,)))
    module = DistillationModule(MLP((1, 8, 8), 4, hidden_sizes=(8,)), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                teacher=teacher, temperature=3.0, alpha=0.7)

    fit_one_epoch(module, splits)

    assert {"train/loss", "train/loss_hard", "train/loss_soft"} <= set(module.trainer.callback_metrics)
    assert all(not name.endswith("_step") for name in module.trainer.callback_metrics)


def test_nvml_check_cleared_only_during_cpu_fit(monkeypatch):
    from kdsweep.train import _cuda_check_by_runtime

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    seen_during_fit = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen_during_fit.append(os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", callbacks=[Probe()])
    module = DistillationModule(MLP((1, 8, 8), 4, hidden_sizes=(8,)), lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                teacher=None, temperature=1.0, alpha=0.0)
    with _cuda_check_by_runtime(trainer):
        trainer.fit(module, datamodule=TensorDataModule(random_splits(), batch_size=16, seed=0))

    assert seen_during_fit, "the fit ran no training step"
    assert set(seen_during_fit) == {None}
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
