#!/usr/bin/env bash
# The GPU check, one call on a lent GPU (about 8 minutes on one GPU; CPU-only machines skip the
# GPU parts and say so):
#   1. the CUDA-marked tests (tests/test_cuda.py and the GPU variant in tests/test_trainer_setup.py):
#      every module and the EMA on the student's device, fp16 with the gradient scaler and bf16,
#      the tensor data path on the GPU, the teacher-output cache on the GPU, train.compile;
#   2. a short recipes/cifar10_gpu.yaml run on generated 32 px data (the teacher trained for one
#      epoch by the pipeline, since the recipe's teacher folder is not there);
#   3. the bench: DeiT-S/16 at 224 px with a RegNetY-16GF teacher (random weights), img/s, MFU
#      (share of the measured matmul peak) and whether the recipe's loading keeps up;
#   4. python -m distill.profile_step on the GPU recipe's step: fp32/bf16 x fused/manual attention,
#      where the time goes (its GPU branch has not run on a GPU before this script's first run).
# Figures go to one JSON file (first argument, default gpu_check.json), logs to gpu_check_logs/.
#   scripts/gpu_check.sh [OUT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
PY=${PYTHON:-.venv/bin/python}
LOGS=gpu_check_logs
WORK=$(mktemp -d)
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1

if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" != "1" ]; then
    echo "gpu_check: no GPU visible to torch: the CUDA tests, the GPU recipe run and the GPU bench are skipped"
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_trainer_setup.py::test_ema_is_on_the_gpu_with_the_student" -rs \
        > "$LOGS/tests.log" 2>&1
    tests_rc=$?
    tail -3 "$LOGS/tests.log"
    $PY - "$OUT" "$tests_rc" <<'EOF'
import json, sys
out, rc = sys.argv[1], int(sys.argv[2])
json.dump({"gpu": None, "skipped": "no GPU visible to torch", "cuda_tests_exit_status": rc}, open(out, "w"), indent=1)
print(f"gpu_check: wrote {out}")
EOF
    exit "$tests_rc"
fi

echo "gpu_check: 1/4 CUDA-marked tests"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_trainer_setup.py::test_ema_is_on_the_gpu_with_the_student" \
    --junitxml="$LOGS/tests.xml" > "$LOGS/tests.log" 2>&1
tests_rc=$?
tail -3 "$LOGS/tests.log"

echo "gpu_check: 2/4 recipes/cifar10_gpu.yaml, 2 epochs on generated data"
$PY -m distill.train recipes/cifar10_gpu.yaml run.output_dir="$WORK/runs" run.name=gpu_check \
    data.source=synthetic data.path=null data.synthetic.num_classes=10 data.synthetic.image_size=32 \
    data.synthetic.train_per_class=500 data.synthetic.val_per_class=100 data.num_workers=4 \
    teacher.checkpoint=null teacher.train.epochs=1 teacher.train.batch_size=256 \
    train.epochs=2 train.warmup_epochs=0 run.progress_every_s=10 > "$LOGS/recipe.log" 2>&1
recipe_rc=$?
tail -14 "$LOGS/recipe.log"

echo "gpu_check: 3/4 bench, DeiT-S/16 at 224 px with a RegNetY-16GF teacher"
$PY -m distill.bench --student deit_small_distilled_patch16_224 --teacher regnety_160 --img-size 224 \
    --num-classes 1000 --batch-size 128 --warmup 3 --steps 10 --repeats 3 --json "$WORK/bench.json" \
    > "$LOGS/bench.log" 2>&1
bench_rc=$?
tail -20 "$LOGS/bench.log"
$PY -m distill.bench recipes/cifar10_gpu.yaml data.source=synthetic data.path=null \
    data.synthetic.num_classes=10 data.synthetic.image_size=32 data.synthetic.train_per_class=500 \
    --warmup 3 --steps 10 --repeats 3 --json "$WORK/bench_recipe.json" > "$LOGS/bench_recipe.log" 2>&1
loading_rc=$?

echo "gpu_check: 4/4 profile_step, recipes/cifar10_gpu.yaml in fp32 and bf16, fused and manual attention"
$PY -m distill.profile_step recipes/cifar10_gpu.yaml data.source=synthetic data.path=null \
    data.synthetic.num_classes=10 data.synthetic.image_size=32 --precisions fp32,bf16 \
    --attention fused,manual --steps 10 --repeats 3 --json "$WORK/profile.json" > "$LOGS/profile.log" 2>&1
profile_rc=$?
tail -12 "$LOGS/profile.log"

$PY - "$OUT" "$WORK" "$tests_rc" "$recipe_rc" "$bench_rc" "$loading_rc" "$profile_rc" <<'EOF'
import json, sys
from pathlib import Path

import torch

out, work = sys.argv[1], Path(sys.argv[2])
rcs = dict(zip(["cuda_tests", "recipe_run", "bench", "bench_recipe", "profile_step"], map(int, sys.argv[3:])))


def read(path):
    return json.loads(path.read_text()) if path.is_file() else None


summary = read(work / "runs" / "gpu_check" / "summary.json")
bench, bench_recipe = read(work / "bench.json"), read(work / "bench_recipe.json")
profile = read(work / "profile.json")
result = {
    "gpu": torch.cuda.get_device_name(0),
    "exit_status": rcs,
    "recipe_run": summary and {
        "final": summary["final"], "wall_time_s": summary["wall_time_s"],
        "throughput_train_img_s": summary["throughput_train_img_s"], "precision": summary["precision"],
    },
    "bench": bench and {
        "configurations": [
            {k: row.get(k) for k in ("key", "precision", "img_s", "fraction_of_peak", "peak_memory_mb")}
            for row in bench["configurations"]
        ],
        "ratios": bench["ratios"], "matmul_peak_gflops": bench["matmul_peak_gflops"],
    },
    "data_loading": bench_recipe and bench_recipe.get("data_loading"),
    "profile_step": profile and {
        key: {k: v.get(k) for k in ("img_s", "fraction_of_peak")} | {"share": (v.get("profile") or {}).get("share")}
        for key, v in profile["variants"].items()
    },
}
Path(out).write_text(json.dumps(result, indent=1, default=str))
print(f"gpu_check: wrote {out}")
EOF
[ "$tests_rc" = 0 ] && [ "$recipe_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$loading_rc" = 0 ] && [ "$profile_rc" = 0 ]
