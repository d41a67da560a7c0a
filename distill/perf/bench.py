"""Benchmark the distillation training step against timm's TokenDistillationTask.

    python -m distill.bench RECIPE.yaml [dotted.key=value ...] [--warmup 3 --steps 10 --repeats 5]
    python -m distill.bench --student deit_tiny_distilled_patch16_224 --teacher resnet50 \\
        --img-size 32 --patch-size 4 --num-classes 10 --batch-size 64 [--json PATH]

What is measured, each on the same random batch already on the device (data loading, decoding and
augmentation, mixup/cutmix included, are excluded, so that the figures describe the step alone),
except ``ours_recipe_data``:

* ours, with the teacher: the trainer's own ``distill.step.Step`` (the object ``DistillRun`` and the
  teacher stage train with: ``ConvnetTeacher`` forward under autocast, student forward,
  ``distillation_loss``), then backward + optimizer step + ``zero_grad`` as
  ``engine.train_one_epoch`` runs them (``build_optimizer``, the student's forward wrapped in
  autocast and cast back to fp32 exactly as ``Accelerator.prepare`` wraps it, the per-step
  ``set_step_seed`` and on-device ``LossMeter.add``). Accelerate itself is left out: its state
  is one mixed precision per process, which would make it impossible to alternate fp32 and bf16
  steps in one process; what it adds per step on one process (the accumulate context, the
  optimizer wrapper) is bookkeeping in microseconds;
* with a recipe, ``ours_recipe_data``: the same step at the recipe's settings on a real training
  batch of the recipe's input pipeline, through ``InputPipeline.prepare`` at every step (the tensor
  path's crop and flip on the device, mixup/cutmix), as training runs it;
* ours, without the teacher (distillation ``none``: both heads learn the labels), the teacher's
  cost being the difference;
* evaluation: the student's forward in eval mode under ``torch.no_grad`` (as engine.evaluate);
* the reference: ``timm.task.TokenDistillationTask`` with copies of the same student and teacher
  (same weights, architecture, batch, loss type, alpha, tau, label smoothing), timm's optimizer
  factory ``create_optimizer_v2`` (same optimizer type, lr and weight decay, timm's default
  implementation, i.e. not fused), fp32: ``task(input, target)['loss'].backward()``, step,
  ``zero_grad``, as timm's train.py does.

Two ratios of median throughputs are printed:

* **identical settings**: ours at the reference's settings (fp32, the same non-fused optimizer
  implementation, no compile, the teacher under ``torch.no_grad`` in the default memory format,
  as timm's DistillationTeacher runs it) against the reference: the same arithmetic, so the
  ratio isolates the cost of our code around it;
* **fast path**: ours with its fast path (bf16 autocast when it is faster than fp32 on this
  device, see ``--fast-precision``; fused AdamW; teacher inference_mode + channels-last; compile
  only with ``--compile``) against the reference at its defaults (fp32).

Method: every configuration has its own copy of the models and its own optimizer. Each
repetition runs every configuration once, in turn (ours, reference, ours, ...): machine drift
(other jobs, thermal or frequency changes) then lands on all of them alike instead of on
whichever ran last. Each run starts with ``--warmup`` untimed steps (allocator warm-up, oneDNN or
cuDNN kernel selection, compilation, caches refilled after the other configurations ran), then
``--steps`` timed steps between device synchronisations (``torch.cuda.synchronize`` on a GPU; CPU
kernels are synchronous) with ``time.perf_counter``. The median over ``--repeats`` is reported with
its min-max spread; ratios are ratios of medians.

FLOPs of one step are counted once, outside the timing, with ``torch.utils.flop_counter``
(matrix products, convolutions and attention; elementwise work and the optimizer are not
FLOPs in its sense); achieved FLOP/s = FLOPs x steps/s, and the fraction is of a matrix-product
peak measured here and now with ``torch.mm`` on square matrices in the same dtype, so it says
how much of what this device can actually do the step uses. The peak is measured before the
configurations and again in every repetition, and the best measurement is used: other load only
ever lowers it (a peak measured once, while another job ran, made steps look faster than 100%).

Every configuration first runs one untimed priming step (optimizer state, compilation, first-call
allocations), so that no repetition pays for them, even with ``--warmup 0``.

Peak memory is the steady-state memory of a step (activations, gradients, workspace), the
weights and the optimizer state (reported apart, from its tensors) excluded: on a GPU
``torch.cuda.max_memory_allocated`` above what was allocated before the timed run; on a CPU the
growth of the process's resident-set high-water mark (VmHWM, reset through
``/proc/self/clear_refs`` before each timed run) above its resident set then. A CPU allocator
keeps freed memory for reuse, so the CPU figure is indicative.
"""

from __future__ import annotations

import copy
import datetime
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from distill.errors import LaunchError, RecipeError
from distill.recipe.schema import Recipe

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DATA_NOTE = "inputs are random tensors already on the device: data loading and augmentation are excluded"
REFERENCE = "timm TokenDistillationTask"
TEACHER_LEGEND = "teacher: IM torch.inference_mode, NG torch.no_grad, CL channels-last input and weights, C compiled"
# Square matrix side for the matmul peak: big enough to saturate the device, small enough to
# time many products in ~1 s (2 CPU cores: ~0.2 s per 2048^3 fp32 product).
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


