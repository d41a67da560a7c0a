"""Hand-derived values for the distillation losses (distill/losses.py).

Every expected number below is worked out in the comments from two small probability rows:

    A = [[0, ln 2, 0], [ln 3, 0, 0]]
    softmax(A[0]) = [1, 2, 1] / 4 = [1/4, 1/2, 1/4]
    softmax(A[1]) = [3, 1, 1] / 5 = [3/5, 1/5, 1/5]
    softmax(zeros(3)) = [1/3, 1/3, 1/3]

so -log p for row 0 is [ln 4, ln 2, ln 4] and for row 1 [ln(5/3), ln 5, ln 5].
Tensors are float64 so the comparisons can be tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.training.losses import (
    DistillSettings,
    LossParts,
    classification_loss,
    distillation_loss,
    hard_kd,
    label_ce,
    soft_kd,
)

LN2, LN3, LN5 = math.log(2.0), math.log(3.0), math.log(5.0)
TOL = 1e-12


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def a_logits() -> torch.Tensor:
    return t([[0.0, LN2, 0.0], [LN3, 0.0, 0.0]])


def zeros() -> torch.Tensor:
    return torch.zeros(2, 3, dtype=torch.float64)


def close(x: torch.Tensor, expected: float, tol: float = TOL) -> bool:
    return abs(float(x.detach()) - expected) <= tol


# Shared hand values ---------------------------------------------------------------------------

# KL([1/4, 1/2, 1/4] || [1/3, 1/3, 1/3]) = 1/4 ln(3/4) + 1/2 ln(3/2) + 1/4 ln(3/4)
#                                         = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8)
KL_ROW0_VS_UNIFORM = 0.5 * math.log(9.0 / 8.0)
# CE(A, labels [1, 0]) = mean(ln 2, ln(5/3)) = ln(10/3) / 2
CE_A_LABELS_10 = 0.5 * (LN2 + math.log(5.0 / 3.0))
# ~ 0.6019864022
# CE with label smoothing 0.1 over C = 3: target = (1 - 0.1) * onehot + 0.1 / 3
#   row 0 (label 1): target [1/30, 28/30, 1/30] -> 1/30 ln4 + 28/30 ln2 + 1/30 ln4 = 32/30 ln 2 = 16/15 ln 2
#   row 1 (label 0): target [28/30, 1/30, 1/30] -> 28/30 ln(5/3) + 2/30 ln 5
CE_A_LABELS_10_SMOOTH = 0.5 * (16.0 / 15.0 * LN2 + 28.0 / 30.0 * math.log(5.0 / 3.0) + 2.0 / 30.0 * LN5)
# Teacher [[0, 0, 5], [1, 0, 0]] has argmax [2, 0]; CE(A, [2, 0]) = mean(ln 4, ln(5/3)) = ln(20/3) / 2
TEACHER_HARD = t([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
HARD_KD_A = 0.5 * math.log(20.0 / 3.0)


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _ce(rows: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum(target * log softmax(row)), straight from the definition."""
    return sum(-sum(q * math.log(p) for q, p in zip(tgt, _softmax(r))) for r, tgt in zip(rows, targets)) / len(rows)


def test_hand_constants_follow_from_the_definitions() -> None:
    # The closed forms above were simplified by hand; recompute each from the definitions of
    # softmax, KL and cross-entropy (plain Python, not torch, not distill), so a slip in that
    # algebra fails here instead of being blamed on the library by the tests that use them.
    a = a_logits().tolist()
    p, u = _softmax(a[0]), _softmax([0.0, 0.0, 0.0])
    assert p == pytest.approx([0.25, 0.5, 0.25], abs=1e-15)
    assert math.isclose(KL_ROW0_VS_UNIFORM, sum(pi * math.log(pi / ui) for pi, ui in zip(p, u)), abs_tol=TOL)
    onehot = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # labels [1, 0]
    assert math.isclose(CE_A_LABELS_10, _ce(a, onehot), abs_tol=TOL)
    smoothed = [[0.9 * v + 0.1 / 3 for v in row] for row in onehot]
    assert math.isclose(CE_A_LABELS_10_SMOOTH, _ce(a, smoothed), abs_tol=TOL)
    argmax = [max(range(3), key=row.__getitem__) for row in TEACHER_HARD.tolist()]
    assert argmax == [2, 0]
    assert math.isclose(HARD_KD_A, _ce(a, [[float(i == k) for i in range(3)] for k in argmax]), abs_tol=TOL)


# soft_kd --------------------------------------------------------------------------------------


