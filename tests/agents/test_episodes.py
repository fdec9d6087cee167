"""Multi-turn episodes on the step API: exact masks, logprobs equal to a recomputation over the whole
sequence, token ids equal to the chat template's rendering, environments stepping off the engine thread."""

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import LLM, SamplingParams
from rollserve.agents import TemplatePrefixError, run_episodes

from helpers import one_thread, tiny_model_dir  # noqa: F401 (fixtures)
from scripted import PROMPT, GuessTheNumber, PrefillProbe


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _recomputed_logprobs(model, episode) -> torch.Tensor:
    """log_softmax of one plain forward over the whole episode, at the tokens the model sampled."""
    ids = torch.tensor([episode.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(1, ids[0, 1:, None]).squeeze(1)
    sampled = torch.tensor(episode.mask[1:], dtype=torch.bool)
    return picked[sampled]


def _check_episode(episode, tokenizer, model, max_turns):
    assert 1 <= episode.num_turns <= max_turns
    n = len(episode.token_ids)
    assert len(episode.mask) == len(episode.logprobs) == len(episode.weight_versions) == n
    assert episode.mask[:episode.num_prompt_tokens] == [0] * episode.num_prompt_tokens
    # The model's turns, and only they, are marked: each assistant message is one run of mask 1.
    runs, i = [], 0
    while i < n:
        if episode.mask[i]:
            j = i
            while j < n and episode.mask[j]:
                j += 1
            runs.append(episode.token_ids[i:j])
            i = j
        else:
            i += 1
    assistant = [m["content"] for m in episode.messages if m["role"] == "assistant"]
    assert len(runs) == len(assistant) == episode.num_turns
    assert [tokenizer.decode(r, skip_special_tokens=True) for r in runs] == assistant
    assert all((lp is None) == (m == 0) for lp, m in zip(episode.logprobs, episode.mask))
    assert all((v is None) == (m == 0) for v, m in zip(episode.weight_versions, episode.mask))
    # Token in, token out: the tokens read as the template's rendering of the final conversation.
    rendered = tokenizer.apply_chat_template(episode.messages, tokenize=False)
    text = tokenizer.decode(episode.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert rendered.startswith(text) and len(rendered) - len(text) <= len("<|im_end|>\n")
    reported = torch.tensor([lp for lp in episode.logprobs if lp is not None])
    torch.testing.assert_close(reported, _recomputed_logprobs(model, episode), atol=1e-4, rtol=0)


def test_guess_the_number_masks_logprobs_and_prefix_property(llm, hf_model):
    rows = [{"prompt": PROMPT, "target": 37}, {"prompt": PROMPT + " It is odd.", "target": 11}]
    params = SamplingParams(n=2, max_tokens=8, seed=0)
    episodes = run_episodes(llm, rows, GuessTheNumber, params, max_turns=4)
    assert [(e.prompt_index, e.sample_index) for e in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e in episodes:
        _check_episode(e, llm.get_tokenizer(), hf_model, 4)
        assert e.finish_reason in ("done", "max_turns") and len(e.rewards) == e.num_turns
        replies = [m["content"] for m in e.messages if m["role"] == "user"][1:]
        assert set(replies) <= {"higher", "lower", "no number found"}
    assert all(e.num_turns == 4 for e in episodes if e.finish_reason == "max_turns")
    assert sum(e.num_turns for e in episodes) >= 12, "a random model rarely guesses: episodes of 3-4 turns"


def test_seeded_episodes_repeat(llm):
    params = SamplingParams(n=2, max_tokens=6, seed=3)
    a = run_episodes(llm, [PROMPT], GuessTheNumber, params, max_turns=3)
    b = run_episodes(llm, [PROMPT], GuessTheNumber, params, max_turns=3, concurrency=1)
    assert [e.token_ids for e in a] == [e.token_ids for e in b]
    assert a[0].token_ids != a[1].token_ids


def test_turns_after_the_first_prefill_what_the_environment_added(llm):
    """Prefix cache only: the earlier turns' full KV blocks are found again; what is prefilled is the
    environment's tokens, the previous turn's last token (never run through the model) and the tokens of the
    last, partial block."""
    probe = PrefillProbe(llm)
    params = SamplingParams(max_tokens=8, seed=1)
    bs = llm.config.block_size
    llm.reset_prefix_cache()  # the first turn prefills its whole prompt
    before = llm.metrics()["prefill_tokens"]
    [e] = run_episodes(llm, [PROMPT + " (probe)"], lambda: GuessTheNumber(probe=probe), params, max_turns=4,
                       concurrency=1)
    assert e.num_turns == 4
    turn_starts = [i for i in range(1, len(e.mask)) if e.mask[i] and not e.mask[i - 1]]
    counts = [before] + probe
    prefill = [b - a for a, b in zip(counts, counts[1:])]
    assert prefill[0] == e.num_prompt_tokens
    for k in range(1, 4):
        env_start = turn_starts[k - 1] + next(i for i, m in enumerate(e.mask[turn_starts[k - 1]:]) if not m)
        env_tokens = turn_starts[k] - env_start
        cached = (env_start - 1) // bs * bs
        print(f"turn {k + 1}: prefilled {prefill[k]}, environment tokens {env_tokens}")
        assert prefill[k] == turn_starts[k] - cached
        assert env_tokens + 1 <= prefill[k] <= env_tokens + bs


def test_environment_steps_run_off_the_engine_thread(llm):
    """8 episodes whose environment sleeps 0.5 s per step: the sleeps overlap."""
    params = SamplingParams(n=2, max_tokens=4, seed=2)
    start = time.perf_counter()
    episodes = run_episodes(llm, [PROMPT, PROMPT + "!", PROMPT + "?", PROMPT + "."],
                            lambda: GuessTheNumber(delay=0.5), params, max_turns=3)
    elapsed = time.perf_counter() - start
    serial = sum(e.num_turns for e in episodes) * 0.5
    print(f"8 episodes, {sum(e.num_turns for e in episodes)} steps of 0.5 s: {elapsed:.2f} s (serial {serial:.1f} s)")
    assert len(episodes) == 8 and elapsed < serial / 2


class _AsyncGuess(GuessTheNumber):
    async def step(self, completion_text, completion_ids):
        await asyncio.sleep(0.01)
        return GuessTheNumber.step(self, completion_text, completion_ids)


class _Broken(GuessTheNumber):
    def step(self, completion_text, completion_ids):
        if self.target == 13:
            raise RuntimeError("the sandbox died")
        return super().step(completion_text, completion_ids)


def test_async_step_and_a_failing_environment(llm):
    params = SamplingParams(max_tokens=4, seed=5)
    [a] = run_episodes(llm, [PROMPT], _AsyncGuess, params, max_turns=2)
    assert a.num_turns == 2 and a.finish_reason in ("done", "max_turns")
    broken, fine = run_episodes(llm, [{"prompt": PROMPT, "target": 13}, PROMPT], _Broken, params, max_turns=2)
    assert broken.finish_reason == "error" and "the sandbox died" in broken.error and broken.num_turns == 1
    assert fine.finish_reason in ("done", "max_turns") and fine.error is None


def test_max_total_tokens_ends_an_episode_with_length(llm):
    params = SamplingParams(max_tokens=8, seed=0)
    [e] = run_episodes(llm, [PROMPT], GuessTheNumber, params, max_turns=10, max_total_tokens=60)
    assert e.finish_reason == "length" and len(e.token_ids) <= 60


def test_token_id_episodes(llm):
    class Tokens:
        def reset(self, prompt):
            return [11, 12]

        def step(self, text, ids):
            return [13, 14, 15], 0.5, False

    params = SamplingParams(max_tokens=3, seed=0, ignore_eos=True)
    [e] = run_episodes(llm, [[1, 2, 3]], Tokens, params, max_turns=3)
    assert e.messages is None and e.num_prompt_tokens == 5 and e.token_ids[:5] == [1, 2, 3, 11, 12]
    assert e.mask == [0] * 5 + [1] * 3 + [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    assert e.rewards == [0.5] * 3 and e.finish_reason == "max_turns"


def test_a_template_without_the_prefix_property_is_refused(llm):
    class Rewriting(GuessTheNumber):
        def step(self, text, ids):
            return {"role": "user", "content": "lower"}, 0.0, False

    tokenizer = llm.get_tokenizer()
    saved = tokenizer.chat_template
    # A template that strips each message: a sampled turn ending in a space is rendered differently.
    tokenizer.chat_template = saved.replace("message['content']", "message['content'] | trim")
    try:
        with pytest.raises(TemplatePrefixError, match="prefix property"):
            run_episodes(llm, [PROMPT], Rewriting, SamplingParams(max_tokens=8, seed=0, ignore_eos=True),
                         max_turns=4)
    finally:
        tokenizer.chat_template = saved
    assert not llm.has_unfinished()