# ---------------------------------------------------------------------------------------------
# Settings and configurations


@dataclass(frozen=True)
class Settings:
    """The switches that change how our step runs (not what it computes)."""

    precision: Precision = "fp32"
    fused: bool = False  # fused Adam(W) kernel (train.fused)
    compile: bool = False  # torch.compile the student (train.compile)
    teacher_inference_mode: bool = True
    teacher_channels_last: bool = True
    teacher_compile: bool = False
    attention: str = "fused"  # train.attention: the student's attention kernel

    @classmethod
    def of_recipe(cls, recipe: Recipe) -> Settings:
        t = recipe.teacher
        return cls(
            recipe.train.precision,
            recipe.train.fused,
            recipe.train.compile,
            t.inference_mode,
            t.channels_last,
            t.compile,
            recipe.train.attention,
        )

    def teacher_text(self) -> str:
        """Short form for the table; TEACHER_LEGEND spells it out."""
        text = "IM" if self.teacher_inference_mode else "NG"
        return text + ("+CL" if self.teacher_channels_last else "") + ("+C" if self.teacher_compile else "")


@dataclass
class Measured:
    """One configuration's figures."""

    key: str
    label: str
    implementation: str  # "distill" or REFERENCE
    kind: Literal["train", "eval"]
    distillation: str  # hard | soft | none (train), "-" (eval)
    precision: str
    optimizer: str
    teacher: str
    compile: bool
    batch_size: int
    seconds: list[float] = field(default_factory=list)  # per repetition, for `steps` steps
    peak_memory_mb: float = 0.0  # steady state: activations, gradients, workspace
    optimizer_state_mb: float | None = None  # persistent, outside peak_memory_mb
    flops_per_step: int = 0
    last_loss: float | None = None


def _stats(values: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "iqr": q[2] - q[0],
        "values": values,
    }


# ---------------------------------------------------------------------------------------------
# Device helpers


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels: GPU timing is otherwise the time to enqueue, not to run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """What ``Accelerator.autocast()`` returns for train.precision (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def bf16_available(device: torch.device) -> bool:
    """Whether bf16 autocast runs at all here (on a CPU it may run emulated, hence slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    caps = torch.cpu.get_capabilities()
    native = [k for k in ("avx512_bf16", "amx_bf16", "amx_tile") if caps.get(k)]
    return f"{caps.get('cpu_name', 'cpu')} ({caps.get('num_physical_cores', '?')} cores; native bf16: {native or 'no'})"


class PeakMemory:
    """Peak memory a configuration adds above the level at ``start()`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.base = device, 0
        self.resettable = False
        if device.type == "cuda":
            self.label = "CUDA max_memory_allocated above the allocation before each timed run"
            return
        try:  # Linux: writing 5 resets the high-water mark (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
            self.label = "CPU: growth of the process's peak resident set (VmHWM, reset before each timed run)"
        except OSError:
            self.label = "CPU: growth of the process's lifetime peak RSS (ru_maxrss; 0 once an earlier run peaked)"

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.resettable:
            peak = self._status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base) / 2**20


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Measured dense matrix-product rate: ``torch.mm`` of two size x size matrices, timed by
    torch.utils.benchmark (it synchronises CUDA and repeats the product for ``seconds``)."""
    from torch.utils.benchmark import Timer

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults on the output
        torch.mm(a, b)
    synchronize(device)
    # num_threads: Timer runs with ONE thread unless told otherwise.
    timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=seconds)
    return 2 * size**3 / measurement.median / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode``.

    torch counts the CUDA attention kernels but not the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``) that timm's ViT calls on a CPU; the
    same formulas are mapped onto it so CPU and GPU counts agree.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def sdpa_backward(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(g, q, k, v)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The steps


@dataclass
class Problem:
    """What every configuration computes: models (random weights), batch and loss settings."""

    recipe: Recipe
    student: nn.Module  # fp32, train mode, distilled training on; copied per configuration
    teacher: nn.Module  # the bare timm teacher; copied per configuration
    student_mean: tuple[float, ...]
    student_std: tuple[float, ...]
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    images: torch.Tensor
    labels: torch.Tensor
    kd: Literal["hard", "soft"]
    device: torch.device

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.student.head.out_features)

    def teacher_spec(self) -> Any:
        """The teacher's input: the student's size, its own normalisation (as the trainer's)."""
        from distill.models.spec import InputSpec

        size = (int(self.images.shape[-2]), int(self.images.shape[-1]))
        return InputSpec(size, self.teacher_mean, self.teacher_std, 1.0, "bicubic")  # type: ignore[arg-type]


def _optimizer_text(opt: str, fused: bool, device: torch.device) -> str:
    if fused and opt in ("adam", "adamw"):
        return f"{opt} fused"
    if opt not in ("adam", "adamw", "sgd"):
        return opt
    return f"{opt} {'foreach' if device.type == 'cuda' else 'for-loop'}"  # torch's default implementation there


