"""Importing rollserve (the engine, the server, the TRL integration) imports no DeepSpeed: its "Setting
accelerator to CPU" warning belongs to ZeRO-3 runs only (`weight_sync.sources` imports it there)."""

import subprocess
import sys

from helpers import REPO, cli_env

MODULES = ["rollserve", "rollserve.llm", "rollserve.serve.server", "rollserve.serve.client", "rollserve.dataset",
           "rollserve.weight_sync.sources", "rollserve.integrations.trl"]


def test_importing_rollserve_imports_no_deepspeed():
    code = f"import sys\nfor m in {MODULES!r}:\n    __import__(m)\nprint('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**cli_env(), "TRL_EXPERIMENTAL_SILENCE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
    assert "Setting accelerator" not in result.stderr, result.stderr
