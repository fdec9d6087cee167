"""Prompt sharing (n samples prefilled once, prefix cache across requests) and a KV cache too small for the
batch (preemption by recompute), end to end on tiny models."""

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.engine.model_runner import ModelRunner

BLOCK = 16


def _blocks_bytes(model, num_blocks: int) -> int:
    return num_blocks * ModelRunner.bytes_per_block(model.config, BLOCK, model.dtype)


# -- n samples, prefix cache ------------------------------------------------------------------------------


def test_n_samples_prefill_once_and_prefix_cache(tiny_model, make_prompts, ref_logprobs):
    model = tiny_model("llama")
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK)
    prompt = make_prompts([45], seed=20)[0]  # 2 full blocks + 13 tokens
    params = SamplingParams(n=8, temperature=1.0, max_tokens=8, logprobs=0)
    stats, sched = llm.stats, llm.engine.scheduler.stats

    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert stats.num_prefill_tokens == len(prompt), "the prompt of an n=8 request must be prefilled once"
    assert sched.prefix_cache_hits == 0
    assert sorted(o.index for o in out.outputs) == list(range(8))
    assert [o.index for o in out.outputs] == list(range(8))
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "8 samples at T=1 should not all be equal"
    assert out.prompt_token_ids == prompt
    # Each sample was computed over its own KV (the shared partial prompt block is copied on write): its
    # logprobs equal an ordinary forward over prompt + that sample.
    for o in out.outputs:
        assert (torch.tensor(o.logprobs) - ref_logprobs(model, prompt, o.token_ids)).abs().max().item() < 1e-4

    # The same prompt again: its full blocks come from the prefix cache.
    prefill0, hits0 = stats.num_prefill_tokens, sched.prefix_cache_hits
    out2 = llm.generate([prompt], params, use_tqdm=False)[0]
    hits = sched.prefix_cache_hits - hits0
    prefill = stats.num_prefill_tokens - prefill0
    assert hits > 0
    assert prefill < len(prompt)
    assert prefill + hits == len(prompt)
    assert [o.index for o in out2.outputs] == list(range(8))
    assert all(len(o.token_ids) == 8 for o in out2.outputs)

    # After a reset nothing is found.
    llm.reset_prefix_cache()
    prefill0, hits0 = stats.num_prefill_tokens, sched.prefix_cache_hits
    out3 = llm.generate([prompt], params, use_tqdm=False)[0]
    assert sched.prefix_cache_hits == hits0
    assert stats.num_prefill_tokens - prefill0 == len(prompt)
    assert len(out3.outputs) == 8


@pytest.mark.parametrize("prompt_len", [37, 48])  # last prompt block partial (copy-on-write) / exactly full
def test_greedy_n_samples_and_cached_prefix_match_hf(prompt_len, tiny_model, make_prompts, hf_greedy):
    """Forked samples share the prompt's blocks; cached blocks are reused by a later request with another suffix."""
    model = tiny_model("qwen2")
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK)
    prompt = make_prompts([prompt_len], seed=21)[0]
    ref = hf_greedy(model, prompt, 12)
    out = llm.generate([prompt], SamplingParams(n=4, temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [ref] * 4
    assert llm.stats.num_prefill_tokens == prompt_len

    # Shares the first 32 tokens (2 blocks), then differs.
    other = prompt[:32] + make_prompts([prompt_len - 32 + 5], seed=22)[0]
    hits0 = llm.engine.scheduler.stats.prefix_cache_hits
    got = llm.generate([other, prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert llm.engine.scheduler.stats.prefix_cache_hits - hits0 >= 32 + 32
    assert got[0].outputs[0].token_ids == hf_greedy(model, other, 12)
    assert got[1].outputs[0].token_ids == ref


def test_prefix_caching_disabled(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("qwen3")
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK, enable_prefix_caching=False)
    prompt = make_prompts([50], seed=23)[0]
    ref = hf_greedy(model, prompt, 8)
    for _ in range(2):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref
    assert llm.engine.scheduler.stats.prefix_cache_hits == 0
    assert llm.stats.num_prefill_tokens == 2 * len(prompt)


# -- a KV cache too small for the batch ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_small_kv_cache_completes_every_request(arch, tiny_model, make_prompts, hf_greedy):
    model = tiny_model(arch)
    prompts = make_prompts([30, 45, 12, 38, 27, 41], seed=24)
    max_tokens = 24
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    # One request with 3 greedy samples (forks under memory pressure) and one seeded sampled request.
    params = [greedy, greedy, SamplingParams(n=3, temperature=0, max_tokens=max_tokens), greedy,
              SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=77), greedy]

    big = LLM(model, kv_cache_memory=_blocks_bytes(model, 128), block_size=BLOCK)
    expected = big.generate(prompts, params, use_tqdm=False)
    assert big.engine.scheduler.stats.num_preemptions == 0

    longest = max(len(p) for p in prompts) + max_tokens  # 69 tokens -> 5 blocks
    num_blocks = -(-longest // BLOCK) + 3
    small = LLM(model, kv_cache_memory=_blocks_bytes(model, num_blocks), block_size=BLOCK)
    assert small.engine.block_manager.num_blocks == num_blocks
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.stats.num_preemptions > 0
    assert not small.engine.has_unfinished_requests()
    assert small.engine.block_manager.num_free_blocks == num_blocks  # everything given back

    for prompt, p, e, g in zip(prompts, params, expected, got):
        assert g.prompt_token_ids == prompt
        assert [o.index for o in g.outputs] == list(range(p.n))
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in e.outputs]
        assert all(o.finish_reason == "length" and len(o.token_ids) == max_tokens for o in g.outputs)
        if p.temperature == 0:
            ref = hf_greedy(model, prompt, max_tokens)
            assert all(o.token_ids == ref for o in g.outputs)