class OursStep:
    """The trainer's own step object (``distill.step.Step``) with the engine's update around it.

    ``prepare`` and ``batch``: by default the fixed float batch as it is (``as_prepared``); with
    the recipe's input pipeline (``ours_recipe`` in recipe mode), a real training batch through
    ``InputPipeline.prepare`` every step: the tensor path's crop and flip and mixup/cutmix, as
    training runs them."""

    def __init__(
        self,
        problem: Problem,
        settings: Settings,
        distillation: str,
        teacher: Any,
        pipeline: Any = None,
        batch: dict[str, Any] | None = None,
    ) -> None:
        from accelerate.utils import convert_outputs_to_fp32

        from distill.models.student import set_attention
        from distill.training.engine import LossMeter
        from distill.training.optim import build_optimizer
        from distill.training.step import Step, as_prepared

        p, r = problem, problem.recipe
        self.problem, self.settings, self.distillation, self.teacher = p, settings, distillation, teacher
        self.model = copy.deepcopy(p.student).to(p.device).train()
        set_attention(self.model, settings.attention)  # as the trainer sets train.attention
        if settings.precision != "fp32":
            # Accelerator.prepare_model: forward under autocast, outputs cast back to fp32, so the
            # loss runs in fp32 (accelerate/accelerator.py, native_amp branch).
            wrapped = torch.autocast(device_type=p.device.type, dtype=DTYPES[settings.precision])(self.model.forward)
            self.model.forward = convert_outputs_to_fp32(wrapped)
        # Accelerate compiles the prepared (already autocast-wrapped) module; so do we.
        self.forward: Any = torch.compile(self.model) if settings.compile else self.model
        self.optimizer = build_optimizer(self.model, r.train.model_copy(update={"fused": settings.fused}))
        # fp16 needs loss scaling; Accelerate uses a GradScaler for it too.
        self.scaler = torch.amp.GradScaler(p.device.type) if settings.precision == "fp16" else None
        self.meter = LossMeter(p.device)
        self.step_index = 0
        self.batch = batch if batch is not None else {"image": p.images, "label": p.labels}
        self.step = Step(
            pipeline.prepare if pipeline is not None else as_prepared,
            label_smoothing=r.train.label_smoothing,
            distillation=r.distillation.model_copy(update={"type": distillation}),
            teacher=teacher,
        )

    def loss(self, forward: Any = None) -> Any:
        return self.step(forward or self.forward, self.batch, 0, self.step_index)

    def __call__(self) -> torch.Tensor:
        from distill.training.engine import set_step_seed

        p = self.problem
        set_step_seed(p.recipe.run.seed, 0, self.step_index, 0)  # engine: re-seeded every micro-step
        self.step_index += 1
        parts = self.loss()
        if self.scaler is not None:
            self.scaler.scale(parts.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            parts.total.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add(parts, p.batch_size)  # on-device sums, no host sync (engine.LossMeter)
        return parts.total.detach()

    def flops(self) -> int:
        """Forward + backward (+ the teacher's forward) of one step, on the eager model."""

        def once() -> None:
            self.loss(self.model).total.backward()
            self.optimizer.zero_grad(set_to_none=True)

        # The counter cannot see into compiled code: count a compiled teacher's eager module.
        module = getattr(self.teacher, "module", None)
        compiled = getattr(module, "forward_model", None)
        if compiled is not None:
            module.forward_model = module.model  # type: ignore[union-attr]
        try:
            return count_flops(once)
        finally:
            if compiled is not None:
                module.forward_model = compiled  # type: ignore[union-attr]


class EvalStep:
    """The student's evaluation forward, as DistillRun._evaluate runs it (no_grad + autocast)."""

    def __init__(self, problem: Problem, precision: str) -> None:
        self.problem, self.precision = problem, precision
        self.model = copy.deepcopy(problem.student).to(problem.device).eval()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        from distill.models.student import student_heads

        with autocast(self.precision, self.problem.device):
            cls, dist = student_heads(self.model, self.problem.images)
        return (cls.float() + dist.float()).mean()

    def flops(self) -> int:
        return count_flops(self)


class ReferenceStep:
    """timm's TokenDistillationTask step: task(input, target) -> backward -> step -> zero_grad."""

    def __init__(self, problem: Problem) -> None:
        from timm.optim import create_optimizer_v2
        from timm.task import TokenDistillationTask

        from distill.training.optim import effective_lr

        p, t, d = problem, problem.recipe.train, problem.recipe.distillation
        self.problem = p
        student = copy.deepcopy(p.student).to(p.device)
        self.task = TokenDistillationTask(
            student,
            copy.deepcopy(p.teacher).to(p.device),  # wrapped in timm's DistillationTeacher
            criterion_kwargs={"smoothing": t.label_smoothing},  # timm's label-smoothing CE
            distill_type=p.kd,
            task_loss_weight=1.0 - d.alpha,  # complementary mode: distill weight = alpha
            temperature=d.tau,
            device=p.device,
            verbose=False,
        ).to(p.device)
        self.task.train()
        extra = {"momentum": t.momentum} if t.opt == "sgd" else {}
        self.optimizer = create_optimizer_v2(
            student, opt=t.opt, lr=effective_lr(t), weight_decay=t.weight_decay, **extra
        )

    def loss(self) -> torch.Tensor:
        return self.task(self.problem.images, self.problem.labels)["loss"]

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def flops(self) -> int:
        def once() -> None:
            self.loss().backward()
            self.optimizer.zero_grad(set_to_none=True)

        return count_flops(once)


# ---------------------------------------------------------------------------------------------
# Set-up


def num_classes_of(recipe: Recipe, given: int | None) -> int:
    """Classes without loading the data: --num-classes, else what the recipe's source implies."""
    if given is not None:
        return given
    if recipe.data.source == "digits":
        return 10
    if recipe.data.source == "synthetic":
        return recipe.data.synthetic.num_classes
    raise RecipeError(
        f"data.source={recipe.data.source}: pass --num-classes N (the bench does not load the data to count them)"
    )


def check_recipe(recipe: Recipe) -> None:
    if not recipe.distillation.token:
        raise RecipeError(
            "the bench compares against timm's TokenDistillationTask, which needs a distillation token; "
            "set distillation.token=true"
        )


def build_problem(recipe: Recipe, num_classes: int, kd: str, device: torch.device) -> Problem:
    from distill.data.sources import seeded
    from distill.models.student import build_student, student_input_spec
    from distill.models.teacher import build_teacher_model, teacher_normalisation
    from distill.training.optim import batch_plan

    check_recipe(recipe)
    with seeded(recipe.run.seed):  # random weights: speed does not depend on them
        student = build_student(recipe.student, num_classes)
        teacher = build_teacher_model(recipe.teacher.model, num_classes, dict(recipe.teacher.model_args))
    student.set_distilled_training(True)  # forward returns (cls, dist) while training
    student.train()
    spec = student_input_spec(recipe)
    t_mean, t_std = teacher_normalisation(recipe.teacher, teacher)
    # One process: the micro-batch of one optimizer step (accumulation is not benchmarked).
    batch = batch_plan(recipe.train, 1, "train").per_process
    h, w = spec.size
    gen = torch.Generator().manual_seed(recipe.run.seed)
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return Problem(
        recipe,
        student,
        teacher,
        spec.mean,
        spec.std,
        t_mean,
        t_std,
        images,
        labels,
        kd,  # type: ignore[arg-type]
        device,
    )


def choose_fast_precision(
    requested: str, device: torch.device, peaks: dict[str, float], measure: Callable[[str], float]
) -> tuple[Precision, str]:
    """The fast path's precision and why: bf16 where it runs and its measured matmul peak beats
    fp32's (a CPU without avx512_bf16/AMX emulates bf16, slower than fp32)."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise LaunchError("--fast-precision fp16 needs a GPU; use bf16 or fp32 on this machine")
        return requested, "requested"  # type: ignore[return-value]
    if not bf16_available(device):
        return "fp32", "bf16 is not available on this device"
    peaks.setdefault("bf16", measure("bf16"))
    measured = f"bf16 matmul {peaks['bf16']:.0f} vs fp32 {peaks['fp32']:.0f} GFLOP/s, measured first"
    if peaks["bf16"] > peaks["fp32"]:
        return "bf16", measured
    return "fp32", f"{measured}: bf16 is emulated here, so fp32; force it with --fast-precision bf16"


@dataclass
class Options:
    warmup: int = 3
    steps: int = 10
    repeats: int = 5
    kd: str | None = None  # None: the recipe's type (hard when it is none)
    compile: bool = False
    fast_precision: str = "auto"
    threads: int | None = None
    device: str | None = None
    num_classes: int | None = None
    peak_seconds: float = 1.0
    peak_size: int | None = None
    mode: str = "recipe"  # recipe | models
    loader_batches: int = 20  # recipe mode: batches of the recipe's input pipeline to time (0: skip)
    source: str = "(defaults)"
    argv: list[str] = field(default_factory=list)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def recipe_pipeline(recipe: Recipe) -> Any:
    """The recipe's training input pipeline, as the trainer builds it on one process."""
    from distill.data.pipeline import build_pipeline, data_seed
    from distill.data.sources import load_source
    from distill.models.student import student_input_spec
    from distill.training.optim import batch_plan

    split = load_source(recipe.data)
    plan = batch_plan(recipe.train, 1, "train")
    return build_pipeline(
        recipe.data,
        split,
        student_input_spec(recipe),
        data_seed(recipe),
        per_process_batch=plan.per_process,
        global_batch=plan.global_batch,
        eval_batch=plan.per_process,
        label_smoothing=recipe.train.label_smoothing,
    )


def device_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A loader's batch on ``device`` as Accelerate's prepared loader hands it over (tensors moved,
    the tensor path's host-side index left where it is)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def measure_loading(pipeline: Any, batches: int, device: torch.device) -> dict[str, Any]:
    """The recipe's training input pipeline alone, as the trainer runs it: its loader
    (``data.store`` resolved, ``data.num_workers``) and ``InputPipeline.prepare`` (the tensor
    path's on-device crop and flip, mixup); ``batches`` batches timed after up to 2 warm-up ones
    (worker start-up)."""
    loader = pipeline.train_loader
    available = len(loader)
    warm = min(2, max(available - 1, 0))
    timed = min(batches, available - warm)
    batches_iter = iter(loader)

    def one() -> int:
        images, _ = pipeline.prepare(device_batch(next(batches_iter), device), 0)
        return int(images.shape[0])

    for _ in range(warm):
        one()
    synchronize(device)
    start = time.perf_counter()
    count = sum(one() for _ in range(timed))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "store": pipeline.store,
        "num_workers": loader.num_workers,  # the tensor path loads in-process
        "batch_size": loader.batch_size,
        "batches": timed,
        "img_s": count / seconds if seconds > 0 else math.inf,
    }


@dataclass
class Peaks:
    """Matmul peaks per precision: every measurement kept, the best one used (other load only
    ever lowers a measurement)."""

    device: torch.device
    size: int
    seconds: float
    samples: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, precision: str) -> float:
        if precision not in self.samples:
            _log(f"bench: measuring the {precision} matmul peak ({self.size}x{self.size}, {self.seconds:g} s)")
        value = matmul_peak_gflops(self.device, DTYPES[precision], self.size, self.seconds)
        self.samples.setdefault(precision, []).append(value)
        return value

    def best(self) -> dict[str, float]:
        return {precision: max(values) for precision, values in self.samples.items()}


