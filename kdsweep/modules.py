"""Lightning modules: a classifier trained on labels (the teacher) and a student distilled from it."""

import logging
from collections.abc import Callable, Iterable
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kdsweep.losses import distillation_loss

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite, so the training cannot continue."""


class FrozenTeacher:
    """A trained network used only for inference: eval mode, no gradients, outside any module tree.

    It is deliberately not an ``nn.Module`` attribute of the student's LightningModule. Lightning's
    ``.train()`` calls after every validation loop therefore cannot switch its dropout or BatchNorm
    back to training mode, and its weights stay out of the optimizer, the checkpoint and DDP.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def logits_in_batches(self, inputs: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        """Return the logits of a whole split as a float32 CPU tensor, computed on ``device``."""
        self.to(device)
        outputs = [self.logits(chunk.to(device)).float().cpu() for chunk in inputs.split(batch_size)]
        return torch.cat(outputs)


class ClassifierModule(pl.LightningModule):
    """Train ``model`` with cross-entropy and report accuracy and loss on validation and test data.

    Metrics are logged once per epoch with the epoch as the MLflow step. ``augment``, if given (a
    :class:`kdsweep.augmentation.BatchAugmentation`), transforms each training batch once it is on
    the training device. It may turn the labels into class probabilities (MixUp, CutMix), which
    the cross-entropy takes as they are.
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, num_classes: int,
                 augment: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model = model
        self.augment = augment
        self.optimizer_factory = optimizer
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Training losses are averaged here and logged once per epoch: a self.log call on every
        # step costs more than the whole step of a small student on CPU.
        self.train_losses = nn.ModuleDict({"loss": MeanMetric()})

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is not None and self.trainer.training:
            # Tensors precomputed from the inputs, such as cached teacher logits, would describe
            # the images before augmentation, so the augmented batch leaves them out.
            return self.augment(batch[0], batch[1])
        return batch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self.model(inputs), labels)
        _check_finite(loss, self.current_epoch, batch_idx)
        self.train_losses["loss"].update(loss.detach(), weight=len(labels))
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch({f"train/{name}": metric for name, metric in self.train_losses.items()}, batch_size=1)

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        logits = self.model(inputs)
        self.val_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.val_acc.update(logits, labels)
        self._log_epoch({"val/loss": self.val_loss, "val/acc": self.val_acc}, batch_size=len(labels))
        return logits

    def test_step(self, batch, batch_idx: int) -> None:
        inputs, labels = batch
        logits = self.model(inputs)
        self.test_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.test_acc.update(logits, labels)
        self._log_epoch({"test/loss": self.test_loss, "test/acc": self.test_acc}, batch_size=len(labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.model.parameters())

    def _log_epoch(self, metrics: dict, batch_size: int) -> None:
        # Lightning takes a logged "step" value as the logger's step, so MLflow plots against epochs.
        metrics = {**metrics, "step": float(self.current_epoch)}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)


class DistillationModule(ClassifierModule):
    """Train a student on a blend of hard labels and a frozen teacher's soft targets.

    See :func:`kdsweep.losses.distillation_loss` for the objective; ``alpha`` weights the soft
    targets. With ``alpha = 0`` no teacher is needed and the module trains the plain baseline.
    A batch of three tensors carries the teacher's precomputed logits as its third. For a batch of
    two, ``teacher`` computes them on the batch itself: under ``augment``, on the very augmented
    images the student is trained on, and the hard-label term uses the mixed labels of MixUp or CutMix.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        *,
        teacher: Optional[FrozenTeacher],
        temperature: float,
        alpha: float,
        augment: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(model, optimizer, num_classes, augment=augment)
        self.save_hyperparameters("temperature", "alpha", logger=False)
        if alpha > 0 and teacher is None:
            raise ValueError(f"a teacher is required when alpha > 0, got alpha={alpha}")
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.train_losses.update({"loss_hard": MeanMetric(), "loss_soft": MeanMetric()})

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.trainer.world_size > 1:
            log.info("Process %d of %d distils with temperature %s and alpha %s", self.global_rank,
                     self.trainer.world_size, self.temperature, self.alpha)

    def on_test_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        student_logits = self.model(inputs)
        teacher_logits = self._teacher_logits(batch) if self.alpha > 0 else None
        loss = distillation_loss(
            student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha
        )
        _check_finite(loss.total, self.current_epoch, batch_idx)
        for name, value in (("loss", loss.total), ("loss_hard", loss.hard), ("loss_soft", loss.soft)):
            self.train_losses[name].update(value.detach(), weight=len(labels))
        return loss.total

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        student_logits = super().validation_step(batch, batch_idx)
        if self.teacher is not None:
            teacher_predictions = self._teacher_logits(batch).argmax(dim=-1)
            self.val_agreement.update(student_logits, teacher_predictions)
            self._log_epoch({"val/agreement": self.val_agreement}, batch_size=len(batch[1]))
        return student_logits

    def _teacher_logits(self, batch) -> torch.Tensor:
        return batch[2] if len(batch) > 2 else self.teacher.logits(batch[0])


def _check_finite(loss: torch.Tensor, epoch: int, batch_idx: int) -> None:
    """Raise NonFiniteLossError at once when the training loss is NaN or infinite.

    Checking every step costs one device synchronisation per batch, which stops a diverged
    trial before it wastes its remaining epochs.
    """
    if not torch.isfinite(loss).item():
        raise NonFiniteLossError(f"train/loss is {loss.item()} at epoch {epoch}, batch {batch_idx}")
