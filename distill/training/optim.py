"""Optimizer, LR schedule and batch arithmetic, shared by the student run and the teacher stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distill.errors import RecipeError
from distill.recipe.schema import OptimConfig

DEIT_LR_BATCH = 512  # DeiT: lr = base_lr x global_batch / 512


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits over processes and accumulation steps."""

    global_batch: int
    processes: int
    accum_steps: int

    @property
    def per_process(self) -> int:
        return self.global_batch // (self.processes * self.accum_steps)


def batch_plan(cfg: OptimConfig, processes: int, where: str) -> BatchPlan:
    parts = processes * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise RecipeError(
            f"{where}.batch_size {cfg.batch_size} (the global batch) is not divisible by "
            f"processes x {where}.grad_accum_steps = {processes} x {cfg.grad_accum_steps}; "
            f"use a multiple of {parts}"
        )
    return BatchPlan(cfg.batch_size, processes, cfg.grad_accum_steps)


def effective_lr(cfg: OptimConfig) -> float:
    return cfg.lr * cfg.batch_size / DEIT_LR_BATCH if cfg.lr_scale_batch else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Any:
    """timm's optimizer factory: no weight decay on biases, norms and ``no_weight_decay()``
    parameters (cls/dist tokens, position embedding). Call it on the unwrapped model."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {}
    if cfg.opt == "sgd":
        kwargs["momentum"] = cfg.momentum
    if cfg.fused and cfg.opt in ("adam", "adamw"):
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt=cfg.opt, lr=effective_lr(cfg), weight_decay=cfg.weight_decay, **kwargs)


def build_scheduler(optimizer: Any, cfg: OptimConfig, steps_per_epoch: int) -> Any:
    """Warmup + decay stepped per optimizer update with ``step_update(global_step)``.

    timm schedulers are pure functions of the update count, so resuming needs no state, and they
    are kept out of ``accelerator.prepare`` (a prepared scheduler steps once per process).
    """
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    scheduler.step_update(0)
    return scheduler
