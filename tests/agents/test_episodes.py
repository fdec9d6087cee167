"""Multi-turn episodes on the step API: exact masks, logprobs equal to a recomputation over the whole
sequence, token ids equal to the chat template's rendering, environments stepping off the engine thread."""

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollserve import LLM, SamplingParams
from rollserve.agents import TemplatePrefixError, iter_episodes, run_episodes

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


def test_iter_episodes_yields_prompts_as_they_finish_seeded_as_in_the_whole_set(llm):
    """What resuming a dataset relies on: a run over some of the prompts samples what a run over all of them
    sampled for those prompts, and each prompt's episodes come back together."""
    rows = [{"prompt": PROMPT + f" Game {i}.", "target": 37} for i in range(4)]
    params = SamplingParams(n=2, max_tokens=6, seed=5)
    everything = run_episodes(llm, rows, GuessTheNumber, params, max_turns=3)
    groups = list(iter_episodes(llm, rows, GuessTheNumber, params, prompt_indices=[3, 1], max_turns=3))
    assert sorted(g[0].prompt_index for g in groups) == [1, 3]
    for group in groups:
        p = group[0].prompt_index
        assert [(e.prompt_index, e.sample_index) for e in group] == [(p, 0), (p, 1)]
        assert [e.token_ids for e in group] == [e.token_ids for e in everything[2 * p:2 * p + 2]]
    with pytest.raises(ValueError, match=r"prompt_indices \[4\] are not indices of the 4 prompts"):
        iter_episodes(llm, rows, GuessTheNumber, params, prompt_indices=[0, 4])
    with pytest.raises(ValueError, match="more than once"):
        iter_episodes(llm, rows, GuessTheNumber, params, prompt_indices=[1, 1])


def test_closing_iter_episodes_early_aborts_and_releases(llm):
    made = []

    def env():  # the second episode's environment is slow: it is still out (its KV parked) when the first ends
        made.append(GuessTheNumber(delay=1.0 if len(made) == 1 else 0.0))
        return made[-1]

    episodes = iter_episodes(llm, [PROMPT + f" Game {i}." for i in range(4)], env,
                             SamplingParams(max_tokens=6, seed=0), max_turns=3, concurrency=2)
    first = next(episodes)
    assert first[0].prompt_index == 0 and llm.metrics()["num_parked"] == 1  # the second, still in its env
    episodes.close()
    assert len(first) == 1 and not llm.has_unfinished() and llm.metrics()["num_parked"] == 0


def _turn_prefills(llm, keep_kv: bool):
    """One episode alone in the engine: (the episode, prefill tokens of each turn, environment tokens before
    each turn after the first)."""
    probe = PrefillProbe(llm)
    llm.reset_prefix_cache()  # the first turn prefills its whole prompt
    before = llm.metrics()["prefill_tokens"]
    [e] = run_episodes(llm, [PROMPT + " (probe)"], lambda: GuessTheNumber(probe=probe),
                       SamplingParams(max_tokens=8, seed=1), max_turns=4, concurrency=1, keep_kv=keep_kv)
    assert e.num_turns == 4
    counts = [before] + probe
    prefill = [b - a for a, b in zip(counts, counts[1:])]
    starts = [i for i in range(1, len(e.mask)) if e.mask[i] and not e.mask[i - 1]]  # of each model turn
    env_starts = [i for i in range(1, len(e.mask)) if not e.mask[i] and e.mask[i - 1]]
    return e, prefill, starts, [s - b for s, b in zip(starts[1:], env_starts)]


def test_turns_after_the_first_prefill_only_the_environment_tokens(llm):
    """The sample is parked while its environment runs: the next turn computes the environment's tokens and
    the previous turn's last token (sampled, never run through the model), nothing more."""
    e, prefill, _, env_tokens = _turn_prefills(llm, keep_kv=True)
    print("kept KV: prefill per turn", prefill, "environment tokens", env_tokens)
    assert prefill[0] == e.num_prompt_tokens
    assert prefill[1:] == [n + 1 for n in env_tokens]
    assert llm.metrics()["num_parked"] == 0  # released when the episode ended


def test_without_parking_the_prefix_cache_recomputes_the_last_partial_block(llm):
    e, prefill, starts, env_tokens = _turn_prefills(llm, keep_kv=False)
    print("re-submitted: prefill per turn", prefill, "environment tokens", env_tokens)
    bs = llm.config.block_size
    for k in range(1, 4):
        computed = starts[k] - env_tokens[k - 1] - 1  # the KV the previous turn left: all but its last token
        assert prefill[k] == starts[k] - computed // bs * bs
        assert env_tokens[k - 1] + 1 <= prefill[k] <= env_tokens[k - 1] + bs


