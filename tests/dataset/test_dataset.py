"""generate_dataset end to end: SmolLM2 rows, schema and logprobs against the HF model; JSONL output; rewards
(batched in the writer, errors naming the row, shards kept, resumable); the engine kept fed."""

import json

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.dataset import RewardError, generate_dataset, prompt_seed
from rollserve.dataset.shards import arrow_schema

from helpers import dataset_rows, one_thread, tiny_model_dir  # noqa: F401 (fixtures)

SMOL_KV = 128 * 1024**2
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "What is 12 times 7?", "Name a famous painter.", "Why is the sky blue?", "Say hello in Spanish.",
    "What is a noun?", "Give me a fruit.", "How many days are in a week?",
]
MAX_TOKENS = 12
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(smollm2_path, dtype="float32", kv_cache_memory=SMOL_KV)


def _hf_logprobs(model, prompt: list[int], completions: list[list[int]]) -> list[torch.Tensor]:
    """log_softmax(logits / T) of each completion's tokens, from one right-padded forward of the HF model."""
    width = len(prompt) + max(map(len, completions))
    ids = torch.tensor([prompt + c + [0] * (width - len(prompt) - len(c)) for c in completions])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float() / TEMPERATURE, dim=-1)
    start = len(prompt) - 1
    return [logp[k, start + torch.arange(len(c)), torch.tensor(c, dtype=torch.long)] for k, c in enumerate(completions)]


def test_smollm2_end_to_end(smol, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [q for q in QUESTIONS] + [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 10 strings, then 10 message lists
    params = SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, logprobs=0, seed=3)
    out = tmp_path / "out"

    summary = generate_dataset(smol, prompts, params, out, batch_size=8, use_tqdm=False)

    assert summary.complete and summary.num_rows == 80 and summary.num_prompts_generated == 20
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.parquet",
                                                     "train-00001.parquet", "train-00002.parquet"]
    assert pq.read_schema(out / "train-00000.parquet").remove_metadata() == arrow_schema(with_reward=False)
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert loaded.num_rows == 80 and "reward" not in loaded.column_names
    got = dataset_rows(out)
    assert [(r["prompt_index"], r["sample_index"]) for r in got] == [(i, j) for i in range(20) for j in range(4)]
    tok = smol.get_tokenizer()
    for r in got:
        i = r["prompt_index"]
        if i < 10:  # plain text: the prompt as given
            assert r["prompt"] == QUESTIONS[i] and r["prompt_token_ids"] == tok(QUESTIONS[i]).input_ids
        else:  # chat: the rendered template
            text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i - 10]}], tokenize=False,
                                           add_generation_prompt=True)
            assert r["prompt"] == text and r["prompt_token_ids"] == tok(text, add_special_tokens=False).input_ids
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert r["finish_reason"] in ("stop", "length") and r["weight_version"] == 0
        assert (r["finish_reason"] == "length") == (len(r["completion_token_ids"]) == MAX_TOKENS)
        assert r["cumulative_logprob"] == pytest.approx(sum(r["logprobs"]), abs=1e-4)
    for i in range(20):
        samples = got[4 * i:4 * i + 4]
        ref = _hf_logprobs(smol.model, samples[0]["prompt_token_ids"], [r["completion_token_ids"] for r in samples])
        for r, want in zip(samples, ref):
            assert torch.tensor(r["logprobs"]) == pytest.approx(want, abs=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["rows"] == 80
    assert manifest["config"]["sampling_params"]["seed"] == 3 and manifest["config"]["dtype"] == "float32"
    assert manifest["runs"][0]["completion_tokens"] == sum(len(r["completion_token_ids"]) for r in got)

    # Prompt i is sampled with seed prompt_seed(3, i), whatever else is in the batch.
    some = [0, 7, 13]
    direct = smol.generate([got[4 * i]["prompt_token_ids"] for i in some],
                           [SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=prompt_seed(3, i))
                            for i in some], use_tqdm=False)
    assert [c.token_ids for o in direct for c in o.outputs] == [got[4 * i + j]["completion_token_ids"]
                                                               for i in some for j in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(tiny_model_dir)


def _write_prompts(path, count: int) -> None:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": str(i)}) + "\n" for i in range(count)))


def test_jsonl_output_and_rewards_in_batches(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, 6)
    calls = []

    def reward(prompt, completion, answer):
        calls.append(prompt)
        return len(completion) + int(answer)

    out = tmp_path / "out"
    summary = generate_dataset(tiny, prompts, SamplingParams(n=3, max_tokens=5, logprobs=0, seed=0), out, reward,
                               batch_size=4, output_format="jsonl", use_tqdm=False)

    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.jsonl", "train-00001.jsonl"]
    loaded = datasets.load_dataset("json", data_dir=str(out), split="train")
    assert loaded.num_rows == 18 and set(loaded.column_names) == set(arrow_schema(with_reward=True).names)
    rows = sorted(loaded, key=lambda r: (r["prompt_index"], r["sample_index"]))
    assert [r["reward"] for r in rows] == [len(r["completion"]) + r["prompt_index"] for r in rows]
    assert len(calls) == 18 and summary.mean_reward == pytest.approx(sum(r["reward"] for r in rows) / 18)
    assert sum(summary.finish_reasons.values()) == 18
    assert "mean reward" in str(summary) and "18 completions" in str(summary)


def test_reward_error_names_the_row_keeps_shards_and_resumes(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, 12)
    params = SamplingParams(max_tokens=4, seed=0)
    out = tmp_path / "out"

    def broken(prompt, completion, answer):
        if answer == "9":
            raise KeyError("no grader for 9")
        return 1.0

    with pytest.raises(RewardError, match=rf"reward function r failed on {prompts}:10 \(prompt_index=9, "
                                          r"sample_index=0\): KeyError"):
        generate_dataset(tiny, prompts, params, out, broken, batch_size=2, use_tqdm=False, reward_name="r")
    kept = dataset_rows(out)
    assert kept, "the shards before the failing one are kept"
    assert 9 not in {r["prompt_index"] for r in kept}
    assert not list(out.glob(".*tmp"))
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not tiny.engine.has_unfinished_requests()

    summary = generate_dataset(tiny, prompts, params, out, lambda prompt, completion, answer: 1.0, batch_size=2,
                               use_tqdm=False, reward_name="r")
    assert summary.num_prompts_resumed == len({r["prompt_index"] for r in kept})
    assert summary.complete and [r["prompt_index"] for r in dataset_rows(out)] == list(range(12))


def test_reward_must_return_a_finite_number(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, 2)
    with pytest.raises(RewardError, match=r"returned 'yes' on .*prompts.jsonl:1 .*must be a finite number"):
        generate_dataset(tiny, prompts, SamplingParams(max_tokens=2), tmp_path / "out",
                         lambda prompt, completion, answer: "yes", use_tqdm=False)


def test_engine_is_kept_fed(tiny, tmp_path, monkeypatch):
    """Requests are added as slots free up: never more than 2 x max_num_seqs sequences, never an empty engine
    while prompts remain."""
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, 40)
    engine = tiny.engine
    monkeypatch.setattr(engine.config, "max_num_seqs", 4)
    monkeypatch.setattr(engine.scheduler, "max_num_seqs", 4)
    in_flight, step = [], engine.step

    def counting_step():
        in_flight.append(len(engine.requests))
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    generate_dataset(tiny, prompts, SamplingParams(n=2, max_tokens=3, seed=0), tmp_path / "out", use_tqdm=False)
    first_drop = next(k for k, c in enumerate(in_flight) if c < 4)
    assert set(in_flight[:first_drop]) == {4}  # 2 x max_num_seqs sequences / n, refilled at every step
    assert first_drop > 10 and in_flight[first_drop:] == sorted(in_flight[first_drop:], reverse=True)  # then the tail


