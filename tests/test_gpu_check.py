"""The GPU check's CPU parts: `make gpu-check` says there is no CUDA device and exits 2, and its
training-step benchmark runs on the CPU (small preset) and prints its one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the check itself runs")
def test_without_cuda_the_gpu_check_says_so_and_checks_nothing():
    done = subprocess.run(
        ["make", "-s", "gpu-check", f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu-check: no CUDA device" in done.stderr and "nothing checked" in done.stderr


def test_the_step_benchmark_prints_rate_data_wait_and_flops(tiny_dataset):
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_step.py", "--data", str(tiny_dataset)]
        + ["--config", "small", "--device", "cpu", "--steps", "2", "--warmup", "1"]
        + ["--batch", "2", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("gpu_step: small preset on CPU") and "clips/s, data wait" in line
    assert "GFLOPs a clip forward, MFU n/a" in line