def _check_options(recipe: Recipe, opts: Options) -> torch.device:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda but torch sees no GPU")
    if min(opts.warmup, opts.steps - 1, opts.repeats - 1) < 0:
        raise RecipeError("--warmup must be >= 0, --steps and --repeats >= 1")
    if recipe.train.precision == "fp16" and device.type != "cuda":
        raise LaunchError("train.precision=fp16 needs a GPU; use train.precision=bf16 or fp32 on this machine")
    check_recipe(recipe)  # before the minute of matmul timing
    return device


def _measured(key: str, label: str, problem: Problem, **kw: Any) -> Measured:
    return Measured(key=key, label=label, batch_size=problem.batch_size, **kw)


def make_teacher(problem: Problem, s: Settings) -> Any:
    """The trainer's teacher object (ConvnetTeacher) for ``s``, under its autocast."""
    from distill.models.teacher import ConvnetTeacher, FrozenTeacher, FrozenTeacherOptions

    options = FrozenTeacherOptions(
        inference_mode=s.teacher_inference_mode, channels_last=s.teacher_channels_last, compile=s.teacher_compile
    )
    module = FrozenTeacher(
        copy.deepcopy(problem.teacher), problem.student_mean, problem.student_std, problem.teacher_mean,
        problem.teacher_std, options,
    ).to(problem.device)  # fmt: skip
    return ConvnetTeacher(
        module, problem.teacher_spec(), problem.recipe.teacher.model, None, False,
        lambda: autocast(s.precision, problem.device),
    )  # fmt: skip