def test_a_tiny_kv_cache_evicts_parked_episodes_and_gives_the_same_results(tiny_model_dir, llm):
    from rollserve.engine.model_runner import ModelRunner

    rows = [{"prompt": PROMPT + "!" * i, "target": 40 + i} for i in range(4)]
    # Greedy: a recomputed prefix goes through prefill attention where the reference run decoded it, which
    # moves logprobs by ~1e-5 in fp32; a seeded temperature-1 draw between two near-equal tail tokens can
    # flip on that, an argmax with the tiny model's margins does not.
    params = SamplingParams(n=2, max_tokens=8, temperature=0)
    reference = run_episodes(llm, rows, GuessTheNumber, params, max_turns=4, max_total_tokens=200)
    per_block = ModelRunner.bytes_per_block(llm.model.config, llm.config.block_size, torch.float32)
    small = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=16 * per_block)
    episodes = run_episodes(small, rows, GuessTheNumber, params, max_turns=4, max_total_tokens=200)
    metrics = small.metrics()
    print("tiny cache:", {k: metrics[k] for k in ("num_parked_evictions", "num_preemptions")})
    assert metrics["num_parked_evictions"] > 0 and metrics["num_parked"] == 0
    assert [e.token_ids for e in episodes] == [e.token_ids for e in reference]
    assert [e.mask for e in episodes] == [e.mask for e in reference]
    for a, b in zip(episodes, reference):
        torch.testing.assert_close([x for x in a.logprobs if x is not None], [x for x in b.logprobs if x is not None],
                                   atol=1e-4, rtol=0)


def test_a_weight_update_drops_parked_kv(llm):
    class UpdateOnStep(GuessTheNumber):
        def step(self, text, ids):
            if llm.weight_version == before:  # after the first turn, its sample parked
                assert llm.metrics()["num_parked"] == 1
                llm.update_weights({"model.norm.weight": llm.model.model.norm.weight.detach().clone()})
            return super().step(text, ids)

    before, evictions = llm.weight_version, llm.metrics()["num_parked_evictions"]
    [e] = run_episodes(llm, [PROMPT], UpdateOnStep, SamplingParams(max_tokens=4, seed=0), max_turns=2)
    assert e.num_turns == 2 and llm.weight_version == before + 1
    versions = [v for v in e.weight_versions if v is not None]
    assert versions[0] == before and versions[-1] == before + 1
    assert llm.metrics()["num_parked_evictions"] == evictions + 1


def test_environment_steps_run_off_the_engine_thread(llm):
    """8 episodes whose environment sleeps 0.5 s per step: the sleeps overlap."""
    params = SamplingParams(n=2, max_tokens=4, seed=2)
    start = time.perf_counter()
    episodes = run_episodes(llm, [PROMPT, PROMPT + "!", PROMPT + "?", PROMPT + "."],
                            lambda: GuessTheNumber(delay=0.5), params, max_turns=3)
    elapsed = time.perf_counter() - start
    serial = sum(e.num_turns for e in episodes) * 0.5
    print(f"8 episodes, {sum(e.num_turns for e in episodes)} steps of 0.5 s: {elapsed:.2f} s (serial {serial:.1f} s)")
    assert len(episodes) == 8 and elapsed < 0.75 * serial  # a hang guard; expected about turns x 0.5 s


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


def test_resume_and_park_errors_name_what_was_wrong(llm):
    with pytest.raises(ValueError, match="no parked sample 0 of request 'nope'"):
        llm.resume("nope", [1, 2])
    with pytest.raises(ValueError, match="park=1 is invalid"):
        llm.add_request([1, 2, 3], SamplingParams(max_tokens=2), park=1)
    rid = llm.add_request([1, 2, 3], SamplingParams(max_tokens=2, n=2), park=True)
    while llm.has_unfinished():
        llm.step()
    assert llm.metrics()["num_parked"] == 2
    with pytest.raises(ValueError, match="params.n must be 1"):
        llm.resume(rid, [4], SamplingParams(n=2))
    with pytest.raises(TypeError, match="extra_token_ids"):
        llm.resume(rid, "more")
    again = llm.resume(rid, [4, 5], SamplingParams(max_tokens=2), index=1)
    with pytest.raises(ValueError, match="no parked sample 1"):  # a sample is resumed once
        llm.resume(rid, [4, 5], index=1)
    while llm.has_unfinished():
        llm.step()
    llm.release(rid, 0)
    assert llm.metrics()["num_parked"] == 0 and again != rid
