"""TRL's GRPOTrainer with rollserve under DeepSpeed ZeRO-3: two gloo ranks on the CPU, real processes.

Each rank holds its own engine and generates its own prompts (TRL's colocate layout);
every rank joins the gathers of each weight sync. After each step every rank's engine
must have the trainer's gathered weights (fingerprints), and TRL's own gauge
`sampling/sampling_logp_difference/max` must stay at fp32 noise. See trl_dist_worker.py.
"""

import json
from pathlib import Path

import pytest

import processes  # tests/processes.py

pytest.importorskip("trl")

WORKER = Path(__file__).with_name("trl_dist_worker.py")
LOGP_TOLERANCE = 1e-4
STEPS = 3


def run_ranks(tmp_path) -> list[dict]:
    outs = processes.run_ranks(WORKER, 2, [str(tmp_path)], timeout=600)
    results = []
    for out in outs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out[-3000:]
        results.append(json.loads(lines[0][len("RESULT "):]))
    return results


def test_grpo_zero3_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    results = run_ranks(tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["steps"] == STEPS
        assert r["partitioned"]  # the trainer's parameters really are partitioned
        assert not r["zero_copy"] and not r["engine_is_trainer"]  # each rank's engine holds a full copy
        assert [s["version"] for s in r["seen"]] == list(range(1, STEPS + 1))
        assert all(s["engine"] == s["trainer"] for s in r["seen"]), r["seen"]
        assert len({s["trainer"] for s in r["seen"]}) == STEPS  # training moved the weights each step
        # TRL gathers the metric over the ranks: both engines' logprobs are the trainer's
        assert len(r["logp_max"]) == STEPS and max(r["logp_max"]) < LOGP_TOLERANCE, r["logp_max"]
    first, second = results
    # both ranks' engines hold the same weights, but each generated its own prompts
    assert [s["engine"] for s in first["seen"]] == [s["engine"] for s in second["seen"]]
    assert all(a["prompts"] != b["prompts"] for a, b in zip(first["seen"], second["seen"]))
