#!/usr/bin/env bash
# The GPU check, one call on a lent GPU, within 8 minutes on one GPU (every step has a `timeout`):
#   1. the CUDA-marked tests (tests/test_cuda.py and the GPU variant in tests/test_trainer_setup.py);
#   2. host waits: ~30 steps of recipes/cifar10_gpu.yaml (generated 32 px data, 4 decode workers
#      for evaluation) under torch.cuda.set_sync_debug_mode, waits per step counted, the GPU-busy
#      share of the steps from torch's profiler, and the run's train and wall time (summary.json);
#   3. two processes over NCCL (accelerate launch --multi_gpu) on the smoke recipe, where there are
#      two GPUs;
#   4. fp16 + clip_grad + EMA + train.compile + the teacher-output cache in one smoke run, filled
#      then replayed (verify_every=1);
#   5. the decode data path (data.store=decode) with 4 workers, one epoch of the GPU recipe's shape;
#   6. the bench: DeiT-S/16 at 224 px with a RegNetY-16GF teacher (random weights);
#   7. python -m distill.profile_step on the GPU recipe's step (fp32/bf16 x fused/manual attention).
# Everything goes to the output folder: check.json (figures, exit status per step, what was
# skipped and why) and one log per step. On a machine without a GPU every GPU step is skipped,
# said so, and the folder still holds check.json.
#   scripts/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-.venv/bin/python}
WORK="$OUT/work"
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
STATUS="$OUT/status.txt"  # "step rc" lines; check.json is built from them
: > "$STATUS"
SKIPPED="$OUT/skipped.txt"  # "step: why" lines
: > "$SKIPPED"
SYNTH=(data.source=synthetic data.path=null data.synthetic.num_classes=10 data.synthetic.image_size=32)
GPU_TEACHER=(teacher.checkpoint=null teacher.train.epochs=1 teacher.train.batch_size=512)

step() {  # step NAME SECONDS CMD...: run CMD under `timeout`, log to OUT/NAME.log, record its status
    local name=$1 seconds=$2
    shift 2
    echo "gpu_check: $name (at most ${seconds}s)"
    timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ "$rc" = 124 ] && echo "gpu_check: $name timed out after ${seconds}s"
    echo "$name $rc" >> "$STATUS"
    tail -4 "$OUT/$name.log"
}

skip() {  # skip NAME WHY
    echo "gpu_check: $1 skipped: $2"
    echo "$1: $2" >> "$SKIPPED"
}

GPUS=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)

if [ "$GPUS" = 0 ]; then
    step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        "tests/test_trainer_setup.py::test_ema_is_on_the_gpu_with_the_student" -rs
    for s in waits nccl_two_processes fp16_clip_ema_compile_cache decode_4_workers bench profile_step; do
        skip "$s" "no GPU visible to torch"
    done
else
    step cuda_tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        "tests/test_trainer_setup.py::test_ema_is_on_the_gpu_with_the_student" --junitxml="$OUT/cuda_tests.xml"

    # 30 steps: 15,360 generated images at the recipe's global batch of 512.
    step waits 120 $PY - "$WORK/waits.json" recipes/cifar10_gpu.yaml "run.output_dir=$WORK/runs" run.name=waits \
        "${SYNTH[@]}" data.synthetic.train_per_class=1536 data.synthetic.val_per_class=100 data.num_workers=4 \
        "${GPU_TEACHER[@]}" train.epochs=1 train.warmup_epochs=0 run.export=false run.log_every_steps=10 \
        "teacher.cache_dir=$WORK/teachers" <<'EOF'
"""Count the host's waits for the GPU inside the student's training loop, and the GPU-busy share."""
import json, sys, time, warnings

import torch

import distill.training.engine as engine
import distill.training.trainer as trainer
from distill.train import main
from distill.training.step import Step

out, args = sys.argv[1], sys.argv[2:]
result = {"waits": 0, "waits_in_flush": 0, "steps": 0, "where": {}}
real_epoch, real_flush, real_step = trainer.train_one_epoch, engine.LossMeter.flush, Step.__call__
in_flush = [False]


def on_warning(message, category, filename, lineno, file=None, line=None):
    if "synchronizing" in str(message):
        key = "waits_in_flush" if in_flush[0] else "waits"
        result[key] += 1
        import traceback
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "/distill/" in f.filename), None)
        where = f"{frame.filename.split('/distill/')[-1]}:{frame.lineno}" if frame else "?"
        result["where"][where] = result["where"].get(where, 0) + 1