def time_step_precisions(problem: Problem, kd: str, opts: Options, rounds: int = 3) -> dict[str, float]:
    """Median img/s of the recipe's own step (distill.step.Step, fast-path switches) in fp32 and in
    bf16, timed alternately: what decides the fast path's precision, since a fast bf16 matmul
    does not make a small student's step fast (measured: 0.59x fp32 on the quickstart with AMX)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        s = Settings(precision, True, opts.compile, True, True, opts.compile)  # type: ignore[arg-type]
        runs[precision] = OursStep(problem, s, kd, make_teacher(problem, s))
        runs[precision]()  # priming: optimizer state, first-call allocations, compilation
    timed = time_alternated(runs, problem, max(3, opts.steps // 2), rounds)
    return {precision: statistics.median(values) for precision, values in timed.items()}


def time_alternated(
    steps: dict[str, Callable[[], object]], problem: Problem, n: int, rounds: int
) -> dict[str, list[float]]:
    """img/s of each step per round: one warm-up call, then ``n`` calls between device
    synchronisations, the steps taking turns so that machine drift lands on all alike."""
    timed: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            step()  # warm-up after the other steps ran
            synchronize(problem.device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(problem.device)
            timed[key].append(problem.batch_size * n / (time.perf_counter() - start))
    return timed


def _configurations(
    problem: Problem, settings: dict[str, Settings], kd: str, pipeline: Any, opts: Options
) -> list[tuple[Measured, Any]]:
    """Every configuration to time, each with its own copy of the models and optimizer."""
    device, t = problem.device, problem.recipe.train
    teachers: dict[tuple[str, bool, bool, bool], Any] = {}

    def teacher(s: Settings) -> Any:
        """One per switch combination (channels_last converts the weights in place)."""
        key = (s.precision, s.teacher_inference_mode, s.teacher_channels_last, s.teacher_compile)
        if key not in teachers:
            teachers[key] = make_teacher(problem, s)
        return teachers[key]

    def ours(key: str, label: str, s: Settings, distillation: str, with_pipeline: bool = False) -> tuple[Measured, Any]:
        m = _measured(
            key, label, problem, implementation="distill", kind="train", distillation=distillation,
            precision=s.precision, optimizer=_optimizer_text(t.opt, s.fused, device),
            teacher=s.teacher_text() if distillation != "none" else "-", compile=s.compile,
        )  # fmt: skip
        batch = None
        if with_pipeline:
            batch = device_batch(next(iter(pipeline.train_loader)), device)
        step = OursStep(
            problem, s, distillation, teacher(s) if distillation != "none" else None,
            pipeline if with_pipeline else None, batch,
        )  # fmt: skip
        return m, step

    reference = _measured(
        "reference", f"{REFERENCE} (defaults)", problem, implementation=REFERENCE, kind="train",
        distillation=kd, precision="fp32", optimizer=_optimizer_text(t.opt, False, device),
        teacher="NG (timm)", compile=False,
    )  # fmt: skip
    configs = [
        ours("ours_identical", "ours, identical settings", settings["identical"], kd),
        (reference, ReferenceStep(problem)),
        ours("ours_fast", "ours, fast path", settings["fast"], kd),
    ]
    if opts.mode == "recipe" and settings["recipe"] not in (settings["identical"], settings["fast"]):
        configs.append(ours("ours_recipe", "ours, recipe settings", settings["recipe"], kd))
    if pipeline is not None:
        configs.append(
            ours("ours_recipe_data", "ours, recipe settings + its input pipeline", settings["recipe"], kd, True)
        )
    primary = settings["primary"]
    configs.append(ours("ours_no_teacher", "ours, no teacher", primary, "none"))
    evaluation = _measured(
        "ours_eval", "ours, evaluation forward", problem, implementation="distill", kind="eval",
        distillation="-", precision=primary.precision, optimizer="-", teacher="-", compile=False,
    )  # fmt: skip
    configs.append((evaluation, EvalStep(problem, primary.precision)))
    return configs


def _time(configs: list[tuple[Measured, Any]], peaks: Peaks, opts: Options, problem: Problem) -> PeakMemory:
    """FLOPs once, one priming step each, then ``opts.repeats`` alternating timed runs."""
    device = problem.device
    # FLOPs once per configuration, before timing (never on a compiled module: the counter sees
    # eager ops only; precision and fusing do not change the count).
    for m, step in configs:
        m.flops_per_step = step.flops()
    # One priming step each, untimed and unmeasured: optimizer state, compilation and first-call
    # allocations happen here, so every repetition (and --warmup 0) sees the steady state.
    for m, step in configs:
        step()
        m.optimizer_state_mb = _optimizer_state_mb(step)
    synchronize(device)
    memory = PeakMemory(device)
    for rep in range(opts.repeats):
        line = []
        for m, step in configs:
            memory.start()
            for _ in range(opts.warmup):
                step()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(opts.steps):
                out = step()
            synchronize(device)
            m.seconds.append(time.perf_counter() - start)
            m.peak_memory_mb = max(m.peak_memory_mb, memory.peak_mb())
            if m.kind == "train":
                m.last_loss = float(out)  # one host sync, after the timed steps
            line.append(f"{m.key} {problem.batch_size * opts.steps / m.seconds[-1]:.1f}")
        # The peak again, in every repetition: other load only ever lowers it, so the best of
        # its measurements, spread like the configurations' runs, is the estimate.
        for precision in list(peaks.samples):
            peaks.measure(precision)
        _log(f"bench: repetition {rep + 1}/{opts.repeats}: " + ", ".join(line) + " img/s")
    return memory


def _loading(pipeline: Any, opts: Options, device: torch.device, by_key: dict[str, Any], fast: bool) -> Any:
    """The input pipeline alone against the recipe's step: does loading keep up?"""
    if pipeline is None or opts.loader_batches <= 0:
        return None
    _log(f"bench: timing {opts.loader_batches} batches of the recipe's input pipeline")
    loading = measure_loading(pipeline, opts.loader_batches, device)
    step_key = "ours_fast" if fast else ("ours_recipe" if "ours_recipe" in by_key else "ours_identical")
    step_img_s = by_key[step_key]["img_s"]["median"]
    loading.update(
        compared_with=step_key,
        step_img_s=step_img_s,
        ratio_to_step=loading["img_s"] / step_img_s,
        keeps_up=loading["img_s"] >= step_img_s,
    )
    return loading


