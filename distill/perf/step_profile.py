"""Where a training step's time goes, per precision: why bf16 stays far from its matmul peak.

    python -m distill.profile_step RECIPE.yaml [dotted.key=value ...] [--num-classes 10]
        [--precisions fp32,bf16] [--attention fused,manual] [--compile] [--steps 10] [--repeats 3]
        [--device cpu|cuda] [--json OUT.json]

The step is the bench's ``OursStep`` (the trainer's ``Step`` with the engine's update:
the student's forward under autocast cast back to fp32 as Accelerate wraps it, the teacher under
its autocast, fused AdamW) on a random batch already on the device. For every precision (and,
with ``--compile``, its torch.compile'd variant) it reports:

* throughput: median img/s over ``--repeats`` alternated timings of ``--steps`` steps, without
  the profiler; FLOPs per step from ``torch.utils.flop_counter`` (matrix products, convolutions,
  attention) and so the achieved GFLOP/s and its fraction of a square ``torch.mm`` peak measured
  here in the same dtype;
* where the time goes (eager only, from one profiled pass, so profiler overhead is included):
  self time per operator class (matrix products, attention, convolution, dtype casts and copies, norms,
  activations and softmax, the optimizer's kernels, the rest) and per phase (forward + loss,
  backward, optimizer);
* the matrix products themselves: every ``mm``/``addmm``/``bmm`` shape the step runs, its calls,
  self time and achieved GFLOP/s, and a bare ``torch.mm`` of the largest shape timed alone in each
  dtype: the rate these shapes can reach at all on this device, against the square peak.

The comparison shows why a bf16 matmul peak several times fp32's does not make a small
student's step faster: its products are thin (K = embed_dim), the casts autocast inserts and the
ops it keeps in fp32 (norms, softmax, the loss) take a larger share, and the backward's products
run at the same thin shapes. Figures, never assertions: the machine is shared.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.errors import RecipeError
from distill.models.student import set_attention
from distill.perf.measure import (
    DTYPES,
    PEAK_SIZE,
    bf16_available,
    device_name,
    filtered_stderr,
    matmul_peak_gflops,
    quiet_cpu_imports,
    resolve_device,
    synchronize,
    time_alternated,
)
from distill.perf.steps import OursStep, Problem, Settings, build_problem, make_teacher, num_classes_of
from distill.recipe.schema import Recipe, load_recipe

# Operator classes by aten name (self time). Matching is by prefix after "aten::".
CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"),
    "attention": ("_scaled_dot_product", "scaled_dot_product"),
    "convolution": (
        "convolution",
        "mkldnn_convolution",
        "_convolution",
        "conv2d",
        "cudnn_convolution",
        "_slow_conv2d",
        "thnn_conv2d",
        "_nnpack_spatial_convolution",
    ),
    "casts and copies": ("_to_copy", "to", "copy_", "_autocast_to", "clone", "contiguous"),
    "norms": ("native_layer_norm", "layer_norm", "native_batch_norm", "batch_norm", "_native_batch_norm"),
    "activations and softmax": ("gelu", "softmax", "_softmax", "log_softmax", "_log_softmax", "relu", "threshold"),
    "optimizer": ("_fused_adamw", "_fused_adam", "_foreach", "lerp", "addcdiv", "addcmul"),
}
PHASES = ("forward + loss", "backward", "optimizer")


def category_of(name: str) -> str:
    """The operator class of a profiler event name ('aten::addmm' -> 'matmul')."""
    if not name.startswith("aten::"):
        return "other"
    op = name[len("aten::") :].removesuffix("_").removesuffix("_backward")  # in-place and backward forms
    for category, prefixes in CATEGORIES.items():
        for prefix in (p.rstrip("_") for p in prefixes):
            if op == prefix or (prefix.startswith("_") and op.startswith(prefix)) or op.startswith(prefix + "_"):
                return category
    return "other"


def gemm_flops(name: str, shapes: list[list[int]]) -> int:
    """FLOPs of one mm/addmm/bmm call from its recorded input shapes (0 when they do not fit)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
    except (ValueError, IndexError, TypeError):
        return 0
    return 0


@dataclass
class Variant:
    precision: str
    compiled: bool
    attention: str = "fused"  # ATTENTION: train.attention's two, or one SDPA kernel forced

    @property
    def key(self) -> str:
        suffix = (f" {self.attention}" if self.attention != "fused" else "") + (" compiled" if self.compiled else "")
        return self.precision + suffix


