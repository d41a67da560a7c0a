"""Benchmark the distillation training step against timm's TokenDistillationTask.

    python -m distill.bench RECIPE.yaml [dotted.key=value ...] [--warmup 2 --steps 6 --repeats 3]
    python -m distill.bench --student deit_tiny_distilled_patch16_224 --teacher resnet50 \\
        --img-size 32 --patch-size 4 --num-classes 10 --batch-size 64 [--json PATH]

What is measured, each on the same random batch already on the device (data loading, decoding and
augmentation, mixup/cutmix included, are excluded, so that the figures describe the step alone),
except ``ours_recipe_data``; the steps themselves are described in ``distill.perf.steps``:

* ours, with the teacher: the trainer's own step object with the engine's update (``OursStep``);
* with a recipe, ``ours_recipe_data``: the same step at the recipe's settings on a real training
  batch of the recipe's input pipeline, through ``InputPipeline.prepare`` at every step (the tensor
  path's crop and flip on the device, mixup/cutmix), as training runs it;
* ours, without the teacher (distillation ``none``: both heads learn the labels), the teacher's
  cost being the difference;
* evaluation: the student's forward in eval mode under ``torch.no_grad`` (as engine.evaluate);
* the reference: ``timm.task.TokenDistillationTask`` with copies of the same student and teacher,
  timm's optimizer factory, fp32, as timm's train.py runs it.

Two ratios of median throughputs are printed:

* **identical settings**: ours at the reference's settings (fp32, the same non-fused optimizer
  implementation, fused attention, no compile, the teacher under ``torch.no_grad`` in the default
  memory format, as timm's DistillationTeacher runs it) against the reference: the same
  arithmetic, so the ratio isolates the cost of our code around it;
* **fast path**: ours at the fastest settings found on this device (``distill.perf.fastpath``:
  precision x attention timed on the recipe's step, compiled where that pays back within the
  recipe's steps; fused AdamW; teacher inference_mode + channels-last) against the reference at
  its defaults (fp32).

Method: every configuration has its own copy of the models and its own optimizer. Each
repetition runs every configuration once, in turn (ours, reference, ours, ...): machine drift
(other jobs, thermal or frequency changes) then lands on all of them alike instead of on
whichever ran last. Each run starts with ``--warmup`` untimed steps (allocator warm-up, oneDNN or
cuDNN kernel selection, compilation, caches refilled after the other configurations ran), then
``--steps`` timed steps between device synchronisations with ``time.perf_counter``. The median
over ``--repeats`` is reported with its min-max spread; ratios are ratios of medians.

FLOPs of one step are counted once, outside the timing, with ``torch.utils.flop_counter``
(matrix products, convolutions and attention; elementwise work and the optimizer are not
FLOPs in its sense); achieved FLOP/s = FLOPs x steps/s, and the fraction is of a matrix-product
peak measured here and now with ``torch.mm`` on square matrices in the same dtype, so it says
how much of what this device can actually do the step uses. The peak is measured before the
configurations and again in every repetition, and the best measurement is used: other load only
ever lowers it.

Every configuration first runs one untimed priming step (optimizer state, compilation, first-call
allocations), so that no repetition pays for them, even with ``--warmup 0``.

Peak memory is the steady-state memory of a step (activations, gradients, workspace), the
weights and the optimizer state (reported apart, from its tensors) excluded (``PeakMemory`` in
``distill.perf.measure``: CUDA's allocator peak, or on a CPU the growth of the resident set's
high-water mark, which is indicative).
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from distill.errors import LaunchError, RecipeError
from distill.perf.fastpath import FastChoice, FastOptions, choice_record, choose_fast
from distill.perf.measure import (
    PEAK_SIZE,
    PeakMemory,
    Peaks,
    bf16_available,
    device_name,
    log,
    quiet_cpu_imports,
    resolve_device,
    stats,
    synchronize,
)
from distill.perf.steps import (
    EvalStep,
    OursStep,
    Problem,
    ReferenceStep,
    Settings,
    build_problem,
    check_recipe,
    device_batch,
    make_teacher,
    num_classes_of,
    optimizer_text,
    recipe_pipeline,
    student_arch,
)
from distill.recipe.schema import Recipe

DATA_NOTE = "inputs are random tensors already on the device: data loading and augmentation are excluded"
REFERENCE = "timm TokenDistillationTask"


@dataclass
class Options:
    warmup: int = 2
    steps: int = 6
    repeats: int = 3
    kd: str | None = None  # None: the recipe's type (hard when it is none)
    compile: Literal["no", "auto", "yes"] = "no"  # the fast path's compile (see distill.perf.fastpath)
    fast_precision: str = "auto"
    fast_attention: str = "auto"
    threads: int | None = None
    device: str | None = None
    num_classes: int | None = None
    peak_seconds: float = 1.0
    peak_size: int | None = None
    mode: Literal["recipe", "models"] = "recipe"
    loader_batches: int = 20  # recipe mode: batches of the recipe's input pipeline to time (0: skip)
    source: str = "(defaults)"
    argv: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Configurations:
    """The settings the configurations run at."""

    identical: Settings  # the reference's: fp32, its optimizer implementation, teacher as timm runs it
    fast: Settings  # the fast path's choice
    recipe: Settings  # the recipe's own switches, train.attention resolved for the device
    mode: Literal["recipe", "models"]

    @property
    def primary(self) -> Settings:
        """What the no-teacher and evaluation rows run at: the recipe's, or without one the fast path."""
        return self.recipe if self.mode == "recipe" else self.fast


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
    attention: str = "fused"
    seconds: list[float] = field(default_factory=list)  # per repetition, for `steps` steps
    peak_memory_mb: float = 0.0  # steady state: activations, gradients, workspace
    optimizer_state_mb: float | None = None  # persistent, outside peak_memory_mb
    flops_per_step: int = 0
    last_loss: float | None = None


