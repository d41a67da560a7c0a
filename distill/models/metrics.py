"""Per-sample evaluation statistics: accuracy per head, agreement with the teacher, KL.

Statistics are computed per sample so that ``accelerator.gather_for_metrics`` can drop the
samples a distributed loader repeats to even out the last batch (no duplicated samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per sample, at temperature 1."""
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def student_sample_stats(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Per-sample values whose means are the contract's ``val/*`` metrics.

    The fused head averages the two heads' logits, as timm's VisionTransformerDistilled does at
    inference (DeiT's code; the paper adds softmaxes, which rarely changes the argmax).
    """
    fused = (cls_logits + dist_logits) / 2
    stats = {
        "top1_cls": topk_correct(cls_logits, labels, 1),
        "top1_dist": topk_correct(dist_logits, labels, 1),
        "top1_fused": topk_correct(fused, labels, 1),
        "top5_fused": topk_correct(fused, labels, 5),
    }
    if teacher_logits is not None:
        stats["teacher_top1"] = topk_correct(teacher_logits, labels, 1)
        stats["agreement"] = (fused.argmax(-1) == teacher_logits.argmax(-1)).float()
        stats["kl"] = kl_teacher_student(teacher_logits, fused)
    return stats


def classifier_sample_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"top1": topk_correct(logits, labels, 1), "top5": topk_correct(logits, labels, 5)}