def test_update_weights_during_generate_dataset_lands_between_steps(tiny_model_dir, tmp_path):
    """A weight update from another thread waits for a step boundary (the step lock), and the rows say which
    weights produced them: prompts started before the update carry version 0, those started after it 1."""
    import threading
    import time

    llm = LLM(tiny_model_dir, max_num_seqs=4)
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, 24)
    model = llm.model
    new = [(name, p.detach() * 1.01) for name, p in model.named_parameters()]
    counters, torn, inside = [], [], threading.Event()
    version_sum = lambda: sum(p._version for p in model.parameters())  # noqa: E731

    def before(module, args, kwargs):
        counters.append(version_sum())
        if len(counters) == 6:
            inside.set()
            time.sleep(0.2)  # the update is waiting now: without the step lock it would land in this forward

    def after(module, args, kwargs, output):
        if version_sum() != counters[-1]:
            torn.append(len(counters))

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    result = {}

    def update():
        inside.wait(timeout=60)
        result["version"] = llm.update_weights(new)
        result["steps"] = len(counters)

    thread = threading.Thread(target=update)
    thread.start()
    try:
        summary = generate_dataset(llm, prompts, SamplingParams(max_tokens=6, seed=1), tmp_path / "out",
                                   batch_size=4, use_tqdm=False)
    finally:
        thread.join(timeout=60)
        for h in hooks:
            h.remove()
    assert summary.complete and result["version"] == 1
    assert torn == []
    assert 6 <= result["steps"] < len(counters) - 5  # applied while the dataset was generating
    rows = dataset_rows(tmp_path / "out")
    by_prompt = {r["prompt_index"]: r["weight_version"] for r in rows}
    assert set(by_prompt.values()) == {0, 1}
    first_new = min(i for i, v in by_prompt.items() if v == 1)
    assert all(v == 1 for i, v in by_prompt.items() if i > first_new + 8)  # later prompts all on the new weights
