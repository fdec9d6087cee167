"""Every Triton kernel builds for a Hopper GPU (sm_90) down to a cubin, here without a GPU (compile_for_gpu.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled for sm_90") == 11, done.stdout