def run_benchmark(recipe: Recipe, opts: Options) -> dict[str, Any]:
    """Build every configuration, time them alternately, return the figures (JSON-able)."""
    device = _check_options(recipe, opts)
    kd = opts.kd or (recipe.distillation.type if recipe.distillation.type != "none" else "hard")
    num_classes = num_classes_of(recipe, opts.num_classes)
    # Matmul peaks first: the fast path's precision depends on them.
    peaks = Peaks(device, opts.peak_size or PEAK_SIZE.get(device.type, 2048), opts.peak_seconds)
    measured = {"fp32": peaks.measure("fp32")}
    fast_precision, fast_reason = choose_fast_precision(opts.fast_precision, device, measured, peaks.measure)
    problem = build_problem(recipe, num_classes, kd, device)
    step_img_s = None
    if opts.fast_precision == "auto" and bf16_available(device):
        _log("bench: timing the recipe's step in fp32 and bf16 to choose the fast path's precision")
        step_img_s = time_step_precisions(problem, kd, opts)
        faster = "bf16" if step_img_s["bf16"] > step_img_s["fp32"] else "fp32"
        fast_reason = (
            f"the recipe's step: bf16 {step_img_s['bf16']:.0f} vs fp32 {step_img_s['fp32']:.0f} img/s (median of 3, "
            f"alternated), so {faster}; the matmul peak alone says {fast_reason}"
        )
        fast_precision = faster  # type: ignore[assignment]
    fast = Settings(fast_precision, True, opts.compile, True, True, opts.compile)
    settings = {
        "identical": Settings("fp32", fused=False, teacher_inference_mode=False, teacher_channels_last=False),
        "fast": fast,
        "recipe": Settings.of_recipe(recipe),
        "primary": Settings.of_recipe(recipe) if opts.mode == "recipe" else fast,
    }
    for s in settings.values():
        if s.precision not in peaks.samples:
            peaks.measure(s.precision)
    pipeline = recipe_pipeline(recipe) if opts.mode == "recipe" else None
    configs = _configurations(problem, settings, kd, pipeline, opts)
    memory = _time(configs, peaks, opts, problem)
    best = peaks.best()
    rows = [_row(m, opts.steps, best) for m, _ in configs]
    by_key = {r["key"]: r for r in rows}
    loading = _loading(pipeline, opts, device, by_key, settings["recipe"] == fast)  # after: workers take cores
    ratios = {
        "identical_settings": _ratio(by_key["ours_identical"], by_key["reference"]),
        "fast_path": _ratio(by_key["ours_fast"], by_key["reference"]),
    }
    choice = (fast_precision, fast_reason, step_img_s)
    return _result(recipe, opts, problem, settings, kd, choice, peaks, memory, rows) | {
        "ratios": ratios,
        "data_loading": loading,
    }


