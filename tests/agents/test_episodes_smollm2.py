"""Multi-turn episodes on the real SmolLM2-135M-Instruct (fp32, CPU): masks, logprobs equal to one forward
of the HF model over the whole episode, the template's rendering of the final conversation, KV kept."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import LLM, SamplingParams
from rollserve.agents import run_episodes

from helpers import one_thread  # noqa: F401 (fixture)
from scripted import PROMPT, GuessTheNumber
from test_episodes import _check_episode


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", kv_cache_memory=64 << 20)


def test_smollm2_guess_the_number(llm, smollm2_path):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    rows = [{"prompt": PROMPT, "target": 37}, {"prompt": PROMPT + " Hint: it is below 50.", "target": 42}]
    before = llm.metrics()
    episodes = run_episodes(llm, rows, GuessTheNumber, SamplingParams(n=2, max_tokens=12, seed=0), max_turns=4)
    for e in episodes:
        _check_episode(e, llm.get_tokenizer(), hf, 4)
    turns = [e.num_turns for e in episodes]
    print("turns", turns, "finish", [e.finish_reason for e in episodes],
          "replies", [[m["content"] for m in e.messages if m["role"] == "user"][1:] for e in episodes])
    assert sum(turns) >= 8
    after = llm.metrics()
    sampled_turns_after_first = sum(turns) - len(episodes)
    env_tokens = sum(len(e.token_ids) - e.num_prompt_tokens - sum(e.mask) for e in episodes)
    # Kept KV: each prompt once for its samples (less what the other prompt's cached blocks gave), then
    # only the environment's tokens + 1 per later turn.
    prompts = [episodes[i].num_prompt_tokens for i in (0, 2)]
    first_turns = after["prefill_tokens"] - before["prefill_tokens"] - env_tokens - sampled_turns_after_first
    print("prefill of the first turns", first_turns, "prompts", prompts)
    assert max(prompts) <= first_turns <= sum(prompts)
