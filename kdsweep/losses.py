"""The knowledge-distillation objective as a pure function of logits."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class DistillationLoss(NamedTuple):
    """The blended training loss and its two parts, each averaged over the batch."""

    total: torch.Tensor
    hard: torch.Tensor
    soft: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> DistillationLoss:
    """Blend cross-entropy on the labels with the KL divergence to the teacher's soft targets.

    ``total = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)``

    ``alpha`` is the weight of the teacher's soft targets: ``alpha = 1`` is pure distillation and
    ``alpha = 0`` is the plain student, which needs no teacher (``teacher_logits`` may be None).
    Some KD code names this weight the other way round.

    ``labels`` are class indices, or class probabilities such as the mixed labels of MixUp and
    CutMix. The hard-label term uses T = 1. The KL term sums over classes and averages over the batch
    (``batchmean``). It is scaled by T^2 because its gradients shrink as 1/T^2, so the scaling
    keeps the two terms comparable when T changes (Hinton, Vinyals and Dean, 2015). Both terms
    are computed in float32 from log-probabilities, so that a large T with near one-hot teacher
    outputs cannot produce NaN under reduced precision.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    student_logits = student_logits.float()
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0.0:
        soft = torch.zeros_like(hard)
        return DistillationLoss(total=hard, hard=hard, soft=soft)

    if teacher_logits is None:
        raise ValueError(f"teacher_logits are required when alpha > 0, got alpha={alpha}")
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    soft = kl * temperature**2
    total = (1.0 - alpha) * hard + alpha * soft
    return DistillationLoss(total=total, hard=hard, soft=soft)