def _result(
    recipe: Recipe,
    opts: Options,
    problem: Problem,
    settings: dict[str, Settings],
    kd: str,
    fast_choice: tuple[str, str, dict[str, float] | None],
    peaks: Peaks,
    memory: PeakMemory,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    from distill.run.tracking import provenance
    from distill.training.optim import effective_lr

    device, d, t = problem.device, recipe.distillation, recipe.train
    record = provenance(opts.argv, 1, str(device))
    return {
        "tool": "distill.bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {
            "type": device.type,
            "name": device_name(device),
            "threads": torch.get_num_threads(),
            "bf16_available": bf16_available(device),
        },
        "versions": record["packages"],
        "provenance": record,
        # What "ours" runs: the trainer's own step object, not a copy of it.
        "step": "distill.step.Step (the object DistillRun and the teacher stage train with)",
        "settings": {
            "mode": opts.mode,
            "source": opts.source,
            "student": {**recipe.student.model_dump(mode="json"), **student_arch(problem.student)},
            "teacher": {
                "model": recipe.teacher.model,
                "model_args": recipe.teacher.model_args,
                "params": sum(p.numel() for p in problem.teacher.parameters()),
            },
            "num_classes": problem.num_classes,
            "batch_size": problem.batch_size,
            "input_size": list(problem.images.shape[1:]),
            "distillation": {"type": kd, "alpha": d.alpha, "tau": d.tau, "kl_norm": d.kl_norm},
            "label_smoothing": t.label_smoothing,
            "optimizer": {"opt": t.opt, "lr": effective_lr(t), "weight_decay": t.weight_decay},
            "warmup": opts.warmup,
            "steps": opts.steps,
            "repeats": opts.repeats,
            "compile": opts.compile,
            "fast_precision": fast_choice[0],
            "fast_precision_reason": fast_choice[1],
            "fast_precision_step_img_s": fast_choice[2],
            "identical": asdict(settings["identical"]),
            "fast": asdict(settings["fast"]),
            "recipe": asdict(settings["recipe"]),
            "primary": "recipe" if opts.mode == "recipe" else "fast",
            "data": DATA_NOTE,
        },
        "matmul_peak_gflops": peaks.best(),
        "matmul_peak_samples": peaks.samples,  # before the configurations and once per repetition
        "matmul_peak_size": peaks.size,
        "memory": memory.label,
        "configurations": rows,
        "notes": _notes(recipe, opts),
    }


