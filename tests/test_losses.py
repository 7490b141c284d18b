import math

import pytest
import torch

from kdsweep.losses import distillation_loss


def reference_loss(student, teacher, labels, temperature, alpha):
    """The objective written out sample by sample, without torch.nn.functional."""
    batch, classes = student.shape
    hard = 0.0
    soft = 0.0
    for i in range(batch):
        s = student[i].double()
        t = teacher[i].double()
        log_z = math.log(sum(math.exp(v) for v in s.tolist()))
        hard += -(s[labels[i]].item() - log_z)
        s_t = (s / temperature).tolist()
        t_t = (t / temperature).tolist()
        log_zs = math.log(sum(math.exp(v) for v in s_t))
        log_zt = math.log(sum(math.exp(v) for v in t_t))
        for c in range(classes):
            p = math.exp(t_t[c] - log_zt)
            soft += p * ((t_t[c] - log_zt) - (s_t[c] - log_zs))
    hard /= batch
    soft = soft / batch * temperature**2
    return (1 - alpha) * hard + alpha * soft, hard, soft


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3), (0.5, 1.0)])
def test_loss_matches_formula(temperature, alpha):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator) * 3
    teacher = torch.randn(6, 5, generator=generator) * 3
    labels = torch.randint(0, 5, (6,), generator=generator)

    loss = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    expected_total, expected_hard, expected_soft = reference_loss(student, teacher, labels, temperature, alpha)

    assert loss.hard.item() == pytest.approx(expected_hard, rel=1e-5)
    assert loss.soft.item() == pytest.approx(expected_soft, rel=1e-4)
    assert loss.total.item() == pytest.approx(expected_total, rel=1e-4)


def test_identical_logits_give_zero_soft_term():
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))

    loss = distillation_loss(logits, logits.clone(), labels, temperature=3.0, alpha=0.7)

    assert loss.soft.item() == pytest.approx(0.0, abs=1e-6)


def test_soft_term_scales_with_temperature_squared():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, generator=generator)
    teacher = torch.randn(4, 6, generator=generator)
    labels = torch.zeros(4, dtype=torch.long)
    temperature = 5.0

    loss = distillation_loss(student, teacher, labels, temperature=temperature, alpha=1.0)
    unscaled_kl = torch.nn.functional.kl_div(
        torch.log_softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1), reduction="batchmean"
    )

    assert loss.soft.item() == pytest.approx(unscaled_kl.item() * temperature**2, rel=1e-5)


def test_alpha_zero_is_cross_entropy_without_teacher():
    student = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])

    loss = distillation_loss(student, None, labels, temperature=4.0, alpha=0.0)

    assert loss.total.item() == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item())
    assert loss.soft.item() == 0.0


def test_alpha_one_is_pure_distillation():
    student = torch.randn(5, 3)
    teacher = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])

    loss = distillation_loss(student, teacher, labels, temperature=2.0, alpha=1.0)

    assert loss.total.item() == pytest.approx(loss.soft.item())


def test_one_hot_teacher_finite_in_bfloat16():
    student = torch.randn(4, 10).bfloat16()
    teacher = torch.full((4, 10), -1e4).bfloat16()
    teacher[:, 3] = 1e4
    labels = torch.full((4,), 3)

    loss = distillation_loss(student, teacher, labels, temperature=20.0, alpha=0.9)

    assert torch.isfinite(loss.total)
    assert loss.total.dtype == torch.float32


@pytest.mark.parametrize("temperature, alpha", [(0.0, 0.5), (-1.0, 0.5), (1.0, -0.1), (1.0, 1.5)])
def test_invalid_temperature_or_alpha_raises(temperature, alpha):
    with pytest.raises(ValueError):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), temperature=temperature,
                          alpha=alpha)
