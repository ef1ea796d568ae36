#!/usr/bin/env bash
# `make gpu-check`: the project's checks for a CUDA machine, in one command (under 8 minutes on
# one H100), ending with one summary line:
#   1. the `gpu` tests (tests/train/test_loop_cuda.py: bf16, channels-last-3d, DDP on CUDA);
#   2. the paper preset's bf16 training step with the loader in the loop, over a uint8 frame
#      store of the synthetic dataset (benchmarks/gpu_step.py: clips/s, data wait, MFU);
#   3. a 2-trial study whose trials share one GPU at 0.5 each (search_spaces/gpu_check.yaml).
# Everything it writes goes to a temporary folder (its own MG_RAY_HOME), removed at the end.
# Without a CUDA device it says so and exits 2, having checked nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: no CUDA device (torch.cuda.is_available() is False with $PY): nothing checked; run it on a CUDA machine" >&2
    exit 2
fi
start=$SECONDS
work=$(mktemp -d -t mg-ray-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
export MG_RAY_HOME=$work/home
unset MLFLOW_TRACKING_URI
cpus=$(nproc)

echo "== 1/3 gpu tests"
tests=$("$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tail -1) \
    || { echo "gpu-check: FAIL: gpu tests: $tests"; exit 1; }
echo "$tests"

echo "== 2/3 paper preset bf16 step, loader in the loop"
"$PY" -m mg_ray.cli synth --out "$work/synth" --subjects 4 --clips-per-class 4 --workers "$cpus" >/dev/null
"$PY" -m mg_ray.cli prepare --src "$work/synth" --out "$work/store" --store uint8 --workers "$cpus" >/dev/null
step=$("$PY" benchmarks/gpu_step.py --data "$work/store" --workers $((cpus > 2 ? cpus - 2 : 1)) 2>&1 | tail -1) \
    || { echo "gpu-check: FAIL: gpu_step: $step"; exit 1; }
echo "$step"

echo "== 3/3 two trials sharing one GPU at 0.5 each"
study_start=$SECONDS
"$PY" jobs/tune.py --space search_spaces/gpu_check.yaml --data "$work/synth" --no-promote \
    > "$work/study.log" 2>&1 || { tail -40 "$work/study.log"; echo "gpu-check: FAIL: the study failed"; exit 1; }
study="2-trial study at 0.5 GPU each finished in $((SECONDS - study_start)) s"
echo "$study"

echo "gpu-check: PASS in $((SECONDS - start)) s | tests: $tests | ${step#gpu_step: } | $study"
