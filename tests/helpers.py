"""Fixtures and helpers shared by the dataset, CLI and server tests (imported by name: a second conftest.py
would shadow tests/conftest.py, which other test modules import by name).

- `tiny_model_dir`: a small random Llama saved with SmolLM2's tokenizer (so it reads text prompts and
  runs in milliseconds per step): what the CLI subprocess tests load.
- `run_cli`: runs `python -m rollserve.cli ...` from this checkout in a subprocess.
- `nan_update()` / `NAN_PROBLEMS`: a weight update of the tiny models that every transport must refuse
  with `WeightUpdateError(NAN_PROBLEMS)`.
- `one_thread` (autouse where imported): torch on one intra-op thread. On this 2-core machine shared
  with other jobs, two-thread torch ops stall under contention (measured: SmolLM2 generate 18 s with
  one thread, 115 s with two, load average 8); the CLI subprocesses get OMP_NUM_THREADS=1 likewise.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_llama(folder, smollm2_path, **config) -> None:
    """Saves a small random Llama (2 layers, hidden 64) with SmolLM2's tokenizer into `folder`.

    `config`: LlamaConfig fields on top of the shared ones (e.g. `tie_word_embeddings`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=tok.eos_token_id,
                      **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, smollm2_path, max_position_embeddings=256, tie_word_embeddings=True)
    return path


NAN_PROBLEMS = {"non-finite values (NaN/inf)": ["model.norm.weight"]}


def nan_update() -> list[tuple[str, torch.Tensor]]:
    """A good tensor, then a NaN one (hidden size 64): refused as a whole, so had the good one been applied
    anyway, the engine's fingerprint would show it."""
    return [("model.layers.0.input_layernorm.weight", torch.full((64,), 2.0)),
            ("model.norm.weight", torch.full((64,), float("nan")))]


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*args, timeout=120)` -> CompletedProcess of `python -m rollserve.cli generate ...` (text output)."""

    def run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                              timeout=timeout)

    return run


def kill_after_first_shard(cmd, out, timeout: float = 120) -> int:
    """Runs `cmd` and SIGKILLs it as soon as `out` holds a shard; returns its exit code."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not (out.is_dir() and any(out.glob("train-*"))):
            assert proc.poll() is None, f"the run ended before its first shard:\n{proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def dataset_rows(out) -> list[dict]:
    """Every row of the parquet shards in `out`, sorted by (prompt_index, sample_index)."""
    import pyarrow.parquet as pq

    rows = [r for shard in sorted(out.glob("train-*.parquet")) for r in pq.read_table(shard).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_index"], r["sample_index"]))


def kill_then_resume(run_cli, args, out, num_prompts: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `rollserve generate *args` (writing to `out`), SIGKILLs it once its first shard is written, then
    reruns it to the end; returns the rerun.

    Checks what every resumed run must show: the kill landed between the first shard and the end, with the
    manifest still incomplete; the rerun succeeded, said how many prompts it resumed and left no temporary
    file; the manifest is then complete, after two runs.
    """
    assert kill_after_first_shard(cli_command(*args), out, timeout=timeout) == -signal.SIGKILL
    done_after_kill = {r["prompt_index"] for r in dataset_rows(out)}
    assert 0 < len(done_after_kill) < num_prompts, "the kill must land between the first shard and the end"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    resumed = run_cli(*args, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_after_kill)} resumed" in resumed.stdout
    assert not list(out.glob(".*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and len(manifest["runs"]) == 2
    return resumed


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "rollserve.cli", "generate", *map(str, args)]


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")  # a 2-core machine shared with the test process and other jobs
    return env


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the test process (tests/cluster, the TRL cluster test): Ray starts in ~10 s on
    this machine, so the first module that asks starts it and Ray stops it at exit. Its CPUs are logical
    (placement only): room for a 2-replica cluster, a TRL test's 2 replicas and a lone replica."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False)
    return ray
