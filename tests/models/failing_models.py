"""Networks that break on purpose, for tests that need a run to fail during training."""

import torch

from kdsweep.models import MLP


class FailingMLP(MLP):
    """An MLP whose forward pass raises once it has run ``fail_after`` training batches."""

    def __init__(self, input_shape, num_classes, hidden_sizes=(8,), dropout=0.0, fail_after: int = 3) -> None:
        super().__init__(input_shape, num_classes, hidden_sizes=hidden_sizes, dropout=dropout)
        self.fail_after = fail_after
        self.training_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.training_calls += 1
            if self.training_calls > self.fail_after:
                raise RuntimeError("FailingMLP failed on purpose")
        return super().forward(x)


class DivergingMLP(MLP):
    """An MLP whose outputs become NaN after ``nan_after`` training batches (never when it is negative)."""

    def __init__(self, input_shape, num_classes, hidden_sizes=(8,), dropout=0.0, nan_after: int = -1) -> None:
        super().__init__(input_shape, num_classes, hidden_sizes=hidden_sizes, dropout=dropout)
        self.nan_after = nan_after
        self.training_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            self.training_calls += 1
            if 0 <= self.nan_after < self.training_calls:
                return logits * float("nan")
        return logits