# --attention: 'fused' (F.scaled_dot_product_attention, torch picks the kernel) and 'manual'
# (timm's plain matrix products) are train.attention's choices; 'math', 'flash', 'efficient'
# force one SDPA kernel. On a CPU torch picks its flash kernel, which in bf16 took 49.5 ms
# forward + backward per layer of the CIFAR-10 study's student against 12.0 ms in fp32 and
# 17.2 ms for the math kernel in bf16 (AMD EPYC, avx512_bf16, 2026-11-30): 58% of the bf16 step.
ATTENTION = ("fused", "manual", "math", "flash", "efficient")


def force_sdpa(forward: Any, name: str) -> Any:
    """``forward`` with scaled_dot_product_attention limited to kernel ``name`` (backward follows
    the kernel its forward recorded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    backend = chosen[name]

    def limited(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel([backend]):
            return forward(*args, **kwargs)

    return limited


class PhasedStep:
    """OursStep's update (loss, backward, optimizer step) with the three phases marked for the
    profiler; without OursStep's per-step reseeding, loss meter and fp16 scaler, which the timed
    steps keep (the profile is of bf16 and fp32, which need no scaler)."""

    def __init__(self, step: OursStep) -> None:
        self.step = step

    def __call__(self) -> None:
        from torch.profiler import record_function

        s = self.step
        with record_function(PHASES[0]):
            parts = s.loss()
        with record_function(PHASES[1]):
            parts.total.backward()
        with record_function(PHASES[2]):
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        s.step_index += 1


def build_step(problem: Problem, v: Variant, backend: str) -> OursStep:
    settings = Settings(precision=v.precision, fused=True)  # type: ignore[arg-type]
    step = OursStep(problem, settings, problem.kd, make_teacher(problem, settings))
    set_attention(step.model, "manual" if v.attention == "manual" else "fused")
    if v.compiled:
        step.forward = torch.compile(step.model, backend=backend)
    if v.attention not in ("fused", "manual"):
        step.forward = force_sdpa(step.forward, v.attention)
    with filtered_stderr(problem.device):  # Inductor's first call on a CPU
        step()  # priming: optimizer state, first-call allocations, compilation
    return step


def profile_eager(step: OursStep, n: int) -> dict[str, Any]:
    """Self time per operator class and phase, and every matrix-product shape, over n steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    phased = PhasedStep(step)
    for _ in range(3):  # oneDNN creates a primitive per new shape on its first calls: not the steady state
        phased()
    device = step.problem.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(n):
            phased()
        synchronize(device)
    cuda = device.type == "cuda"

    def operator_rows(averages: Any) -> list[Any]:
        # On a GPU key_averages also has a row per kernel (its device time again, under the
        # kernel's name) and per annotation on the device: keep the operators, recorded on the CPU.
        return [e for e in averages if not cuda or e.device_type == DeviceType.CPU]

    def self_us(e: Any) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = operator_rows(prof.key_averages())
    categories: dict[str, float] = {}
    total = 0.0
    for e in events:
        if e.key in PHASES:
            continue
        categories[category_of(e.key)] = categories.get(category_of(e.key), 0.0) + self_us(e)
        total += self_us(e)
    phases = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / n / 1e3 for e in events if e.key in PHASES}
    gemms = []
    for e in operator_rows(prof.key_averages(group_by_input_shape=True)):
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        flops, us = gemm_flops(e.key, e.input_shapes), self_us(e)
        gemms.append(
            {
                "op": e.key.removeprefix("aten::"),
                "shapes": [s for s in e.input_shapes if s],
                "calls_per_step": e.count / n,
                "ms_per_step": us / n / 1e3,
                "gflops": flops * e.count / (us / 1e6) / 1e9 if flops and us else None,
                "flops_per_call": flops,
            }
        )
    gemms.sort(key=lambda g: -g["ms_per_step"])
    gemm_flop_total = sum(g["flops_per_call"] * g["calls_per_step"] for g in gemms)
    gemm_ms = sum(g["ms_per_step"] for g in gemms)
    return {
        "ms_per_step_profiled": total / n / 1e3,
        "share": {k: v / total for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "ms_per_step_by_class": {k: v / n / 1e3 for k, v in categories.items()},
        "phases_ms": phases,
        "gemms": gemms,
        "gemm_gflops": gemm_flop_total / (gemm_ms / 1e3) / 1e9 if gemm_ms else None,
    }


def bare_mm_gflops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, seconds: float) -> float:
    """A lone torch.mm of [m, k] x [k, n] in ``dtype``: what the step's shape can reach at all."""
    from torch.utils.benchmark import Timer

    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)
    timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=torch.get_num_threads())
    return 2 * m * k * n / timer.blocked_autorange(min_run_time=seconds).median / 1e9


