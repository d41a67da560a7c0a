"""Optimizer groups, LR scaling and schedule, and global-batch arithmetic."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.errors import RecipeError
from distill.models.student import build_student
from distill.recipe.schema import StudentConfig, TrainConfig
from distill.training.optim import batch_plan, build_optimizer, build_scheduler, effective_lr


def tiny_student() -> torch.nn.Module:
    return build_student(StudentConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), 4)


def test_no_weight_decay_on_tokens_position_embedding_biases_and_norms() -> None:
    model = tiny_student()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "dist_token", "pos_embed", "norm.weight", "norm.bias", "head.bias"} <= plain
    assert {"head.weight", "head_dist.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert not any(n.endswith(".bias") or ".norm" in n for n in decayed)
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_deit_lr_scaling() -> None:
    assert effective_lr(TrainConfig(lr=5e-4, batch_size=1024, lr_scale_batch=True)) == pytest.approx(1e-3)
    assert effective_lr(TrainConfig(lr=5e-4, batch_size=1024, lr_scale_batch=False)) == 5e-4


def test_warmup_then_cosine_per_optimizer_step() -> None:
    cfg = TrainConfig(lr=1e-3, lr_scale_batch=False, epochs=10, warmup_epochs=1, warmup_lr=0.0, min_lr=1e-5)
    opt = build_optimizer(tiny_student(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for step in range(101):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.0)
    assert lrs[5] == pytest.approx(5e-4)  # linear warmup over 10 updates
    # timm (and DeiT): the cosine spans all 100 updates; warmup replaces its first 10.
    for t in (10, 50, 77, 100):
        assert lrs[t] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100))), t
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_global_batch_split_over_processes_and_accumulation() -> None:
    plan = batch_plan(TrainConfig(batch_size=64, grad_accum_steps=2), processes=4, where="train")
    assert plan.per_process == 8
    with pytest.raises(
        RecipeError, match=r"train.batch_size 60 .* not divisible by processes x train.grad_accum_steps"
    ):
        batch_plan(TrainConfig(batch_size=60, grad_accum_steps=2), processes=4, where="train")
