"""Measurement tools for the bench and the step profile: device helpers, alternated timing, the
matrix-product peak, FLOP counting, peak memory, and the console noise they silence.

Timing is alternated (every step runs once per round, in turn), so that machine drift (other
jobs, thermal or frequency changes) lands on all of them alike instead of on whichever ran last;
GPU timings are taken between ``torch.cuda.synchronize`` calls (CPU kernels are synchronous).
"""

from __future__ import annotations

import logging
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from distill.errors import LaunchError

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Square matrix side for the matmul peak: big enough to saturate the device, small enough to
# time many products in ~1 s (2 CPU cores: ~0.2 s per 2048^3 fp32 product).
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


def log(text: str) -> None:
    """Progress on stderr, so that stdout holds the report alone."""
    print(text, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, Any]:
    """Median, range and inter-quartile range of repeated measurements (JSON-able)."""
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


def resolve_device(requested: str | None) -> torch.device:
    """``--device``: cuda when torch sees a GPU unless told; a GPU asked for and absent is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda but torch sees no GPU")
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


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


# ---------------------------------------------------------------------------------------------
# Timing, peak, FLOPs


def time_alternated(
    steps: dict[str, Callable[[], object]], device: torch.device, batch_size: int, n: int, rounds: int
) -> dict[str, list[float]]:
    """img/s of each step per round: one warm-up call, then ``n`` calls between device
    synchronisations, the steps taking turns so that machine drift lands on all alike."""
    timed: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            step()  # warm-up after the other steps ran
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(device)
            timed[key].append(batch_size * n / (time.perf_counter() - start))
    return timed


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


@dataclass
class Peaks:
    """Matmul peaks per precision: every measurement kept, the best one used (other load only
    ever lowers a measurement; a peak measured once, while another job ran, made steps look
    faster than 100%)."""

    device: torch.device
    size: int
    seconds: float
    samples: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, precision: str) -> float:
        if precision not in self.samples:
            log(f"bench: measuring the {precision} matmul peak ({self.size}x{self.size}, {self.seconds:g} s)")
        value = matmul_peak_gflops(self.device, DTYPES[precision], self.size, self.seconds)
        self.samples.setdefault(precision, []).append(value)
        return value

    def best(self) -> dict[str, float]:
        return {precision: max(values) for precision, values in self.samples.items()}


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
# Peak memory


class PeakMemory:
    """Peak memory a configuration adds above the level at ``start()``: on a GPU
    ``torch.cuda.max_memory_allocated`` above what was allocated before; on a CPU the growth of
    the process's resident-set high-water mark (VmHWM, reset through ``/proc/self/clear_refs``)
    above its resident set then. A CPU allocator keeps freed memory, so that figure is indicative."""

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


# ---------------------------------------------------------------------------------------------
# Expected console noise on a CPU

# Lines a CUDA build of torch writes on a machine without a GPU, none of which a user can act on:
# Kineto's trace markers around every profiled region and its device query, written by C++ to
# file descriptor 2 (torch 2.x, libkineto).
CPU_NOISE = (
    re.compile(r"^USDT:.*(profiler_start|profiler_stop)"),
    re.compile(r"^ERROR:.*gpuGetDeviceCount failed with code 35\b"),  # 35: no CUDA driver
)


class _NoCudaRuntime(logging.Filter):
    """torch.utils.cpp_extension warns "No CUDA runtime is found" when imported (by Inductor,
    the profiler) on a machine without a GPU; the bench on a CPU expects none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cpu_imports(device: torch.device) -> None:
    """Silence the import-time warnings a CPU run expects (a logging filter; the logger exists
    before torch.utils.cpp_extension is imported, so the filter catches its first message)."""
    if device.type == "cpu":
        logger = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _NoCudaRuntime) for f in logger.filters):
            logger.addFilter(_NoCudaRuntime())


@contextmanager
def filtered_stderr(device: torch.device, noise: tuple[re.Pattern[str], ...] = CPU_NOISE) -> Iterator[None]:
    """Run the block with file descriptor 2 captured, then write its lines back without those
    ``noise`` matches: C++ libraries write there directly, past Python's sys.stderr. On a GPU the
    block runs as it is (its lines may matter there)."""
    if device.type != "cpu":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not any(p.search(line) for p in noise)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
