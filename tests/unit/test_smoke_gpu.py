"""jobs/smoke_gpu.py without a GPU: a clear message, a RESULT line, exit status 3, no traceback
(the GPU parts themselves run only where CUDA is; see the job's docstring)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = str(ROOT / "jobs" / "smoke_gpu.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout, whatever is installed
    return subprocess.run([sys.executable, JOB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run the job itself")
def test_without_cuda_it_says_so_and_runs_nothing():
    p = _run("--parts", "vllm,learner")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "no CUDA device" in p.stdout and "Traceback" not in p.stderr
    assert p.stdout.strip().splitlines()[-1] == "RESULT vllm=skip wan=- nccl=- learner=skip cuda=absent"


def test_unknown_parts_are_refused_by_name():
    p = _run("--parts", "vllm,warp")
    assert p.returncode == 2 and "unknown part(s) ['warp']" in p.stderr