@dataclass
class Timed:
    """Everything run_benchmark measured, for the result."""

    problem: Problem
    configurations: Configurations
    choice: FastChoice
    peaks: Peaks
    memory: PeakMemory
    rows: list[dict[str, Any]]


def _check_options(recipe: Recipe, opts: Options) -> torch.device:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    if min(opts.warmup, opts.steps - 1, opts.repeats - 1) < 0:
        raise RecipeError("--warmup must be >= 0, --steps and --repeats >= 1")
    if recipe.train.precision == "fp16" and device.type != "cuda":
        raise LaunchError("train.precision=fp16 needs a GPU; use train.precision=bf16 or fp32 on this machine")
    check_recipe(recipe)  # before the minute of matmul timing
    return device


def _ours(problem: Problem, key: str, label: str, s: Settings, distillation: str) -> Measured:
    return Measured(
        key=key, label=label, batch_size=problem.batch_size, implementation="distill", kind="train",
        distillation=distillation, precision=s.precision,
        optimizer=optimizer_text(problem.recipe.train.opt, s.fused, problem.device),
        teacher=s.teacher_text() if distillation != "none" else "-", compile=s.compile, attention=s.attention,
    )  # fmt: skip


def _configurations(problem: Problem, c: Configurations, pipeline: Any) -> list[tuple[Measured, Any]]:
    """Every configuration to time, each with its own copy of the models and optimizer."""
    device, kd = problem.device, problem.kd
    teachers: dict[tuple[str, bool, bool, bool], Any] = {}

    def teacher(s: Settings) -> Any:
        """One per switch combination (channels_last converts the weights in place)."""
        key = (s.precision, s.teacher_inference_mode, s.teacher_channels_last, s.teacher_compile)
        if key not in teachers:
            teachers[key] = make_teacher(problem, s)
        return teachers[key]

    def ours(key: str, label: str, s: Settings, distillation: str = kd, data: bool = False) -> tuple[Measured, Any]:
        batch = device_batch(next(iter(pipeline.train_loader)), device) if data else None
        t = teacher(s) if distillation != "none" else None
        step = OursStep(problem, s, distillation, t, pipeline if data else None, batch)
        return _ours(problem, key, label, s, distillation), step

    reference = Measured(
        key="reference", label=f"{REFERENCE} (defaults)", batch_size=problem.batch_size, implementation=REFERENCE,
        kind="train", distillation=kd, precision="fp32", teacher="NG (timm)", compile=False,
        optimizer=optimizer_text(problem.recipe.train.opt, False, device),
    )  # fmt: skip
    configs = [
        ours("ours_identical", "ours, identical settings", c.identical),
        (reference, ReferenceStep(problem)),
        ours("ours_fast", "ours, fast path", c.fast),
    ]
    if c.mode == "recipe" and c.recipe not in (c.identical, c.fast):
        configs.append(ours("ours_recipe", "ours, recipe settings", c.recipe))
    if pipeline is not None:
        configs.append(ours("ours_recipe_data", "ours, recipe settings + its input pipeline", c.recipe, data=True))
    configs.append(ours("ours_no_teacher", "ours, no teacher", c.primary, "none"))
    evaluation = Measured(
        key="ours_eval", label="ours, evaluation forward", batch_size=problem.batch_size, implementation="distill",
        kind="eval", distillation="-", precision=c.primary.precision, optimizer="-", teacher="-", compile=False,
        attention=c.primary.attention,
    )  # fmt: skip
    configs.append((evaluation, EvalStep(problem, c.primary.precision, c.primary.attention)))
    return configs


def _prime(configs: list[tuple[Measured, Any]], device: torch.device) -> None:
    """FLOPs once per configuration (never on a compiled module: the counter sees eager ops only;
    precision and fusing do not change the count), then one untimed step each: optimizer state,
    compilation and first-call allocations happen here, so every repetition sees the steady state."""
    for m, step in configs:
        m.flops_per_step = step.flops()
    for m, step in configs:
        step()
        m.optimizer_state_mb = _optimizer_state_mb(step)
    synchronize(device)


