"""train_one_epoch and evaluate (and the teacher's and student's val passes): the loops, no
parsing and no file formats.

Randomness inside a step (drop-path, mixup) is re-seeded from (seed, epoch, step, rank) at every
micro-step rather than carried in RNG history, so a resumed run replays exactly what an
uninterrupted run would have done (measured: a resume that restores the RNG history alone
diverges from the first resumed batch when drop-path is on).
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from distill.data.stream import skip_batches
from distill.errors import DistillError, TrainingError
from distill.models.metrics import classifier_sample_stats, student_sample_stats
from distill.models.student import student_heads
from distill.run.checkpoint import TrainingState
from distill.training.losses import LossParts


class Preempted(DistillError):
    """SIGTERM or Ctrl-C: every process saved the checkpoint and stopped together."""

    exit_code = 143


class _StopFlag:
    """Set by SIGTERM/SIGINT; acted on at the next collective flush (every run.log_every_steps
    optimizer steps), so all processes checkpoint and stop on the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def request(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for a checkpoint
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def install(self) -> None:
        self.requested, self.signal_name = False, ""
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)


STOP = _StopFlag()


def set_step_seed(seed: int, epoch: int, step: int, rank: int, data_seed: int | None = None) -> None:
    """Seed the RNGs for one micro-step as a function of position: torch (drop-path, the model's
    randomness) from ``seed``; numpy and python (timm's Mixup/CutMix draws, part of the data
    stream) from ``data_seed`` (default ``seed``)."""

    def derive(base: int) -> int:
        return int(np.random.SeedSequence([base, epoch, step, rank, 7]).generate_state(1)[0])

    s = derive(seed)
    d = s if data_seed is None or data_seed == seed else derive(data_seed)
    random.seed(d)
    np.random.seed(d)
    # Not torch.manual_seed: it also walks every accelerator backend's generators, 0.4 ms a step
    # on CPU (python -m distill.bench), 5% of a smoke-sized step.
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)


class LossMeter:
    """Loss sums kept on the device; reduced across processes only when flushed (no per-step
    host synchronisation)."""

    KEYS = ("loss", "loss_ce", "loss_kd")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # KEYS sums x n, then n, then "a loss was non-finite", then "stop requested" (signals).
        self.sums = torch.zeros(len(self.KEYS) + 3, device=self.device, dtype=torch.float64)

    def add(self, parts: LossParts, n: int) -> None:
        vals = torch.stack([parts.total.detach(), parts.ce.detach(), parts.kd.detach()]).double()
        finite = torch.isfinite(vals).all()
        vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
        k = len(self.KEYS)  # in place, n as a kernel argument: no tensor built from host data per step
        self.sums[:k] += vals * n
        self.sums[k] += n
        self.sums[k + 1] += (~finite).double()

    def flush(self, accelerator: Accelerator) -> tuple[dict[str, float], int, bool, bool]:
        """Collective: (global sums, global image count, any non-finite loss on any rank, a stop
        signal on any rank). Deciding together keeps every rank on the same step."""
        self.sums[-1] = float(STOP.requested)
        total = accelerator.reduce(self.sums, reduction="sum").tolist()
        self.reset()
        sums = dict(zip(self.KEYS, total[: len(self.KEYS)], strict=True))
        return sums, int(total[len(self.KEYS)]), total[-2] > 0, total[-1] > 0


@dataclass(frozen=True)
class Trainee:
    """What one epoch trains: the prepared model, its loader, optimizer, schedule and EMA."""

    model: torch.nn.Module
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any = None  # timm ModelEmaV3, updated after every optimizer step


@dataclass(frozen=True)
class EpochOptions:
    """How an epoch runs: seeds, the logging and checkpoint intervals (in optimizer steps), clipping."""

    seed: int  # the model's randomness (drop-path) at each micro-step
    log_every: int  # flush the loss sums (a collective) every this many optimizer steps
    clip_grad: float | None = None
    data_seed: int | None = None  # mixup/cutmix draws; None: ``seed``
    checkpoint_every: int = 0  # 0: no checkpoint inside the epoch


