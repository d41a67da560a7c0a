"""train_one_epoch and evaluate (and the teacher's and student's val passes): the loops, no
parsing and no file formats.

Randomness inside a step (drop-path, mixup) is re-seeded from (seed, epoch, step, rank) at every
micro-step rather than carried in RNG history, so a resumed run replays exactly what an
uninterrupted run would have done (measured in ecosystem notes: resume with RNG history alone
diverges from the first resumed batch when drop-path is on).
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from distill.data.stream import skip_batches
from distill.errors import DistillError, TrainingError
from distill.models.metrics import student_sample_stats
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


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: Callable[[torch.nn.Module, dict[str, Any], int, int], LossParts],
    progress: TrainingState,
    *,
    epoch: int,
    seed: int,
    log_every: int,
    data_seed: int | None = None,
    clip_grad: float | None,
    on_log: Callable[[dict[str, float]], None],
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[], None] | None = None,
    ema: Any = None,
    report: Any = None,
) -> None:
    """One epoch (or its remainder after a resume) of minimising ``step(model, batch, epoch,
    micro_step)`` (step.Step)."""
    model.train()
    loader.set_epoch(epoch)  # reaches our EpochSampler (order)...
    # ...but Accelerate forwards set_epoch to the dataset only when the sampler is not wrapped
    # for sharding (data_loader.py: an `elif`), i.e. never with 2+ processes; the PIL path's
    # augmentation seed lives in the dataset, so set it ourselves (the tensor path's dataset has
    # no epoch: its views are drawn in the step).
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    batches = loader
    if progress.step_in_epoch:
        batches = skip_batches(accelerator, loader, progress.step_in_epoch)
    meter = LossMeter(accelerator.device)
    rank = accelerator.process_index
    interval_start, interval_images = time.perf_counter(), 0

    def flush() -> bool:
        nonlocal interval_start, interval_images
        sums, n, nonfinite, stop = meter.flush(accelerator)
        if nonfinite:
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {progress.global_step} on at least one "
                "process; every process stops here. Lower train.lr, set train.clip_grad, or use "
                "train.precision=bf16 instead of fp16"
            )
        for k, v in sums.items():
            progress.epoch_sums[k] = progress.epoch_sums.get(k, 0.0) + v
        progress.epoch_sums["n"] = progress.epoch_sums.get("n", 0.0) + n
        elapsed = time.perf_counter() - interval_start
        progress.train_time += elapsed
        progress.train_images += interval_images * accelerator.num_processes
        if n:
            on_log(
                {
                    **{f"train/{k}": v / n for k, v in sums.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "throughput/train_img_s": interval_images * accelerator.num_processes / max(elapsed, 1e-9),
                }
            )
        interval_start, interval_images = time.perf_counter(), 0
        return stop

    for batch in batches:
        set_step_seed(seed, epoch, progress.step_in_epoch, rank, data_seed)
        with accelerator.accumulate(model):
            parts = step(model, batch, epoch, progress.step_in_epoch)
            accelerator.backward(parts.total)
            if accelerator.sync_gradients and clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n = batch["label"].shape[0]
        meter.add(parts, n)
        interval_images += n
        progress.step_in_epoch += 1
        if not accelerator.sync_gradients:
            continue
        progress.global_step += 1
        scheduler.step_update(num_updates=progress.global_step)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=progress.global_step)
        if report is not None:
            report.step()  # progress.ProgressReport: the bar, or a line at its interval
        # Not on an epoch's last step: the end-of-epoch checkpoint follows at the same step, after
        # the evaluation is logged. A mid-loop one there would let a kill between the two resume
        # at that step with the evaluation already in TensorBoard, which the resume's purge (it
        # drops events after the checkpoint's step) keeps: duplicate val/* points (fault_trials).
        last_step = progress.step_in_epoch == len(loader)
        due_checkpoint = checkpoint_every > 0 and progress.global_step % checkpoint_every == 0 and not last_step
        stop = False
        if due_checkpoint or progress.global_step % log_every == 0:
            stop = flush()  # also the collective finite-loss check: a NaN state is never checkpointed
        if (due_checkpoint or stop) and on_checkpoint is not None:
            on_checkpoint()
        if stop:
            raise Preempted(
                f"stopped by {STOP.signal_name} at epoch {epoch + 1}, step {progress.global_step}"
                + ("; a checkpoint was saved: run the same command to resume" if on_checkpoint else "")
            )
    if flush():
        if on_checkpoint is not None:
            on_checkpoint()
        raise Preempted(f"stopped by {STOP.signal_name} at the end of epoch {epoch + 1}")


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    loader: Any,
    forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> dict[str, float]:
    """Mean of per-sample statistics over the whole split, each sample counted once.

    ``forward(batch)`` returns per-sample statistic tensors; ``gather_for_metrics`` drops the
    samples that even-batch padding repeats on the last batch.
    """
    device_sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in loader:
        with accelerator.autocast():
            stats = forward(batch)
        gathered = accelerator.gather_for_metrics(stats)
        for k, v in gathered.items():  # summed on the device; read back once at the end
            device_sums[k] = device_sums.get(k, 0) + v.double().sum()
        count += int(next(iter(gathered.values())).shape[0])
    sums = {k: float(v) for k, v in device_sums.items()}
    if count == 0:
        return {k: math.nan for k in sums}
    return {k: v / count for k, v in sums.items()}


def evaluate_teacher(
    accelerator: Accelerator, teacher: Any, loader: Any, outputs: Any = None
) -> tuple[dict[str, float], torch.Tensor]:
    """One teacher pass over the val split: its accuracy, and its fp32 logits as rows by image
    index (this process's share filled), kept on the device for
    every epoch's agreement and KL (the val transform is deterministic, so they never change).
    ``outputs``: the teacher-output cache, whose val table replays them."""
    by_index: list[torch.Tensor] = []  # [val images, classes] on the device once the first batch is in
    first = [True]
    if outputs is not None:
        outputs.open_val()

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if outputs is not None:
            logits = outputs.val_logits(batch["index"], batch["image"], teacher, first[0])
            first[0] = False
        else:
            logits = teacher(batch["image"])
        if not by_index:
            by_index.append(logits.new_zeros(len(loader.dataset), logits.shape[-1], dtype=torch.float32))
        by_index[0][batch["index"]] = logits.float()  # a scatter on the device, no per-image Python
        return {"top1": (logits.argmax(-1) == batch["label"]).float()}

    stats = evaluate(accelerator, loader, forward)
    return stats, by_index[0] if by_index else torch.zeros(0, 0, device=accelerator.device)


def evaluate_student(
    accelerator: Accelerator, model: torch.nn.Module, loader: Any, teacher_logits: torch.Tensor | None
) -> dict[str, float]:
    """Per-head accuracy, and agreement/KL with the teacher's stored val logits when given."""
    model.eval()

    def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cls, dist = student_heads(model, batch["image"])
        t = None
        if teacher_logits is not None:
            t = teacher_logits[batch["index"]]  # rows by image index, gathered on the device
        return student_sample_stats(cls.float(), dist.float(), batch["label"], t)

    return evaluate(accelerator, loader, forward)