def test_soft_kd_batchmean_tau1() -> None:
    # teacher rows: [1/4, 1/2, 1/4] and uniform; student uniform in both rows.
    # summed KL = 1/2 ln(9/8) + 0; batchmean divides by B = 2 -> 1/4 ln(9/8) ~ 0.0294458
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    out = soft_kd(zeros(), teacher, tau=1.0, kl_norm="batchmean")
    assert close(out, 0.25 * math.log(9.0 / 8.0))
    assert close(out, 0.0294457589, tol=1e-10)


def test_soft_kd_deit_norm_divides_by_batch_times_classes() -> None:
    # deit: summed KL / (B * C) = 1/2 ln(9/8) / 6 = ln(9/8) / 12 ~ 0.0098153
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    out = soft_kd(zeros(), teacher, tau=1.0, kl_norm="deit")
    assert close(out, math.log(9.0 / 8.0) / 12.0)
    batchmean = soft_kd(zeros(), teacher, tau=1.0, kl_norm="batchmean")
    assert close(out, float(batchmean) / 3.0)  # deit = batchmean / num_classes


def test_soft_kd_tau_squared_scaling() -> None:
    # tau = 2: teacher [0, 2 ln 2, 0] / 2 = [0, ln 2, 0] -> the same [1/4, 1/2, 1/4]; student 0 / 2 = uniform.
    # summed KL = 1/2 ln(9/8); x tau^2 = 4 -> 2 ln(9/8); batchmean / 2 -> ln(9/8) ~ 0.117783
    teacher = t([[0.0, 2 * LN2, 0.0], [0.0, 0.0, 0.0]])
    out = soft_kd(zeros(), teacher, tau=2.0, kl_norm="batchmean")
    assert close(out, math.log(9.0 / 8.0))
    # deit with tau = 2: 2 ln(9/8) / 6 = ln(9/8) / 3
    assert close(soft_kd(zeros(), teacher, tau=2.0, kl_norm="deit"), math.log(9.0 / 8.0) / 3.0)


def test_soft_kd_is_kl_teacher_to_student_not_reverse() -> None:
    # One sample, teacher uniform, student [1/4, 1/2, 1/4]:
    # KL(teacher || student) = 1/3 (ln(4/3) + ln(2/3) + ln(4/3)) = 1/3 ln(32/27) ~ 0.0566330
    # (the reverse direction would give 1/2 ln(9/8) ~ 0.0588915)
    student = t([[0.0, LN2, 0.0]])
    teacher = t([[0.0, 0.0, 0.0]])
    out = soft_kd(student, teacher, tau=1.0)
    assert close(out, math.log(32.0 / 27.0) / 3.0)