@dataclass(frozen=True)
class EpochHooks:
    """What the caller is told during an epoch."""

    on_log: Callable[[dict[str, float]], None]  # train/* means, lr and speed at each flush
    on_checkpoint: Callable[[], None] | None = None  # save a checkpoint of the current state
    report: Any = None  # progress.ProgressReport: told of every optimizer step


class _Flusher:
    """The collective flush of one epoch's loss sums into the saved state and the log."""

    def __init__(self, accelerator: Accelerator, state: TrainingState, optimizer: Any, on_log: Any) -> None:
        self.accelerator, self.state, self.optimizer, self.on_log = accelerator, state, optimizer, on_log
        self.meter = LossMeter(accelerator.device)
        self.start, self.images = time.perf_counter(), 0  # this interval's, on this process

    def add(self, parts: LossParts, n: int) -> None:
        self.meter.add(parts, n)
        self.images += n

    def __call__(self, epoch: int) -> bool:
        """Collective: fold the interval into the state, log it; True when a stop was requested."""
        acc, state = self.accelerator, self.state
        sums, n, nonfinite, stop = self.meter.flush(acc)
        if nonfinite:
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {state.global_step} on at least one "
                "process; every process stops here. Lower train.lr, set train.clip_grad, or use "
                "train.precision=bf16 instead of fp16"
            )
        for k, v in sums.items():
            state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v
        state.epoch_sums["n"] = state.epoch_sums.get("n", 0.0) + n
        elapsed = time.perf_counter() - self.start
        images = self.images * acc.num_processes
        state.train_time += elapsed
        state.train_images += images
        if n:
            self.on_log(
                {
                    **{f"train/{k}": v / n for k, v in sums.items()},
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "throughput/train_img_s": images / max(elapsed, 1e-9),
                }
            )
        self.start, self.images = time.perf_counter(), 0
        return stop


def _epoch_batches(accelerator: Accelerator, loader: Any, epoch: int, skip: int) -> Any:
    """The epoch's batches, after the ``skip`` a resumed run already trained on."""
    loader.set_epoch(epoch)  # reaches our EpochSampler (order)...
    # ...but Accelerate forwards set_epoch to the dataset only when the sampler is not wrapped
    # for sharding (data_loader.py: an `elif`), i.e. never with 2+ processes; the PIL path's
    # augmentation seed lives in the dataset, so set it here (the tensor path's dataset has
    # no epoch: its views are drawn in the step).
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    return skip_batches(accelerator, loader, skip) if skip else loader


def train_one_epoch(
    accelerator: Accelerator,
    trainee: Trainee,
    step: Callable[[torch.nn.Module, dict[str, Any], int, int], LossParts],
    state: TrainingState,
    epoch: int,
    options: EpochOptions,
    hooks: EpochHooks,
) -> dict[str, float]:
    """One epoch (or its remainder after a resume) of minimising ``step(model, batch, epoch,
    micro_step)`` (step.Step). At its end ``state`` counts the epoch as done; returns the
    epoch's global loss sums (``loss``, ``loss_ce``, ``loss_kd`` times images, and ``n``)."""
    model, loader = trainee.model, trainee.loader
    model.train()
    flush = _Flusher(accelerator, state, trainee.optimizer, hooks.on_log)
    rank = accelerator.process_index
    for batch in _epoch_batches(accelerator, loader, epoch, state.step_in_epoch):
        set_step_seed(options.seed, epoch, state.step_in_epoch, rank, options.data_seed)
        with accelerator.accumulate(model):
            parts = step(model, batch, epoch, state.step_in_epoch)
            accelerator.backward(parts.total)
            if accelerator.sync_gradients and options.clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), options.clip_grad)
            trainee.optimizer.step()
            trainee.optimizer.zero_grad(set_to_none=True)
        flush.add(parts, batch["label"].shape[0])
        state.step_in_epoch += 1
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        trainee.scheduler.step_update(num_updates=state.global_step)
        if trainee.ema is not None:
            trainee.ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state.global_step)
        if hooks.report is not None:
            hooks.report.step()  # the bar, or a line at its interval
        # Not on an epoch's last step: the end-of-epoch checkpoint follows at the same step, after
        # the evaluation is logged. A mid-loop one there would let a kill between the two resume
        # at that step with the evaluation already in TensorBoard, which the resume's purge (it
        # drops events after the checkpoint's step) keeps: duplicate val/* points (found by
        # scripts/fault_trials.py).
        last_step = state.step_in_epoch == len(loader)
        every = options.checkpoint_every
        due_checkpoint = every > 0 and state.global_step % every == 0 and not last_step
        stop = flush(epoch) if due_checkpoint or state.global_step % options.log_every == 0 else False
        if (due_checkpoint or stop) and hooks.on_checkpoint is not None:
            hooks.on_checkpoint()  # after the flush: a NaN state is never checkpointed
        if stop:
            raise Preempted(
                f"stopped by {STOP.signal_name} at epoch {epoch + 1}, step {state.global_step}"
                + ("; a checkpoint was saved: run the same command to resume" if hooks.on_checkpoint else "")
            )
    if flush(epoch):
        if hooks.on_checkpoint is not None:
            hooks.on_checkpoint()
        raise Preempted(f"stopped by {STOP.signal_name} at the end of epoch {epoch + 1}")
    sums, state.epoch_sums = state.epoch_sums, {}
    state.epoch, state.step_in_epoch = epoch + 1, 0
    return sums


