"""`rollserve generate --env MODULE:FACTORY --max-turns K`: one row per multi-turn episode, with the dataset
command's guarantees: SIGKILL + rerun gives every episode exactly once and equals an uninterrupted run; a rerun
of a finished dataset loads no model; other parameters (env, max_turns included) are named; a bad --env is one
line naming the flag."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from rollserve import LLM, SamplingParams
from rollserve.cli import load_env_factory, main
from rollserve.dataset import generate_dataset
from rollserve.dataset.shards import episode_schema

from helpers import dataset_rows, kill_then_resume, one_thread, run_cli, tiny_model_dir  # noqa: F401 (fixtures)

NUM_PROMPTS = 16
N = 2
MAX_TURNS = 3
# The scripted guess-the-number game of tests/agents, slowed down so that the run can be killed in the middle.
SLOW_ENV = '''
import re
import time


class SlowGuess:
    def reset(self, prompt, target):
        self.target = target

    def step(self, text, ids):
        time.sleep(0.05)
        found = re.search(r"-?\\d+", text)
        if found is None:
            return {"role": "user", "content": "no number found"}, 0.0, False
        if int(found.group()) == self.target:
            return None, 1.0, True
        return {"role": "user", "content": "higher" if int(found.group()) < self.target else "lower"}, 0.1, False


def not_an_env():
    return 42
'''
PARAMS = dict(n=N, temperature=1.0, max_tokens=8, seed=99)
# One sequence a step and no prefix cache, in every run: the CPU kernels' last bits depend on the batch's
# shape, and the sampler draws by inverse CDF, whose pick moves to a neighbouring token id when the
# cumulative sum moves by an ulp; exact equality across runs needs each sequence computed alone.
ENGINE = dict(max_num_seqs=1, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("episodes")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Guess my number, game {i}: one number.", "target": i})
                               + "\n" for i in range(NUM_PROMPTS)))
    (root / "slow_env.py").write_text(SLOW_ENV)
    env = f"{root / 'slow_env.py'}:SlowGuess"

    def args(out, *extra):
        sampling = [f"--{k.replace('_', '-')}={v}" for k, v in PARAMS.items()]
        return ["--model", tiny_model_dir, "--prompts", prompts, "--out", out, *sampling, "--batch-size", 2,
                "--max-num-seqs", 1, "--no-prefix-caching", "--env", env, "--max-turns", MAX_TURNS, "--no-progress",
                *extra]

    return root, args, env


@pytest.fixture(scope="module")
def reference(job, tiny_model_dir):
    """The uninterrupted run, in this process."""
    root, _, env = job
    llm = LLM(tiny_model_dir, **ENGINE)
    summary = generate_dataset(llm, root / "prompts.jsonl", SamplingParams(**PARAMS), root / "reference",
                               batch_size=2, use_tqdm=False, env_factory=load_env_factory(env), max_turns=MAX_TURNS,
                               env_name=env)
    assert summary.complete and summary.num_rows == NUM_PROMPTS * N
    return llm, root / "reference"


def test_episodedataset_rows(reference):
    llm, out = reference
    assert pq.read_schema(out / "train-00000.parquet").remove_metadata() == episode_schema()
    tok = llm.get_tokenizer()
    for r in dataset_rows(out):
        n_prompt = r["num_prompt_tokens"]
        assert r["prompt"] == tok.decode(r["token_ids"][:n_prompt])
        assert r["mask"][:n_prompt] == [0] * n_prompt and sum(r["mask"]) > 0
        assert [lp is not None for lp in r["logprobs"]] == [bool(m) for m in r["mask"]]
        assert [v is not None for v in r["weight_versions"]] == [bool(m) for m in r["mask"]]
        assert len(r["rewards"]) == r["num_turns"] and r["reward"] == pytest.approx(sum(r["rewards"]))
        assert r["finish_reason"] in ("done", "max_turns", "length") and r["error"] is None
        messages = json.loads(r["messages"])
        assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
        assert sum(m["role"] == "assistant" for m in messages) == r["num_turns"] <= MAX_TURNS
    assert sum(r["num_turns"] > 1 for r in dataset_rows(out)) > NUM_PROMPTS  # multi-turn, not one completion each


def test_sigkill_then_rerun_equals_uninterrupted_run(job, reference, run_cli):
    root, args, _ = job
    out = root / "killed"
    kill_then_resume(run_cli, args(out), out, NUM_PROMPTS)

    got, want = dataset_rows(out), dataset_rows(reference[1])
    keys = [(r["prompt_index"], r["sample_index"]) for r in got]
    assert keys == [(i, j) for i in range(NUM_PROMPTS) for j in range(N)]  # each episode exactly once
    for a, b in zip(got, want):
        where = (a["prompt_index"], a["sample_index"])
        for name in ("token_ids", "mask", "rewards", "num_turns", "finish_reason", "messages", "weight_versions"):
            assert a[name] == b[name], (name, where)
        sampled = [(x, y) for x, y, m in zip(a["logprobs"], b["logprobs"], a["mask"]) if m]
        assert [x for x, _ in sampled] == pytest.approx([y for _, y in sampled], abs=1e-5), where
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["env"] == args(out)[args(out).index("--env") + 1]
    assert manifest["config"]["max_turns"] == MAX_TURNS and manifest["config"]["chat"] is True


def test_finished_rerun_and_mismatch_are_told_before_the_model_loads(job, tmp_path, tiny_model_dir, run_cli):
    root, _, env = job
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    args = ["--model", model, "--prompts", root / "prompts.jsonl", "--out", out, "--n", 1, "--max-tokens", 4,
            "--env", env, "--max-turns", 2, "--no-progress", "--dtype", "fp32"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    (model / "model.safetensors").write_bytes(b"not weights")  # from here on, loading the model fails
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert f"already complete with these parameters ({NUM_PROMPTS} rows, {NUM_PROMPTS} prompts)" in again.stdout
    assert "the model was not loaded" in again.stdout

    turns = run_cli(*args[:args.index("--max-turns") + 1], 3, *args[args.index("--max-turns") + 2:])
    assert turns.returncode == 2 and "Traceback" not in turns.stderr
    assert "other parameters (max_turns: 2 -> 3): use another output folder" in turns.stderr

    other_env = f"{root / 'slow_env.py'}:Other"
    (root / "slow_env.py").write_text(SLOW_ENV + "\nOther = SlowGuess\n")
    swapped = run_cli(*[other_env if a == env else a for a in args])
    assert swapped.returncode == 2 and f"other parameters (env: {env!r} -> {other_env!r})" in swapped.stderr

    plain = run_cli(*args[:args.index("--env")], "--no-progress", "--dtype", "fp32")  # no --env: completions
    assert plain.returncode == 2 and f"env: {env!r} -> None" in plain.stderr and "max_turns: 2 -> None" in plain.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("spec, message", [
    ("slow_env", "--env 'slow_env': expected MODULE:FACTORY (e.g. my_envs:GuessTheNumber)"),
    ("no_such_module_here:make", "--env 'no_such_module_here:make': cannot import 'no_such_module_here': "
                                 "ModuleNotFoundError"),
    ("{root}/slow_env.py:Missing", "--env '{root}/slow_env.py:Missing': '{root}/slow_env.py' has no attribute "
                                   "'Missing'"),
    ("{root}/slow_env.py:not_an_env", "--env '{root}/slow_env.py:not_an_env': it made a int object, which has "
                                      "no reset and no step method"),
])
def test_bad_env_is_one_line_naming_the_flag(job, capsys, spec, message):
    root, args, _ = job
    argv = [str(a) for a in args(root / "never")]
    argv[argv.index("--env") + 1] = spec.format(root=root)
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rollserve generate: error: " + message.format(root=root)), err
    assert err.count("\n") == 1
    assert not (root / "never").exists()


def test_env_with_reward_is_refused(job, capsys):
    root, args, _ = job
    argv = [str(a) for a in args(root / "never")] + ["--reward", "x:y"]
    assert main(["generate", *argv]) == 2
    assert "--reward cannot be combined with --env" in capsys.readouterr().err


def test_env_with_replicas_is_refused(job, capsys):
    root, args, _ = job
    argv = [str(a) for a in args(root / "never")] + ["--replicas", "2"]
    assert main(["generate", *argv]) == 2
    assert "--replicas cannot be combined with --env" in capsys.readouterr().err
