"""Per-sample evaluation statistics (distill/metrics.py), with hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from distill.models.metrics import classifier_sample_stats, kl_teacher_student, student_sample_stats, topk_correct

LN2 = math.log(2.0)
E = math.e


# topk_correct ---------------------------------------------------------------------------------

# Three samples, three classes, no ties:
#   row 0: order 1 > 2 > 0, label 2 -> top1 no, top2 yes
#   row 1: order 0 > 1 > 2, label 0 -> top1 yes, top2 yes
#   row 2: order 2 > 1 > 0, label 0 -> top1 no, top2 no, top3 yes
LOGITS = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.06, 0.04], [0.2, 0.3, 0.5]])
LABELS = torch.tensor([2, 0, 0])


def test_topk_correct_top1() -> None:
    out = topk_correct(LOGITS, LABELS, 1)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 1.0, 0.0]


def test_topk_correct_top2() -> None:
    assert topk_correct(LOGITS, LABELS, 2).tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("k", [3, 5, 100])
def test_topk_correct_k_clipped_to_num_classes(k: int) -> None:
    # k >= C: every label is in the top-k
    assert topk_correct(LOGITS, LABELS, k).tolist() == [1.0, 1.0, 1.0]


def test_topk_correct_mean_is_accuracy() -> None:
    assert float(topk_correct(LOGITS, LABELS, 1).mean()) == pytest.approx(1.0 / 3.0)


# kl_teacher_student ---------------------------------------------------------------------------


def test_kl_teacher_student_hand_values() -> None:
    # row 0: teacher softmax [1/4, 1/2, 1/4], student uniform -> 1/2 ln(9/8) ~ 0.0588915
    # row 1: teacher uniform, student [1/4, 1/2, 1/4] -> 1/3 (ln(4/3) + ln(2/3) + ln(4/3)) = 1/3 ln(32/27) ~ 0.0566330
    # (the two rows are the two directions of the same pair: the function is KL(teacher || student))
    teacher = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, 0.0]])
    out = kl_teacher_student(teacher, student)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([0.5 * math.log(9.0 / 8.0), math.log(32.0 / 27.0) / 3.0], abs=1e-6)


def test_kl_teacher_student_zero_for_identical() -> None:
    logits = torch.tensor([[1.5, -2.0, 0.3, 4.0], [0.0, 0.0, 7.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    out = kl_teacher_student(logits, logits.clone())
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_kl_teacher_student_shift_invariant_and_nonnegative() -> None:
    teacher = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, -2.0]])
    out = kl_teacher_student(teacher, student)
    assert (out >= 0).all()
    assert kl_teacher_student(teacher + 10.0, student - 5.0).tolist() == pytest.approx(out.tolist(), abs=1e-5)


def test_kl_teacher_student_low_precision_inputs_computed_in_float32() -> None:
    teacher = torch.tensor([[0.0, LN2, 0.0]], dtype=torch.bfloat16)
    student = torch.zeros(1, 3, dtype=torch.bfloat16)
    out = kl_teacher_student(teacher, student)
    assert out.dtype == torch.float32
    # bf16 rounds ln 2 to 0.69140625; the KL is still close to 1/2 ln(9/8)
    assert float(out[0]) == pytest.approx(0.5 * math.log(9.0 / 8.0), abs=2e-3)


# student_sample_stats -------------------------------------------------------------------------

# cls  row 0 = [-1, 2 ln 2, 1]  (argmax 1)     dist row 0 = [1, 0, -1]  (argmax 0)
#   fused row 0 = [0, ln 2, 0]  (argmax 1)
# cls  row 1 = [3, 0, 0]        (argmax 0)     dist row 1 = [-3, 0, 2]  (argmax 2)
#   fused row 1 = [0, 0, 1]     (argmax 2)
# labels [1, 2]:
#   top1_cls = [1, 0], top1_dist = [0, 1], top1_fused = [1, 1], top5_fused = [1, 1]
# teacher row 0 = [0, ln 2, 0] (argmax 1, = fused row 0 -> KL 0)
# teacher row 1 = [1, 0, 0]    (argmax 0)
#   teacher_top1 = [1, 0], agreement = [1, 0]
#   KL row 1: p_t = [e, 1, 1] / (e + 2), p_s = softmax([0, 0, 1]) = [1, 1, e] / (e + 2)
#     = e/(e+2) ln(e / 1) + 1/(e+2) ln(1 / 1) + 1/(e+2) ln(1 / e) = (e - 1) / (e + 2) ~ 0.3641753
CLS = torch.tensor([[-1.0, 2 * LN2, 1.0], [3.0, 0.0, 0.0]])
DIST = torch.tensor([[1.0, 0.0, -1.0], [-3.0, 0.0, 2.0]])
TEACHER = torch.tensor([[0.0, LN2, 0.0], [1.0, 0.0, 0.0]])
STUDENT_LABELS = torch.tensor([1, 2])


def test_student_sample_stats_with_teacher() -> None:
    stats = student_sample_stats(CLS, DIST, STUDENT_LABELS, TEACHER)
    assert set(stats) == {
        "top1_cls",
        "top1_dist",
        "top1_fused",
        "top5_fused",
        "teacher_top1",
        "agreement",
        "kl",
    }
    assert stats["top1_cls"].tolist() == [1.0, 0.0]
    assert stats["top1_dist"].tolist() == [0.0, 1.0]
    assert stats["top1_fused"].tolist() == [1.0, 1.0]
    assert stats["top5_fused"].tolist() == [1.0, 1.0]
    assert stats["teacher_top1"].tolist() == [1.0, 0.0]
    assert stats["agreement"].tolist() == [1.0, 0.0]
    assert stats["kl"].tolist() == pytest.approx([0.0, (E - 1.0) / (E + 2.0)], abs=1e-6)
    assert math.isclose((E - 1.0) / (E + 2.0), 0.3641753271, abs_tol=1e-10)
    for value in stats.values():
        assert value.shape == (2,)


def test_student_sample_stats_fused_is_mean_of_logits() -> None:
    # cls [6, 0, 5] (argmax 0) and dist [0, 4, 3] (argmax 1) average to fused logits [3, 2, 4] (argmax 2):
    # the fused head picks a class neither head picks on its own.
    cls = torch.tensor([[6.0, 0.0, 5.0]])
    dist = torch.tensor([[0.0, 4.0, 3.0]])
    stats = student_sample_stats(cls, dist, torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0]]))
    assert stats["top1_cls"].tolist() == [0.0]
    assert stats["top1_dist"].tolist() == [0.0]
    assert stats["top1_fused"].tolist() == [1.0]
    assert stats["agreement"].tolist() == [1.0]
    # KL(teacher || fused), teacher [0, 0, 1], fused [3, 2, 4]:
    #   p_t = [1, 1, e] / z_t with z_t = e + 2; p_s = [e^3, e^2, e^4] / Z = [e, 1, e^2] / z_s with z_s = e + 1 + e^2
    #   ln(p_t / p_s) = [ln(z_s/z_t) - 1, ln(z_s/z_t), ln(z_s/z_t) - 1]  ->  KL ~ 0.0681
    z_t, z_s = E + 2.0, E + 1.0 + E * E
    p_t = [1.0 / z_t, 1.0 / z_t, E / z_t]
    log_ratio = [math.log(z_s / z_t) - 1.0, math.log(z_s / z_t), math.log(z_s / z_t) - 1.0]
    expected_kl = sum(p * r for p, r in zip(p_t, log_ratio))
    assert float(stats["kl"][0]) == pytest.approx(expected_kl, abs=1e-6)


def test_student_sample_stats_without_teacher() -> None:
    stats = student_sample_stats(CLS, DIST, STUDENT_LABELS, None)
    assert set(stats) == {"top1_cls", "top1_dist", "top1_fused", "top5_fused"}
    for key in ("teacher_top1", "agreement", "kl"):
        assert key not in stats
    assert stats["top1_fused"].tolist() == [1.0, 1.0]


def test_classifier_sample_stats() -> None:
    stats = classifier_sample_stats(LOGITS, LABELS)
    assert set(stats) == {"top1", "top5"}
    assert stats["top1"].tolist() == [0.0, 1.0, 0.0]
    assert stats["top5"].tolist() == [1.0, 1.0, 1.0]
