"""Distributed sources with real processes: two gloo ranks on the CPU (DeepSpeed ZeRO-3, ZeRO-3 + LoRA, FSDP2).

Each mode trains a tiny Llama 2 steps across the ranks and syncs it into an
engine on rank 0 through `iter_named_weights` (see dist_worker.py); the engine
must then be bit-equal to the full state dict the framework itself
consolidates, with equal fingerprints and the greedy outputs of a fresh engine.
"""

import json
from pathlib import Path

import pytest

import processes  # tests/processes.py

pytest.importorskip("deepspeed")
pytest.importorskip("peft")

WORKER = Path(__file__).with_name("dist_worker.py")
MODES = ("zero3", "zero3_lora", "fsdp2")


@pytest.fixture(scope="module")
def results():
    """Runs every mode in one pair of processes (imports and DeepSpeed's start-up dominate the time)."""
    outs = processes.run_ranks(WORKER, 2, [",".join(MODES)], timeout=900)
    lines = [line for line in outs[0].splitlines() if line.startswith("RESULT ")]
    return {r["mode"]: r for r in (json.loads(line[len("RESULT "):]) for line in lines)}


@pytest.mark.parametrize("mode", MODES)
def test_distributed_sync_is_exact(results, mode):
    r = results[mode]
    assert r["changed"] > 0  # training moved the weights
    assert r["bit_equal"]
    assert r["fingerprint_equal"]
    assert r["greedy_changed"]
    assert r["greedy_equals_fresh"]
    assert r["version"] == 1
