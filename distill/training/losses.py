"""Distillation losses as pure tensor functions that return their named parts.

DeiT (Touvron et al. 2021, Eq. 2-3 and facebookresearch/deit losses.py):
    total = (1 - alpha) * CE(cls head, labels) + alpha * KD(dist head, teacher)
soft KD = tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)),
hard KD = CE(student, argmax teacher). Label smoothing and mixup act on the labels only; the
teacher's targets are never smoothed (DeiT paper section 4; deit issue #56).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

DistillType = Literal["none", "soft", "hard"]
KLNorm = Literal["batchmean", "deit"]


class LossParts(NamedTuple):
    total: torch.Tensor  # what is back-propagated
    ce: torch.Tensor  # label term(s), unweighted
    kd: torch.Tensor  # teacher term, unweighted (0 when there is none)


def label_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE against integer labels (smoothed) or dense mixup targets (smoothing already folded in)."""
    if targets.ndim == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def soft_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, kl_norm: KLNorm = "batchmean"
) -> torch.Tensor:
    """tau^2 * KL(teacher || student) at temperature tau.

    ``batchmean`` divides the summed KL by the batch size (the textbook per-sample KL, timm's
    TokenDistillationTask); ``deit`` by batch x classes as DeiT's code does "to have the legacy
    PyTorch behavior" (deit issue #61), which makes the term C times smaller.
    """
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    summed = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denom = student_logits.numel() if kl_norm == "deit" else student_logits.shape[0]
    return summed * (tau * tau) / denom


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE against the teacher's argmax (no smoothing of the teacher's label)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


@dataclass(frozen=True)
class DistillSettings:
    """What shapes the distillation loss (the recipe's distillation section, and the label
    smoothing of train.label_smoothing)."""

    kind: DistillType
    alpha: float  # weight of the teacher term
    tau: float = 1.0  # soft only
    kl_norm: KLNorm = "batchmean"  # soft only
    label_smoothing: float = 0.0  # the label terms only


def distillation_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    settings: DistillSettings,
) -> LossParts:
    """DeiT's combined loss: the class head learns the labels, the dist head the teacher.

    With ``none`` both heads learn the labels (mean of the two CEs), so the fused head means
    something and DDP never meets an unused parameter (head_dist would get no gradient).
    """
    s = settings
    ce_cls = label_ce(cls_logits, targets, s.label_smoothing)
    if s.kind == "none":
        ce = 0.5 * (ce_cls + label_ce(dist_logits, targets, s.label_smoothing))
        return LossParts(ce, ce, torch.zeros_like(ce))
    if teacher_logits is None:
        raise ValueError(f"distillation type '{s.kind}' needs teacher logits")
    if s.kind == "soft":
        kd = soft_kd(dist_logits, teacher_logits, s.tau, s.kl_norm)
    elif s.kind == "hard":
        kd = hard_kd(dist_logits, teacher_logits)
    else:
        raise ValueError(f"unknown distillation type '{s.kind}'")
    return LossParts((1.0 - s.alpha) * ce_cls + s.alpha * kd, ce_cls, kd)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> LossParts:
    """Plain CE, as the teacher stage trains the CNN teacher."""
    ce = label_ce(logits, targets, label_smoothing)
    return LossParts(ce, ce, torch.zeros_like(ce))
