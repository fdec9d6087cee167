"""`generate_dataset` / `rollserve generate --replicas N` through a RolloutCluster on a real local Ray.

The cluster is one more engine for the dataset loop: the rows equal one `LLM`'s on the same seeded
prompts (tokens exactly, logprobs within 1e-4: tests/cluster/test_cluster.py says why not bitwise),
a dataset begun by one engine is finished by the other, and the CLI keeps its resume guarantees
through a SIGKILL. The CLI subprocesses join this test's Ray (RAY_ADDRESS), so no second Ray starts.
"""

import json
import shutil
import time

import pytest

ray = pytest.importorskip("ray")

from helpers import (dataset_rows, kill_then_resume, ray_session, run_cli,  # noqa: E402,F401 (fixtures)
                     tiny_model_dir)
from rollserve import LLM, SamplingParams  # noqa: E402
from rollserve.cli import load_callable  # noqa: E402
from rollserve.cluster import RolloutCluster  # noqa: E402
from rollserve.dataset import generate_dataset  # noqa: E402

NUM_PROMPTS = 24
N = 2
PARAMS = dict(n=N, temperature=1.0, max_tokens=12, logprobs=0, seed=1234)
ENGINE = dict(kv_cache_memory="8MiB", max_num_seqs=4)
TOL = 1e-4
SLOW_REWARD = '''
import time

def slow_length(prompt, completion, topic):
    time.sleep(0.05)  # makes the run last long enough to be killed in the middle
    return float(len(completion)) + len(topic)
'''


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cluster-dataset")
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Tell me fact number {i} about rivers.", "topic": "rivers" * (i % 3)}) + "\n"
        for i in range(NUM_PROMPTS)))
    (root / "slow_rewards.py").write_text(SLOW_REWARD)
    return root, f"{root / 'slow_rewards.py'}:slow_length"


def make(engine, job, out, **kwargs):
    root, reward = job
    return generate_dataset(engine, root / "prompts.jsonl", SamplingParams(**PARAMS), out, load_callable(reward),
                            batch_size=2, use_tqdm=False, reward_name=reward, **kwargs)


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model_dir):
    with RolloutCluster(str(tiny_model_dir), 2, **ENGINE) as c:
        yield c


@pytest.fixture(scope="module")
def reference(job, tiny_model_dir):
    """The dataset from one LLM in this process."""
    out = job[0] / "single"
    assert make(LLM(str(tiny_model_dir), **ENGINE), job, out).complete
    return out


def assert_same_rows(got, want):
    assert [(r["prompt_index"], r["sample_index"]) for r in got] == \
        [(i, j) for i in range(NUM_PROMPTS) for j in range(N)]  # each prompt, each sample, exactly once
    for a, b in zip(got, want, strict=True):
        where = (a["prompt_index"], a["sample_index"])
        assert a["completion_token_ids"] == b["completion_token_ids"], where
        assert (a["completion"], a["reward"], a["prompt_token_ids"]) == \
            (b["completion"], b["reward"], b["prompt_token_ids"]), where
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=TOL), where


def test_a_cluster_writes_the_rows_one_llm_writes_and_finishes_a_dataset_it_began(cluster, job, reference):
    out = job[0] / "cluster"
    summary = make(cluster, job, out)
    assert summary.complete and summary.num_prompts_generated == NUM_PROMPTS
    assert all(s.requests > 0 for s in cluster.stats())  # both replicas generated
    assert_same_rows(dataset_rows(out), dataset_rows(reference))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == json.loads((reference / "manifest.json").read_text())["config"]

    begun = job[0] / "begun-by-one-llm"
    shutil.copytree(reference, begun)
    for shard in sorted(begun.glob("train-*.parquet"))[-3:]:
        shard.unlink()  # as if the single-engine run had been killed 6 prompts before the end
    resumed = make(cluster, job, begun)
    assert (resumed.num_prompts_resumed, resumed.num_prompts_generated) == (NUM_PROMPTS - 6, 6)
    assert_same_rows(dataset_rows(begun), dataset_rows(reference))
    assert not cluster.has_unfinished()


def test_the_step_api_names_requests_by_the_callers_ids_and_abort_stops_one_on_its_replica(cluster):
    before = sum(s.metrics["generation_tokens"] for s in cluster.stats())
    cluster.add_request([1, 2, 3], SamplingParams(max_tokens=240, ignore_eos=True), "long")
    cluster.add_request([4, 5, 6], SamplingParams(max_tokens=1), "short")
    with pytest.raises(ValueError, match="request_id='long' is already in use"):
        cluster.add_request([7], None, "long")
    assert cluster.num_unfinished == 2
    finished = []
    while not finished:
        finished = cluster.step()
    assert [(o.request_id, o.output.request_id, o.finished) for o in finished] == [("short", "short", True)]
    cluster.abort("long")
    assert not cluster.has_unfinished() and cluster.step() == []
    deadline = time.monotonic() + 60
    while any(s.metrics["num_running"] + s.metrics["num_waiting"] for s in cluster.stats()):
        assert time.monotonic() < deadline, "the replica kept running the aborted request"
        time.sleep(0.05)
    assert sum(s.metrics["generation_tokens"] for s in cluster.stats()) - before < 1 + 240


def test_cli_replicas_survive_a_sigkill_and_a_rerun_completes_each_prompt_once(ray_session, job, reference,
                                                                               tiny_model_dir, run_cli, monkeypatch):
    root, reward = job
    out = root / "cli"

    def args(*extra):
        sampling = [f"--{k.replace('_', '-')}={v}" for k, v in PARAMS.items()]
        engine = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
        return ["--model", tiny_model_dir, "--prompts", root / "prompts.jsonl", "--out", out, *sampling, *engine,
                "--batch-size", 2, "--reward", reward, "--no-progress", "--replicas", 2, *extra]

    address = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)  # cli_env() copies os.environ
    resumed = kill_then_resume(run_cli, args(), out, NUM_PROMPTS, timeout=300)
    assert f"engines: 2 replicas on the Ray cluster at {address}" in resumed.stdout
    assert_same_rows(dataset_rows(out), dataset_rows(reference))

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # from here on, reaching Ray (or starting one) fails
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cli(*args())
    assert again.returncode == 0, again.stderr
    assert f"already complete with these parameters ({NUM_PROMPTS * N} rows" in again.stdout
    assert "the model was not loaded" in again.stdout
    changed = run_cli(*args("--temperature", "0.5"))
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "other parameters (temperature: 1.0 -> 0.5): use another output folder, or --overwrite" in changed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_bad_replica_count_is_an_argument_error_before_ray_starts(job, tiny_model_dir, run_cli, monkeypatch):
    root, _ = job
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # reaching Ray would hang, not fail
    out = root / "zero-replicas"
    bad = run_cli("--model", tiny_model_dir, "--prompts", root / "prompts.jsonl", "--out", out, "--replicas", 0)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "num_replicas=0 is invalid: must be an int >= 1" in bad.stderr
    assert not out.exists()