def student_arch(model: nn.Module) -> dict[str, Any]:
    """The built student's actual size (the recipe leaves unset keys at the registry's values)."""
    blocks: Any = model.blocks
    return {
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "embed_dim": int(model.embed_dim),
        "depth": len(blocks),
        "num_heads": int(blocks[0].attn.num_heads),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _optimizer_state_mb(step: Any) -> float | None:
    optimizer = getattr(step, "optimizer", None)
    if optimizer is None:
        return None
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(v.numel() * v.element_size() for v in tensors) / 2**20


def _notes(recipe: Recipe, opts: Options) -> list[str]:
    notes = [
        DATA_NOTE,
        "one process; train.grad_accum_steps is not benchmarked (one optimizer step per micro-batch)",
        "the reference has no mixup in its task (timm mixes in the loader); the bench applies none to either",
        "eval forward is never compiled (the trainer evaluates the unwrapped student)",
    ]
    if recipe.teacher.output_cache.enabled:
        notes.append(
            "teacher.output_cache is not modelled: the teacher runs every step; the no-teacher row bounds a cached run"
        )
    if recipe.distillation.kl_norm != "batchmean" and (opts.kd or recipe.distillation.type) == "soft":
        notes.append("soft KD: the reference normalises the KL by batch (batchmean), ours by the recipe's kl_norm")
    return notes


def _row(m: Measured, steps: int, peaks: dict[str, float]) -> dict[str, Any]:
    img_s = [m.batch_size * steps / s for s in m.seconds]
    step_ms = [1000 * s / steps for s in m.seconds]
    st = _stats(img_s)
    steps_per_s = st["median"] / m.batch_size
    gflops = m.flops_per_step * steps_per_s / 1e9
    row = asdict(m)
    row.pop("seconds")
    row.update(
        {
            "img_s": st,
            "step_ms": _stats(step_ms),
            "gflop_per_step": m.flops_per_step / 1e9,
            "achieved_gflops": gflops,
            "peak_gflops": peaks[m.precision],
            "fraction_of_peak": gflops / peaks[m.precision] if peaks[m.precision] else math.nan,
        }
    )
    return row


def _ratio(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    paired = [a / b for a, b in zip(ours["img_s"]["values"], ref["img_s"]["values"])]
    return {
        "ours": ours["key"],
        "reference": ref["key"],
        "value": ours["img_s"]["median"] / ref["img_s"]["median"],
        "paired_min": min(paired),  # per repetition (adjacent runs): how noisy the ratio is
        "paired_max": max(paired),
    }


# ---------------------------------------------------------------------------------------------
# Report


def format_report(result: dict[str, Any]) -> str:
    s, dev = result["settings"], result["device"]
    st = s["student"]
    v = result["versions"]
    head = [
        f"distill.bench  {result['date']}  torch {v.get('torch')}  timm {v.get('timm')}",
        f"device: {dev['type']} {dev['name']}, {dev['threads']} threads",
        f"student {st['model']} (img {s['input_size'][1]}, patch {st['patch_size']}, embed {st['embed_dim']}, "
        f"depth {st['depth']}, heads {st['num_heads']}, {st['params'] / 1e6:.2f}M params)  teacher "
        f"{s['teacher']['model']} ({s['teacher']['params'] / 1e6:.2f}M)  classes {s['num_classes']}  "
        f"batch {s['batch_size']}  kd {s['distillation']['type']}",
        f"{s['warmup']} warm-up + {s['steps']} timed steps x {s['repeats']} alternating repetitions; {s['data']}",
        "matmul peak (measured): "
        + ", ".join(f"{k} {val:.0f} GFLOP/s" for k, val in result["matmul_peak_gflops"].items())
        + f" (torch.mm {result['matmul_peak_size']}^2, best of {len(result['matmul_peak_samples']['fp32'])})",
        f"fast path precision: {s['fast_precision']} ({s['fast_precision_reason']})",
    ]
    cols = ("configuration", "prec", "optimizer", "teacher", "img/s", "min-max", "step ms", "peak MB", "opt MB")
    cols += ("GFLOP/s", "% peak")
    table = [cols]
    for r in result["configurations"]:
        img = r["img_s"]
        table.append(
            (
                r["label"] + (" [compiled]" if r["compile"] else ""),
                r["precision"],
                r["optimizer"],
                r["teacher"],
                f"{img['median']:.1f}",
                f"{img['min']:.1f}-{img['max']:.1f}",
                f"{r['step_ms']['median']:.1f}",
                _mb(r["peak_memory_mb"]),
                _mb(r["optimizer_state_mb"]),
                f"{r['achieved_gflops']:.1f}",
                f"{100 * r['fraction_of_peak']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    right = set(range(4, len(cols)))
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    ratios = result["ratios"]
    tail = [
        TEACHER_LEGEND,
        f"peak MB: steady-state step memory, {result['memory']}; opt MB: optimizer state",
        "GFLOP/step: "
        + ", ".join(f"{r['key']} {r['gflop_per_step']:.2f}" for r in result["configurations"])
        + " (torch.utils.flop_counter)",
        _ratio_line("identical settings (ours fp32 non-fused vs reference fp32)", ratios["identical_settings"]),
        _ratio_line(
            f"fast path (ours {s['fast_precision']} fused{' compiled' if s['compile'] else ''} vs reference fp32)",
            ratios["fast_path"],
        ),
        *_loading_lines(result.get("data_loading")),
        *[f"note: {n}" for n in result["notes"]],
    ]
    return "\n".join([*head, "", *lines, "", *tail])


def _loading_lines(loading: dict[str, Any] | None) -> list[str]:
    if loading is None:
        return []
    return [
        f"data loading (data.store={loading['store']}, {loading['num_workers']} workers, batch "
        f"{loading['batch_size']}, {loading['batches']} batches, measured alone): {loading['img_s']:.0f} img/s, "
        f"{loading['ratio_to_step']:.1f}x the {loading['compared_with']} step; keeps up: "
        f"{'yes' if loading['keeps_up'] else 'NO'}"
    ]


def _mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _ratio_line(what: str, ratio: dict[str, Any]) -> str:
    return f"ratio, {what}: {ratio['value']:.3f}x (per repetition {ratio['paired_min']:.3f}-{ratio['paired_max']:.3f})"


# ---------------------------------------------------------------------------------------------
# Command line