def largest_gemm(gemms: list[dict[str, Any]]) -> tuple[int, int, int] | None:
    """(m, k, n) of the mm/addmm doing the most FLOPs per step; on a tie (a block's fc1 and fc2,
    forward and backward, do the same FLOPs) a forward addmm, then the smallest k: a fixed choice."""

    def rank(g: dict[str, Any]) -> tuple[float, bool, int]:
        k = g["shapes"][1][1] if g["op"] == "addmm" and len(g["shapes"]) >= 3 else g["shapes"][0][-1]
        return (-g["flops_per_call"] * g["calls_per_step"], g["op"] != "addmm", k)

    for g in sorted(gemms, key=rank):
        shapes = g["shapes"]
        if g["op"] == "mm" and len(shapes) >= 2:
            return shapes[0][0], shapes[0][1], shapes[1][1]
        if g["op"] == "addmm" and len(shapes) >= 3:
            return shapes[1][0], shapes[1][1], shapes[2][1]
    return None


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """What to profile and how long (the command's options)."""

    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    compile: bool = False  # also time each variant compiled
    backend: str = "inductor"  # torch.compile backend
    attention: list[str] = field(default_factory=lambda: ["fused", "manual"])  # of ATTENTION
    steps: int = 10  # timed steps per repetition
    repeats: int = 3  # alternated repetitions per variant
    num_classes: int | None = None  # None: what the recipe's source implies
    peak_seconds: float = 1.0
    peak_size: int | None = None
    device: str | None = None  # None: cuda when available


def _check(opts: ProfileOptions, device: torch.device) -> None:
    if opts.steps < 1 or opts.repeats < 1:
        raise RecipeError("--steps and --repeats must be >= 1")
    for p in opts.precisions:
        if p not in DTYPES:
            raise RecipeError(f"--precisions: {p!r} is not one of {sorted(DTYPES)}")
        if p == "bf16" and not bf16_available(device):
            raise RecipeError("--precisions bf16: bf16 is not available on this device")
        if p == "fp16" and device.type != "cuda":
            raise RecipeError("--precisions fp16 needs a GPU")
    for name in opts.attention:
        if name not in ATTENTION:
            raise RecipeError(f"--attention: {name!r} is not one of {', '.join(ATTENTION)}")