def _time(configs: list[tuple[Measured, Any]], peaks: Peaks, opts: Options, problem: Problem) -> PeakMemory:
    """One priming step each, then ``opts.repeats`` alternating timed runs."""
    device = problem.device
    _prime(configs, device)
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
        log(f"bench: repetition {rep + 1}/{opts.repeats}: " + ", ".join(line) + " img/s")
    return memory


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


def _loading(pipeline: Any, opts: Options, device: torch.device, by_key: dict[str, Any], fast: bool) -> Any:
    """The input pipeline alone against the recipe's step: does loading keep up?"""
    if pipeline is None or opts.loader_batches <= 0:
        return None
    log(f"bench: timing {opts.loader_batches} batches of the recipe's input pipeline")
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


def _fast_options(recipe: Recipe, opts: Options, pipeline: Any) -> FastOptions:
    """The fast path's search; the recipe's steps (epochs x batches per epoch) bound the compile's pay-back."""
    recipe_steps = recipe.train.epochs * len(pipeline.train_loader) if pipeline is not None else None
    return FastOptions(
        precision=opts.fast_precision,
        attention=opts.fast_attention,
        compile=opts.compile,
        steps=max(3, opts.steps // 2),
        recipe_steps=recipe_steps,
    )


def run_benchmark(recipe: Recipe, opts: Options) -> dict[str, Any]:
    """Build every configuration, time them alternately, return the figures (JSON-able)."""
    device = _check_options(recipe, opts)
    quiet_cpu_imports(device)
    kd = opts.kd or (recipe.distillation.type if recipe.distillation.type != "none" else "hard")
    problem = build_problem(recipe, num_classes_of(recipe, opts.num_classes), kd, device)
    peaks = Peaks(device, opts.peak_size or PEAK_SIZE.get(device.type, 2048), opts.peak_seconds)
    peaks.measure("fp32")
    pipeline = recipe_pipeline(recipe) if opts.mode == "recipe" else None
    choice = choose_fast(problem, _fast_options(recipe, opts, pipeline))
    c = Configurations(
        identical=Settings(precision="fp32", teacher_inference_mode=False, teacher_channels_last=False),
        fast=choice.settings,
        recipe=Settings.of_recipe(recipe, device),
        mode=opts.mode,
    )
    for s in (c.identical, c.fast, c.recipe):
        if s.precision not in peaks.samples:
            peaks.measure(s.precision)
    configs = _configurations(problem, c, pipeline)
    memory = _time(configs, peaks, opts, problem)
    rows = [_row(m, opts.steps, peaks.best()) for m, _ in configs]
    by_key = {r["key"]: r for r in rows}
    loading = _loading(pipeline, opts, device, by_key, c.recipe == c.fast)  # after: workers take cores
    ratios = {
        "identical_settings": _ratio(by_key["ours_identical"], by_key["reference"]),
        "fast_path": _ratio(by_key["ours_fast"], by_key["reference"]),
    }
    timed = Timed(problem, c, choice, peaks, memory, rows)
    return _result(recipe, opts, timed) | {"ratios": ratios, "data_loading": loading}


def _settings_record(recipe: Recipe, opts: Options, t: Timed) -> dict[str, Any]:
    from distill.training.optim import effective_lr

    problem, d, train, c = t.problem, recipe.distillation, recipe.train, t.configurations
    return {
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
        "distillation": {"type": problem.kd, "alpha": d.alpha, "tau": d.tau, "kl_norm": d.kl_norm},
        "label_smoothing": train.label_smoothing,
        "optimizer": {"opt": train.opt, "lr": effective_lr(train), "weight_decay": train.weight_decay},
        "warmup": opts.warmup,
        "steps": opts.steps,
        "repeats": opts.repeats,
        "compile": c.fast.compile,
        "compile_option": opts.compile,
        "fast_precision": c.fast.precision,
        "fast_attention": c.fast.attention,
        "fast_precision_reason": t.choice.reason,
        "fast_precision_step_img_s": t.choice.img_s or None,
        "fast_choice": choice_record(t.choice),
        "identical": asdict(c.identical),
        "fast": asdict(c.fast),
        "recipe": asdict(c.recipe),
        "recipe_attention": recipe.train.attention,  # as written; settings.recipe has it resolved
        "primary": "recipe" if opts.mode == "recipe" else "fast",
        "data": DATA_NOTE,
    }


def _result(recipe: Recipe, opts: Options, t: Timed) -> dict[str, Any]:
    from distill.run.tracking import provenance

    device = t.problem.device
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
        "step": "distill.training.step.Step (the object DistillRun and the teacher stage train with)",
        "settings": _settings_record(recipe, opts, t),
        "matmul_peak_gflops": t.peaks.best(),
        "matmul_peak_samples": t.peaks.samples,  # before the configurations and once per repetition
        "matmul_peak_size": t.peaks.size,
        "memory": t.memory.label,
        "configurations": t.rows,
        "notes": _notes(recipe, opts),
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
    st = stats(img_s)
    steps_per_s = st["median"] / m.batch_size
    gflops = m.flops_per_step * steps_per_s / 1e9
    row = asdict(m)
    row.pop("seconds")
    row.update(
        {
            "img_s": st,
            "step_ms": stats(step_ms),
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
