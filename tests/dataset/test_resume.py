"""Resume after SIGKILL through the CLI: the final dataset equals an uninterrupted run, row for row; a rerun
with other parameters is refused and changes nothing; a rerun of a finished dataset loads no model."""

import json
import shutil

import pytest

from rollserve import LLM, SamplingParams
from rollserve.cli import load_callable
from rollserve.dataset import OutputDirError, generate_dataset

from helpers import dataset_rows, kill_then_resume, one_thread, run_cli, tiny_model_dir  # noqa: F401 (fixtures)

NUM_PROMPTS = 24
N = 2
SLOW_REWARD = '''
import time

def slow_length(prompt, completion, topic):
    time.sleep(0.05)  # makes the run last long enough to be killed in the middle
    return float(len(completion)) + len(topic)
'''


PARAMS = dict(n=N, temperature=1.0, max_tokens=12, logprobs=0, seed=1234)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about rivers.", "topic": "rivers" * (i % 3)})
                               + "\n" for i in range(NUM_PROMPTS)))
    (root / "slow_rewards.py").write_text(SLOW_REWARD)
    reward = f"{root / 'slow_rewards.py'}:slow_length"

    def args(out, *extra):
        sampling = [f"--{k.replace('_', '-')}={v}" for k, v in PARAMS.items()]
        return ["--model", tiny_model_dir, "--prompts", prompts, "--out", out, *sampling, "--batch-size", 2,
                "--max-num-seqs", 4, "--reward", reward, "--no-progress", *extra]

    return root, args, reward


@pytest.fixture(scope="module")
def reference(job, tiny_model_dir):
    """The uninterrupted run, in this process (default engine sizes: other batches than the CLI's)."""
    root, _, reward = job
    llm = LLM(tiny_model_dir)
    summary = generate_dataset(llm, root / "prompts.jsonl", SamplingParams(**PARAMS), root / "reference",
                               load_callable(reward), batch_size=2, use_tqdm=False, reward_name=reward)
    assert summary.complete and summary.num_rows == NUM_PROMPTS * N
    return llm, root / "reference"


def test_sigkill_then_rerun_equals_uninterrupted_run(job, reference, run_cli):
    root, args, _ = job
    out = root / "killed"
    kill_then_resume(run_cli, args(out), out, NUM_PROMPTS)

    got, want = dataset_rows(out), dataset_rows(reference[1])
    keys = [(r["prompt_index"], r["sample_index"]) for r in got]
    assert keys == [(i, j) for i in range(NUM_PROMPTS) for j in range(N)]  # each exactly once
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["completion_token_ids"] == b["completion_token_ids"], (a["prompt_index"], a["sample_index"])
        assert a["completion"] == b["completion"] and a["reward"] == b["reward"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["prompts_done"] == NUM_PROMPTS and manifest["counts"]["rows"] == NUM_PROMPTS * N


def test_rerun_with_other_parameters_is_refused(job, reference):
    root, _, reward = job
    llm, out = reference
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    reward_fn = load_callable(reward)
    changed = SamplingParams(**{**PARAMS, "temperature": 0.5})
    with pytest.raises(OutputDirError, match=r"other parameters \(temperature: 1\.0 -> 0\.5\): .* --overwrite"):
        generate_dataset(llm, root / "prompts.jsonl", changed, out, reward_fn, batch_size=2, use_tqdm=False,
                         reward_name=reward)
    with pytest.raises(OutputDirError, match=r"other parameters \(format: 'parquet' -> 'jsonl'\)"):
        generate_dataset(llm, root / "prompts.jsonl", SamplingParams(**PARAMS), out, reward_fn, batch_size=2,
                         use_tqdm=False, reward_name=reward, output_format="jsonl")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    again = generate_dataset(llm, root / "prompts.jsonl", SamplingParams(**PARAMS), out, reward_fn, batch_size=2,
                             use_tqdm=False, reward_name=reward)  # same parameters: nothing left to do
    assert again.num_prompts_generated == 0 and again.complete

    short = SamplingParams(**{**PARAMS, "temperature": 0.5, "max_tokens": 4})
    replaced = generate_dataset(llm, root / "prompts.jsonl", short, out, reward_fn, batch_size=2, use_tqdm=False,
                                reward_name=reward, overwrite=True)
    assert replaced.num_prompts_generated == NUM_PROMPTS
    rows = dataset_rows(out)
    assert len(rows) == NUM_PROMPTS * N and max(len(r["completion_token_ids"]) for r in rows) <= 4


def test_finished_rerun_and_mismatch_are_told_before_the_model_loads(tmp_path, tiny_model_dir, run_cli):
    model, prompts, out = tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(3)))
    args = ["--model", model, "--prompts", prompts, "--out", out, "--n", 2, "--max-tokens", 4, "--no-progress",
            "--dtype", "fp32"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    (model / "model.safetensors").write_bytes(b"not weights")  # from here on, loading the model fails
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already complete with these parameters (6 rows, 3 prompts)" in again.stdout
    assert "the model was not loaded" in again.stdout

    changed = run_cli(*args, "--temperature", "0.7", "--max-tokens", "4")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "other parameters (temperature: 1.0 -> 0.7): use another output folder, or --overwrite" in changed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    replaced = run_cli(*args, "--overwrite")  # goes on to load the model: proof the reruns above did not
    assert replaced.returncode != 0 and "SafetensorError" in replaced.stderr, replaced.stderr