def run_profile(recipe_path: str, overrides: list[str], opts: ProfileOptions) -> dict[str, Any]:
    """Time every variant alternately, profile the eager ones, and time the largest product alone."""
    recipe = load_recipe(recipe_path, overrides)
    device = resolve_device(opts.device)
    quiet_cpu_imports(device)
    _check(opts, device)
    kd = recipe.distillation.type if recipe.distillation.type != "none" else "hard"
    problem = build_problem(recipe, num_classes_of(recipe, opts.num_classes), kd, device)
    size = opts.peak_size or PEAK_SIZE.get(device.type, 2048)
    peaks = {p: matmul_peak_gflops(device, DTYPES[p], size, opts.peak_seconds) for p in opts.precisions}
    compiled = [False, True] if opts.compile else [False]
    variants = [Variant(p, c, a) for c in compiled for a in opts.attention for p in opts.precisions]
    built: dict[str, OursStep] = {}
    compile_s: dict[str, float] = {}
    for v in variants:
        start = time.perf_counter()
        built[v.key] = build_step(problem, v, opts.backend)
        if v.compiled:
            compile_s[v.key] = time.perf_counter() - start
    flops = built[variants[0].key].flops()
    timed = time_alternated(built, device, problem.batch_size, opts.steps, opts.repeats)  # type: ignore[arg-type]
    result = _header(recipe, problem, opts, flops, peaks) | {"source": " ".join([recipe_path, *overrides])}
    for v in variants:
        row = _variant_row(v, timed[v.key], problem.batch_size, flops, peaks[v.precision])
        if v.compiled:
            row["compile_s"] = compile_s[v.key]
        else:
            with filtered_stderr(device):  # Kineto's markers on a CPU
                row["profile"] = profile_eager(built[v.key], max(2, opts.steps // 2))
        result["variants"][v.key] = row
    shape = largest_gemm(result["variants"][variants[0].key]["profile"]["gemms"])
    if shape is not None:
        result["largest_gemm"] = {
            "mkn": list(shape),
            "bare_mm_gflops": {p: bare_mm_gflops(shape, DTYPES[p], device, opts.peak_seconds) for p in opts.precisions},
        }
    return result


def _header(
    recipe: Recipe, problem: Problem, opts: ProfileOptions, flops: int, peaks: dict[str, float]
) -> dict[str, Any]:
    device = problem.device
    return {
        "tool": "distill.profile_step",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": {"type": device.type, "name": device_name(device), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "student": {
            "embed_dim": problem.student.embed_dim,  # the recipe may leave them to the timm model
            "depth": len(problem.student.blocks),
            "img_size": recipe.student.img_size,
            "patch_size": recipe.student.patch_size,
        },
        "batch_size": problem.batch_size,
        "distillation": problem.kd,
        "teacher": recipe.teacher.model,
        "gflop_per_step": flops / 1e9,
        "matmul_peak_size": opts.peak_size or PEAK_SIZE.get(device.type, 2048),
        "matmul_peak_gflops": peaks,
        "compile_backend": opts.backend if opts.compile else None,
        "variants": {},
    }


def _variant_row(v: Variant, img_s_values: list[float], batch_size: int, flops: int, peak: float) -> dict[str, Any]:
    img_s = statistics.median(img_s_values)
    achieved = flops / batch_size * img_s / 1e9
    return {
        "precision": v.precision,
        "compiled": v.compiled,
        "attention": v.attention,
        "img_s": img_s,
        "img_s_values": img_s_values,
        "step_ms": batch_size / img_s * 1e3,
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak,
    }


def format_report(r: dict[str, Any]) -> str:
    s = r["student"]
    lines = [
        f"profile_step: {r['source']}",
        f"device: {r['device']['name']} ({r['device']['threads']} threads), torch {r['torch']}",
        f"student: {s['embed_dim']} wide x {s['depth']} blocks, {s['img_size']} px / patch {s['patch_size']}; "
        f"batch {r['batch_size']}; teacher {r['teacher']} ({r['distillation']}); "
        f"{r['gflop_per_step']:.2f} GFLOP per step",
        "matmul peak ("
        + f"{r['matmul_peak_size']}^2): "
        + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in r["matmul_peak_gflops"].items()),
        "",
        f"{'variant':<24} {'img/s':>8} {'step ms':>8} {'GFLOP/s':>8} {'of peak':>8}",
    ]
    for key, v in r["variants"].items():
        extra = f"   (compiled in {v['compile_s']:.0f} s)" if "compile_s" in v else ""
        lines.append(
            f"{key:<24} {v['img_s']:8.0f} {v['step_ms']:8.1f} {v['achieved_gflops']:8.1f} "
            f"{v['fraction_of_peak']:8.1%}{extra}"
        )
    for key, v in r["variants"].items():
        if "profile" not in v:
            continue
        p = v["profile"]
        lines += ["", f"{key}: where the time goes (profiled, {p['ms_per_step_profiled']:.1f} ms per step)"]
        lines.append("  phases: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in p["phases_ms"].items()))
        lines.append(
            "  self time: " + ", ".join(f"{k} {share:.0%}" for k, share in p["share"].items() if share >= 0.005)
        )
        gemm = p["gemm_gflops"]
        lines.append(f"  matrix products: {gemm:.0f} GFLOP/s over all shapes" if gemm else "  matrix products: none")
        for g in p["gemms"][:5]:
            rate = f"{g['gflops']:.0f} GFLOP/s" if g["gflops"] else "-"
            lines.append(
                f"    {g['op']:<6} {g['shapes']!s:<40} x{g['calls_per_step']:.0f}  {g['ms_per_step']:.2f} ms  {rate}"
            )
    if "largest_gemm" in r:
        lg = r["largest_gemm"]
        m, k, n = lg["mkn"]
        lines += [
            "",
            f"the largest product alone ([{m}, {k}] x [{k}, {n}]): "
            + ", ".join(
                f"{p} {g:.0f} GFLOP/s ({g / r['matmul_peak_gflops'][p]:.0%} of its square peak)"
                for p, g in lg["bare_mm_gflops"].items()
            ),
        ]
    return "\n".join(lines)