# Per-image values that evaluate() gathers whole instead of averaging (predictions.npz).
PER_IMAGE = ("index", "label", "pred_fused")


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    loader: Any,
    forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    per_image: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean of per-sample statistics over the whole split, each sample counted once.

    ``forward(batch)`` returns per-sample statistic tensors; ``gather_for_metrics`` drops the
    samples that even-batch padding repeats on the last batch. Its PER_IMAGE entries are not
    averaged: with ``per_image`` given they are gathered into it, every process's images
    sorted by index, so one and several processes give the same arrays.
    """
    device_sums: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {}
    count = 0
    for batch in loader:
        with accelerator.autocast():
            stats = forward(batch)
        gathered = accelerator.gather_for_metrics(stats)
        for k, v in gathered.items():  # summed on the device; read back once at the end
            if k in PER_IMAGE:
                kept.setdefault(k, []).append(v.cpu())
            else:
                device_sums[k] = device_sums.get(k, 0) + v.double().sum()
        count += int(next(iter(gathered.values())).shape[0])
    if per_image is not None and kept:
        columns = {k: torch.cat(v).to(torch.int64).numpy() for k, v in kept.items()}
        order = np.argsort(columns["index"], kind="stable")
        per_image.update({k: v[order] for k, v in columns.items()})
    sums = {k: float(v) for k, v in device_sums.items()}
    if count == 0:
        return {k: math.nan for k in sums}
    return {k: v / count for k, v in sums.items()}


def evaluate_teacher(accelerator: Accelerator, teacher: Any, loader: Any) -> tuple[dict[str, float], torch.Tensor]:
    """One teacher pass over the val split: its top-1 and top-5, and its fp32 logits as rows by
    image index (this process's share filled), kept on the device for every epoch's agreement
    and KL (the val transform is deterministic, so they never change)."""
    by_index: list[torch.Tensor] = []  # [val images, classes] on the device once the first batch is in

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = teacher(batch["image"])
        if not by_index:
            by_index.append(logits.new_zeros(len(loader.dataset), logits.shape[-1], dtype=torch.float32))
        by_index[0][batch["index"]] = logits.float()  # a scatter on the device, no per-image Python
        return classifier_sample_stats(logits, batch["label"])

    stats = evaluate(accelerator, loader, forward)
    return stats, by_index[0] if by_index else torch.zeros(0, 0, device=accelerator.device)


def evaluate_student(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: Any,
    teacher_logits: torch.Tensor | None,
    per_image: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Per-head accuracy, and agreement/KL with the teacher's stored val logits when given;
    ``per_image`` receives each image's index, label and fused-head argmax."""
    model.eval()

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cls, dist = student_heads(model, batch["image"])
        t = None
        if teacher_logits is not None:
            t = teacher_logits[batch["index"]]  # rows by image index, gathered on the device
        stats = student_sample_stats(cls.float(), dist.float(), batch["label"], t)
        if per_image is None:
            return stats
        fused = (cls.float() + dist.float()) / 2
        return {**stats, "index": batch["index"], "label": batch["label"], "pred_fused": fused.argmax(-1)}

    return evaluate(accelerator, loader, forward, per_image)