@pytest.mark.parametrize("kl_norm", ["batchmean", "deit"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_soft_kd_zero_when_student_equals_teacher(kl_norm: str, tau: float) -> None:
    logits = torch.tensor([[1.5, -2.0, 0.3, 4.0], [0.0, 0.0, 7.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    out = soft_kd(logits, logits.clone(), tau=tau, kl_norm=kl_norm)  # type: ignore[arg-type]
    assert abs(float(out)) < 1e-6


def test_soft_kd_gradient_flows_to_student_only_through_its_argument() -> None:
    student = zeros().requires_grad_(True)
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    soft_kd(student, teacher, tau=1.0).backward()
    assert student.grad is not None
    # d/ds of KL(p_t || softmax(s)) summed / B = (p_s - p_t) / B; row 0: ([1/3,1/3,1/3] - [1/4,1/2,1/4]) / 2
    expected_row0 = [(1 / 3 - 1 / 4) / 2, (1 / 3 - 1 / 2) / 2, (1 / 3 - 1 / 4) / 2]
    assert student.grad[0].tolist() == pytest.approx(expected_row0, abs=1e-12)
    assert student.grad[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


# hard_kd --------------------------------------------------------------------------------------


def test_hard_kd_is_ce_against_teacher_argmax() -> None:
    # teacher argmax [2, 0]; row 0: -log(1/4) = ln 4; row 1: -log(3/5) = ln(5/3); mean = ln(20/3) / 2 ~ 0.948560
    out = hard_kd(a_logits(), TEACHER_HARD)
    assert close(out, HARD_KD_A)


def test_hard_kd_depends_only_on_teacher_argmax() -> None:
    # Rescaling the teacher's logits keeps its argmax, so the loss is unchanged.
    assert close(hard_kd(a_logits(), TEACHER_HARD * 100.0), HARD_KD_A)
    assert close(hard_kd(a_logits(), TEACHER_HARD + 3.0), HARD_KD_A)


# label_ce -------------------------------------------------------------------------------------


def test_label_ce_integer_labels() -> None:
    # row 0 label 1: -log(1/2) = ln 2; row 1 label 0: -log(3/5) = ln(5/3)
    out = label_ce(a_logits(), torch.tensor([1, 0]))
    assert close(out, CE_A_LABELS_10)


def test_label_ce_label_smoothing_single_row() -> None:
    # logits [0, ln 2, 0], label 1, eps 0.1, C 3: 0.9 * ln 2 + 0.1 * (ln4 + ln2 + ln4) / 3
    #   = (0.9 + 5/30) ln 2 = 16/15 ln 2 ~ 0.7393569926
    out = label_ce(t([[0.0, LN2, 0.0]]), torch.tensor([1]), label_smoothing=0.1)
    assert close(out, 16.0 / 15.0 * LN2)
    assert close(out, 0.7393569926, tol=1e-10)


def test_label_ce_label_smoothing_batch() -> None:
    out = label_ce(a_logits(), torch.tensor([1, 0]), label_smoothing=0.1)
    assert close(out, CE_A_LABELS_10_SMOOTH)


def test_label_ce_dense_targets() -> None:
    # row 0: target [1/2, 1/2, 0] -> 1/2 ln 4 + 1/2 ln 2 = 3/2 ln 2
    # row 1: target [0, 0, 1]     -> ln 5
    targets = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = 0.5 * (1.5 * LN2 + LN5)
    assert close(label_ce(a_logits(), targets), expected)


def test_label_ce_dense_targets_ignore_label_smoothing_argument() -> None:
    # Dense (mixup) targets already have smoothing folded in by timm's Mixup; the argument is not re-applied.
    targets = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = 0.5 * (1.5 * LN2 + LN5)
    assert close(label_ce(a_logits(), targets, label_smoothing=0.1), expected)


def test_label_ce_dense_one_hot_equals_integer_labels() -> None:
    one_hot = t([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(label_ce(a_logits(), one_hot), CE_A_LABELS_10)


# distillation_loss ----------------------------------------------------------------------------


def test_distillation_none_mean_of_both_heads() -> None:
    # cls = A, labels [1, 0] -> ln(10/3) / 2
    # dist = zeros -> -log(1/3) per row = ln 3
    # total = ce = (ln(10/3) / 2 + ln 3) / 2, kd = 0
    parts = distillation_loss(a_logits(), zeros(), torch.tensor([1, 0]), None, DistillSettings("none", alpha=0.25))
    assert isinstance(parts, LossParts)
    expected = 0.5 * (CE_A_LABELS_10 + LN3)
    assert close(parts.ce, expected)
    assert close(parts.total, expected)
    assert float(parts.kd) == 0.0
    assert torch.equal(parts.total, parts.ce)


def test_distillation_none_ignores_teacher_and_trains_both_heads() -> None:
    cls = a_logits().requires_grad_(True)
    dist = zeros().requires_grad_(True)
    parts = distillation_loss(cls, dist, torch.tensor([1, 0]), TEACHER_HARD, DistillSettings("none", alpha=0.9))
    assert close(parts.total, 0.5 * (CE_A_LABELS_10 + LN3))  # teacher and alpha are not used
    parts.total.backward()
    assert cls.grad is not None and dist.grad is not None
    assert float(cls.grad.abs().sum()) > 0 and float(dist.grad.abs().sum()) > 0


def test_distillation_soft_alpha_quarter() -> None:
    # ce_cls = ln(10/3) / 2; kd = soft_kd(zeros, [[0, ln2, 0], [0, 0, 0]], tau 1) = 1/4 ln(9/8)
    # total = 0.75 * ce_cls + 0.25 * kd
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    parts = distillation_loss(
        a_logits(), zeros(), torch.tensor([1, 0]), teacher, DistillSettings("soft", alpha=0.25, tau=1.0)
    )
    kd = 0.25 * math.log(9.0 / 8.0)
    assert close(parts.ce, CE_A_LABELS_10)
    assert close(parts.kd, kd)
    assert close(parts.total, 0.75 * CE_A_LABELS_10 + 0.25 * kd)


def test_distillation_soft_passes_tau_and_kl_norm() -> None:
    # tau 2, deit norm: kd = ln(9/8) / 3 (see test_soft_kd_tau_squared_scaling)
    teacher = t([[0.0, 2 * LN2, 0.0], [0.0, 0.0, 0.0]])
    parts = distillation_loss(
        a_logits(), zeros(), torch.tensor([1, 0]), teacher, DistillSettings("soft", alpha=0.25, tau=2.0, kl_norm="deit")
    )
    kd = math.log(9.0 / 8.0) / 3.0
    assert close(parts.kd, kd)
    assert close(parts.total, 0.75 * CE_A_LABELS_10 + 0.25 * kd)


def test_distillation_soft_uses_dist_head_for_teacher_term() -> None:
    # If dist == teacher the KD term is 0 whatever the class head says.
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    parts = distillation_loss(
        a_logits(), teacher.clone(), torch.tensor([1, 0]), teacher, DistillSettings("soft", alpha=0.25)
    )
    assert abs(float(parts.kd)) < 1e-12
    assert close(parts.total, 0.75 * CE_A_LABELS_10)


def test_distillation_hard_alpha_quarter() -> None:
    # ce_cls = ln(10/3) / 2; kd = CE(dist = A, teacher argmax [2, 0]) = ln(20/3) / 2
    parts = distillation_loss(
        a_logits(), a_logits(), torch.tensor([1, 0]), TEACHER_HARD, DistillSettings("hard", alpha=0.25)
    )
    assert close(parts.ce, CE_A_LABELS_10)
    assert close(parts.kd, HARD_KD_A)
    assert close(parts.total, 0.75 * CE_A_LABELS_10 + 0.25 * HARD_KD_A)
    assert close(parts.total, 0.6886297997, tol=1e-10)


def test_distillation_label_smoothing_not_applied_to_teacher_term() -> None:
    # With label_smoothing = 0.1 the class-head CE is smoothed but the hard KD term is not:
    # kd stays ln(20/3) / 2 (a smoothed teacher target would give a different value).
    parts = distillation_loss(
        a_logits(),
        a_logits(),
        torch.tensor([1, 0]),
        TEACHER_HARD,
        DistillSettings("hard", alpha=0.25, label_smoothing=0.1),
    )
    assert close(parts.kd, HARD_KD_A)
    assert close(parts.ce, CE_A_LABELS_10_SMOOTH)
    assert close(parts.total, 0.75 * CE_A_LABELS_10_SMOOTH + 0.25 * HARD_KD_A)
    # The smoothed value of the teacher term, which must NOT be what we get:
    # row 0 (teacher label 2): 1/30 ln 4 + 1/30 ln 2 + 28/30 ln 4 = 59/30 ln 2
    # row 1 (teacher label 0): 28/30 ln(5/3) + 2/30 ln 5
    smoothed_kd = 0.5 * (59.0 / 30.0 * LN2 + 28.0 / 30.0 * math.log(5.0 / 3.0) + 2.0 / 30.0 * LN5)
    assert abs(float(parts.kd) - smoothed_kd) > 1e-3


def test_distillation_soft_label_smoothing_only_on_ce() -> None:
    teacher = t([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    parts = distillation_loss(
        a_logits(), zeros(), torch.tensor([1, 0]), teacher, DistillSettings("soft", alpha=0.25, label_smoothing=0.1)
    )
    assert close(parts.kd, 0.25 * math.log(9.0 / 8.0))
    assert close(parts.ce, CE_A_LABELS_10_SMOOTH)


def test_distillation_with_dense_mixup_targets() -> None:
    # ce_cls with targets [[1/2, 1/2, 0], [0, 0, 1]] = (3/2 ln 2 + ln 5) / 2; kd hard = ln(20/3) / 2
    targets = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    parts = distillation_loss(a_logits(), a_logits(), targets, TEACHER_HARD, DistillSettings("hard", alpha=0.25))
    ce = 0.5 * (1.5 * LN2 + LN5)
    assert close(parts.ce, ce)
    assert close(parts.total, 0.75 * ce + 0.25 * HARD_KD_A)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_distillation_alpha_extremes(alpha: float) -> None:
    parts = distillation_loss(
        a_logits(), a_logits(), torch.tensor([1, 0]), TEACHER_HARD, DistillSettings("hard", alpha=alpha)
    )
    assert close(parts.total, HARD_KD_A if alpha == 1.0 else CE_A_LABELS_10)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_missing_teacher_raises(kind: str) -> None:
    with pytest.raises(ValueError, match=kind):
        distillation_loss(a_logits(), zeros(), torch.tensor([1, 0]), None, DistillSettings(kind, alpha=0.25))  # type: ignore[arg-type]


def test_distillation_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown distillation type"):
        distillation_loss(a_logits(), zeros(), torch.tensor([1, 0]), TEACHER_HARD, DistillSettings("bogus", alpha=0.25))  # type: ignore[arg-type]


# classification_loss --------------------------------------------------------------------------


def test_classification_loss_plain() -> None:
    parts = classification_loss(a_logits(), torch.tensor([1, 0]), label_smoothing=0.0)
    assert close(parts.total, CE_A_LABELS_10)
    assert close(parts.ce, CE_A_LABELS_10)
    assert float(parts.kd) == 0.0


def test_classification_loss_smoothed() -> None:
    parts = classification_loss(a_logits(), torch.tensor([1, 0]), label_smoothing=0.1)
    assert close(parts.total, CE_A_LABELS_10_SMOOTH)
    assert torch.equal(parts.total, parts.ce)
    assert float(parts.kd) == 0.0