def epoch(*a, **k):
    warnings.simplefilter("always")
    warnings.showwarning = on_warning
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("warn")
    with prof:
        try:
            return real_epoch(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            busy_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
            result["epoch_wall_s"], result["gpu_busy_s"] = wall, busy_us / 1e6
            result["gpu_busy_share"] = busy_us / 1e6 / wall


def flush(self, acc):  # the loss flush every run.log_every_steps waits by design: counted apart
    in_flush[0] = True
    try:
        return real_flush(self, acc)
    finally:
        in_flush[0] = False


def step(self, *a):
    result["steps"] += 1
    return real_step(self, *a)


trainer.train_one_epoch, engine.LossMeter.flush, Step.__call__ = epoch, flush, step
rc = main(args)
result["waits_per_step"] = result["waits"] / max(result["steps"], 1)
json.dump(result, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k != "where"}))
sys.exit(rc)
EOF

    if [ "$GPUS" -ge 2 ]; then
        step nccl_two_processes 90 "$(dirname "$PY")/accelerate" launch --multi_gpu --num_processes 2 \
            --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 0 distill/train.py \
            recipes/smoke.yaml "run.output_dir=$WORK/nccl" "teacher.cache_dir=$WORK/teachers" run.export=false
    else
        skip nccl_two_processes "one GPU: the 2-process NCCL run needs two"
    fi

    COMBO=(recipes/smoke.yaml "teacher.cache_dir=$WORK/teachers" train.precision=fp16 train.clip_grad=1.0
        train.ema_decay=0.99 train.compile=true teacher.output_cache.enabled=true
        "teacher.output_cache.dir=$WORK/outputs" run.export=false)
    step fp16_clip_ema_compile_cache 120 bash -c '"$@" "run.output_dir='"$WORK"'/combo_fill" && "$@" \
        "run.output_dir='"$WORK"'/combo_replay" teacher.output_cache.verify_every=1' _ $PY -m distill.train "${COMBO[@]}"

    step decode_4_workers 60 $PY -m distill.train recipes/cifar10_gpu.yaml "run.output_dir=$WORK/runs" \
        run.name=decode "${SYNTH[@]}" data.synthetic.train_per_class=512 data.synthetic.val_per_class=100 \
        data.store=decode data.num_workers=4 "${GPU_TEACHER[@]}" "teacher.cache_dir=$WORK/teachers" \
        train.epochs=1 train.warmup_epochs=0 run.export=false

    step bench 75 $PY -m distill.bench --student deit_small_distilled_patch16_224 --teacher regnety_160 \
        --img-size 224 --num-classes 1000 --batch-size 128 --warmup 3 --steps 10 --repeats 3 --json "$WORK/bench.json"

    step profile_step 60 $PY -m distill.profile_step recipes/cifar10_gpu.yaml "${SYNTH[@]}" \
        --precisions fp32,bf16 --attention fused,manual --steps 10 --repeats 3 --json "$WORK/profile.json"
fi

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
work = out / "work"


def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_times(summary):
    if not summary:
        return None
    keep = ("wall_time_s", "train_time_s", "throughput_train_img_s", "precision", "world_size", "teacher_cache")
    result = {k: summary.get(k) for k in keep}
    if summary.get("wall_time_s") and summary.get("train_time_s") is not None:
        result["outside_training_s"] = summary["wall_time_s"] - summary["train_time_s"]
    result["final"] = {k: v for k, v in summary.get("final", {}).items() if k.startswith("val/")}
    return result


try:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as exc:  # the check's JSON is written whatever broke
    gpu = f"torch failed: {exc}"
status = dict(line.split() for line in (out / "status.txt").read_text().splitlines() if line.strip())
skipped = dict(line.split(": ", 1) for line in (out / "skipped.txt").read_text().splitlines() if line.strip())
bench = read(work / "bench.json")
profile = read(work / "profile.json")
result = {
    "gpu": gpu,
    "exit_status": {k: int(v) for k, v in status.items()},
    "timed_out": [k for k, v in status.items() if v in ("124", "137")],
    "skipped": skipped,
    "waits": read(work / "waits.json"),
    "recipe_run": run_times(read(work / "runs" / "waits" / "summary.json")),
    "decode_4_workers": run_times(read(work / "runs" / "decode" / "summary.json")),
    "nccl_two_processes": run_times(read(work / "nccl" / "smoke" / "summary.json")),
    "fp16_clip_ema_compile_cache": {
        "fill": run_times(read(work / "combo_fill" / "smoke" / "summary.json")),
        "replay": run_times(read(work / "combo_replay" / "smoke" / "summary.json")),
    },
    "bench": bench and {
        "configurations": [
            {k: row.get(k) for k in ("key", "precision", "img_s", "fraction_of_peak", "peak_memory_mb")}
            for row in bench["configurations"]
        ],
        "ratios": bench.get("ratios"), "matmul_peak_gflops": bench.get("matmul_peak_gflops"),
    },
    "profile_step": profile and {
        key: {k: v.get(k) for k in ("img_s", "fraction_of_peak")} | {"share": (v.get("profile") or {}).get("share")}
        for key, v in profile["variants"].items()
    },
}
(out / "check.json").write_text(json.dumps(result, indent=1, default=str))
print(f"gpu_check: wrote {out / 'check.json'}; logs in {out}")
for name, why in skipped.items():
    print(f"gpu_check: skipped {name}: {why}")
EOF
# Success when every step that ran exited 0.
! grep -qv ' 0$' "$STATUS"
