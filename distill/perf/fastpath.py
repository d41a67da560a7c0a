"""The bench's fast path: the fastest settings of our step on this device, found by timing it.

Candidates are precision x attention (fp32, and bf16 where it runs at all; 'fused'
F.scaled_dot_product_attention and timm's 'manual' matrix-product attention), each our step at
the recipe's settings with the fast switches (fused AdamW, teacher under inference_mode in
channels-last), timed alternately on the same batch; the median img/s decides. A fast bf16
matrix product does not make a small student's step fast: on the quickstart, bf16 with fused
attention ran at 0.59x fp32's throughput on a CPU with AMX, and CPU flash attention in bf16 is
slow (train.attention's comment in the recipe schema has the figures).

Compile (``--compile auto``): the fastest eager candidate is compiled (student and teacher), its
compile time measured on its first step, then timed alternately against the eager one; it is
taken when the time it saves per step, times the recipe's steps (``train.epochs`` x its batches),
exceeds the compile time: the trainer would pay that compile once per run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from distill.errors import LaunchError
from distill.perf.measure import Precision, bf16_available, filtered_stderr, log, synchronize, time_alternated
from distill.perf.steps import OursStep, Problem, Settings, ours_step

ROUNDS = 3  # alternated rounds per candidate: the median of 3 survives one disturbed round


@dataclass(frozen=True, kw_only=True)
class FastOptions:
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    attention: str = "auto"  # auto | fused | manual
    compile: Literal["no", "auto", "yes"] = "no"
    steps: int = 5  # timed steps per round
    recipe_steps: int | None = None  # the recipe's training steps: the compile's pay-back horizon


@dataclass
class CompileCheck:
    """The compiled fastest candidate against the eager one (JSON-able)."""

    compile_s: float
    eager_img_s: float
    compiled_img_s: float
    saved_s: float | None  # over the recipe's steps, compile time not counted; None without a recipe
    taken: bool


@dataclass
class FastChoice:
    settings: Settings
    reason: str
    img_s: dict[str, float] = field(default_factory=dict)  # candidate ('bf16 manual') -> median img/s
    compiled: CompileCheck | None = None


def candidates(opts: FastOptions, problem: Problem) -> list[Settings]:
    """The eager fast-path settings to time: every precision x attention the options leave open."""
    device = problem.device
    if opts.precision == "fp16" and device.type != "cuda":
        raise LaunchError("--fast-precision fp16 needs a GPU; use bf16 or fp32 on this machine")
    if opts.precision == "bf16" and not bf16_available(device):
        raise LaunchError("--fast-precision bf16: bf16 autocast is not available on this device")
    if opts.precision != "auto":
        precisions: list[Precision] = [opts.precision]  # type: ignore[list-item]
    else:
        precisions = ["fp32", "bf16"] if bf16_available(device) else ["fp32"]
    attentions = ["fused", "manual"] if opts.attention == "auto" else [opts.attention]
    base = Settings(fused=True, teacher_inference_mode=True, teacher_channels_last=True)
    return [replace(base, precision=p, attention=a) for p in precisions for a in attentions]  # type: ignore[arg-type]


def choose_fast(problem: Problem, opts: FastOptions) -> FastChoice:
    """The fastest eager candidate, then compiled where that pays back (see the module docstring)."""
    options = candidates(opts, problem)
    if len(options) == 1:
        choice = FastChoice(options[0], "requested")
    else:
        log(f"bench: timing the recipe's step at {', '.join(s.text() for s in options)} for the fast path")
        steps = {s.text(): ours_step(problem, s) for s in options}
        for step in steps.values():
            step()  # priming: optimizer state, first-call allocations
        timed = time_alternated(steps, problem.device, problem.batch_size, opts.steps, ROUNDS)  # type: ignore[arg-type]
        img_s = {key: statistics.median(values) for key, values in timed.items()}
        best = max(options, key=lambda s: img_s[s.text()])
        ranked = ", ".join(f"{key} {value:.0f}" for key, value in sorted(img_s.items(), key=lambda kv: -kv[1]))
        reason = f"the recipe's step, img/s median of {ROUNDS} alternated: {ranked}"
        choice = FastChoice(best, reason, img_s)
    if opts.compile == "no":
        return choice
    if opts.compile == "auto" and opts.recipe_steps is None:
        choice.reason += "; compile not tried: no recipe steps to pay back its compile time"
        return choice
    return _with_compile(problem, choice, opts)


def _with_compile(problem: Problem, choice: FastChoice, opts: FastOptions) -> FastChoice:
    """Compile the chosen settings; keep them compiled when asked (yes) or when it pays back (auto)."""
    eager_settings = choice.settings
    compiled_settings = replace(eager_settings, compile=True, teacher_compile=True)
    log(f"bench: compiling {compiled_settings.text()} to see whether it pays back")
    eager = ours_step(problem, eager_settings)
    eager()
    try:
        compiled, compile_s = _compiled_step(problem, compiled_settings)
    except Exception as exc:  # Inductor needs a C++ compiler on a CPU; a failure leaves eager
        if opts.compile == "yes":
            raise
        choice.reason += f"; compile failed ({type(exc).__name__}: {str(exc)[:120]}), so eager"
        return choice
    timed = time_alternated(
        {"eager": eager, "compiled": compiled}, problem.device, problem.batch_size, opts.steps, ROUNDS
    )
    eager_img_s, compiled_img_s = (statistics.median(timed[k]) for k in ("eager", "compiled"))
    saved = None
    if opts.recipe_steps is not None:
        per_step = problem.batch_size / eager_img_s - problem.batch_size / compiled_img_s
        saved = per_step * opts.recipe_steps
    pays = saved is not None and saved > compile_s
    taken = opts.compile == "yes" or pays
    choice.compiled = CompileCheck(compile_s, eager_img_s, compiled_img_s, saved, taken)
    horizon = f"saves {saved:.0f} s over the recipe's {opts.recipe_steps} steps" if saved is not None else "no horizon"
    verdict = "requested" if opts.compile == "yes" else ("pays back" if pays else "does not pay back")
    choice.reason += (
        f"; compiled {compiled_img_s:.0f} vs eager {eager_img_s:.0f} img/s, compile {compile_s:.0f} s, "
        f"{horizon}: {verdict}"
    )
    if taken:
        choice.settings = compiled_settings
    return choice


def _compiled_step(problem: Problem, settings: Settings) -> tuple[OursStep, float]:
    """A compiled step and its compile time: its first step's time less one eager-like step (the
    second step's time)."""
    step = ours_step(problem, settings)
    with filtered_stderr(problem.device):
        start = time.perf_counter()
        step()
        synchronize(problem.device)
        first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    synchronize(problem.device)
    return step, max(0.0, first - (time.perf_counter() - start))


def choice_record(choice: FastChoice) -> dict[str, Any]:
    """The JSON form of a choice (the result's settings.fast_choice)."""
    from dataclasses import asdict

    return {
        "settings": choice.settings.text(),
        "reason": choice.reason,
        "img_s": choice.img_s,
        "compile": asdict(choice.compiled) if choice.compiled else None,
    }
