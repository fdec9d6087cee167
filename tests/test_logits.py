"""Logits and logprobs of the packed paged forward vs one ordinary `model(input_ids)` forward (fp32, tiny models).

Covers a mixed packed step (decodes, whole prefills, a chunk continuing from cached context) through the
model runner directly, and the reported logprobs through `LLM.generate` with chunked prefill, with
preemption/recompute, and at a sampling temperature != 1.
"""

from contextlib import contextmanager

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.engine.model_runner import ModelRunner
from rollserve.engine.scheduler import SchedulerOutput
from rollserve.engine.sequence import Sequence

from conftest import TINY_ARCHS

TOL = 1e-4
K = 16
BLOCK = 16


def _blocks_bytes(model, num_blocks: int) -> int:
    return num_blocks * ModelRunner.bytes_per_block(model.config, BLOCK, model.dtype)


def _reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def _run_packed(llm, work: list[tuple[Sequence, int]]) -> dict[int, tuple[int, torch.Tensor]]:
    """Schedules `work` ((seq, num_new_tokens) pairs) as one step and runs the model runner, keeping the logits of
    EVERY packed token. Returns {seq_id: (first position computed, logits [n, vocab])}."""
    bm, runner = llm.engine.block_manager, llm.engine.runner
    batch = SchedulerOutput()
    for seq, n in work:
        batch.add(seq, n, bm.append_slots(seq, n))
    input_ids, positions, meta, rows, order, _ = runner.prepare(batch)
    logits = runner.forward(input_ids, positions, meta, list(range(len(input_ids))))
    assert logits.shape[0] == len(input_ids) == sum(n for _, n in work)
    num_new = {seq.seq_id: n for seq, n in work}
    out, row = {}, 0
    for seq in order:  # packed order: one token per decode first, then the prefill chunks
        n = num_new[seq.seq_id]
        assert positions[row].item() == seq.num_computed_tokens
        out[seq.seq_id] = (seq.num_computed_tokens, logits[row:row + n])
        row += n
    for seq, n in work:
        seq.num_computed_tokens += n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_runner_logits_every_position(arch, dtype, tiny_model, make_prompts):
    """Decodes, whole prefills and a chunk that attends to context already in the paged cache, packed together.

    In float64 the only difference left is the runner's float32 logits (|logit| <= ~16 -> rounding <= ~1e-6), so
    the check there is 10x tighter than the float32 one and blind to kernel-order noise.
    """
    model = tiny_model(arch).to(dtype)
    tol = TOL if dtype == torch.float32 else 1e-5
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), enable_prefix_caching=False)
    assert llm.engine.runner.kv_cache.data.dtype == dtype
    params = SamplingParams(temperature=0)
    pa, pb, pc = make_prompts([70, 25, 20], seed=10)
    a, b, c = (Sequence(f"direct-{i}", p, params) for i, p in enumerate((pa, pb, pc)))
    extra = make_prompts([3, 3, 3], seed=11)  # tokens appended as if sampled
    got = {s.seq_id: [] for s in (a, b, c)}

    def record(step):
        for seq_id, (start, logits) in step.items():
            got[seq_id].append((start, logits))

    # Step 1: first chunk of A (40 of 70), all of B, C but its last prompt token.
    record(_run_packed(llm, [(a, 40), (b, 25), (c, 19)]))
    # Step 2: rest of A (a chunk over 40 cached tokens), B decodes a new token, C its last prompt token.
    b.token_ids.append(extra[1][0])
    record(_run_packed(llm, [(a, 30), (b, 1), (c, 1)]))
    # Step 3: everyone decodes.
    for seq, toks in zip((a, b, c), extra):
        seq.token_ids.append(toks[2])
    record(_run_packed(llm, [(a, 1), (b, 1), (c, 1)]))

    max_diff = 0.0
    for seq in (a, b, c):
        ref = _reference_logits(model, seq.token_ids).double()
        engine = torch.full_like(ref, float("nan"))
        for start, logits in got[seq.seq_id]:
            engine[start:start + logits.shape[0]] = logits
        assert seq.num_computed_tokens == seq.num_tokens
        assert not engine.isnan().any()
        diff = (engine - ref).abs().max().item()
        max_diff = max(max_diff, diff)
        assert diff < tol, f"{arch} {dtype}: seq of {seq.num_tokens} tokens, max |logit diff| {diff:.2e}"
    print(f"{arch} {dtype}: max |paged logit - reference logit| = {max_diff:.2e}")
    for seq in (a, b, c):
        llm.engine.block_manager.free_blocks(seq)


def _check_logprobs(model, prompts, outs, ref_logprobs, temperature=1.0, tol=TOL) -> float:
    max_diff = 0.0
    for prompt, out in zip(prompts, outs):
        for comp in out.outputs:
            ref = ref_logprobs(model, prompt, comp.token_ids, temperature)
            assert len(comp.logprobs) == len(comp.token_ids)
            diff = (torch.tensor(comp.logprobs) - ref).abs().max().item()
            assert diff < tol, f"prompt of {len(prompt)} tokens: max |logprob diff| {diff:.2e}"
            max_diff = max(max_diff, diff)
    return max_diff


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_prefill_logprobs(arch, tiny_model, make_prompts, hf_greedy, ref_logprobs):
    model = tiny_model(arch)
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 128), max_num_batched_tokens=32)
    prompts = make_prompts([130, 101, 7, 260], seed=12)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=K, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    total = sum(map(len, prompts))
    assert llm.stats.num_prefill_tokens == total
    assert llm.stats.num_steps >= -(-total // 32)  # the prefill really was chunked
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, K)
    greedy_diff = _check_logprobs(model, prompts, outs, ref_logprobs)

    # Sampling at T=0.8: logprobs are log_softmax(logits / 0.8) of the sampled token.
    sampled = llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=K, ignore_eos=True, logprobs=0, seed=3),
                           use_tqdm=False)
    sampled_diff = _check_logprobs(model, prompts, sampled, ref_logprobs, temperature=0.8)
    print(f"{arch} chunked prefill: max |logprob diff| greedy {greedy_diff:.2e}, T=0.8 {sampled_diff:.2e}")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_preemption_recompute_logprobs(arch, tiny_model, make_prompts, hf_greedy, ref_logprobs):
    model = tiny_model(arch)
    # 7 blocks of 16 tokens: the longest sequence needs 5 (50 + 24 tokens), the batch 20.
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 7), block_size=BLOCK)
    assert llm.engine.block_manager.num_blocks == 7
    prompts = make_prompts([40, 33, 50, 21, 45], seed=13)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert llm.stats.num_recomputed_tokens > 0  # completion tokens were recomputed after a preemption
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 24)
        assert out.outputs[0].finish_reason == "length"
    diff = _check_logprobs(model, prompts, outs, ref_logprobs)
    print(f"{arch} preemption: {llm.engine.scheduler.stats.num_preemptions} preemptions, "
          f"max |logprob diff| {diff:.2e}")


@contextmanager
def _kv_rounded_to(model, dtype: torch.dtype):
    """HF's own sdpa attention on K/V rounded to `dtype` (after the rotary embedding, as the engine's cache holds
    them): the exact reference for an engine whose KV cache is `dtype` under fp32 weights."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def rounded(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, query, key.to(dtype).to(key.dtype), value.to(dtype).to(value.dtype),
                                      *args, **kwargs)

    name = f"rollserve_test_kv_{dtype}".replace("torch.", "")
    AttentionInterface.register(name, rounded)
    AttentionMaskInterface.register(name, sdpa_mask)  # sdpa's masks (sliding windows included)
    saved = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = saved


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_16_bit_kv_cache_under_fp32_weights(arch, cache_dtype, tiny_model, make_prompts, hf_greedy, ref_logprobs):
    """`kv_cache_dtype=bf16/fp16` with fp32 weights: the cache holds twice the blocks in the same memory, and greedy
    tokens and logprobs (chunked prefill, a prefix-cache hit, decodes) are those of HF's forward with K/V rounded
    to the cache's dtype. Within 1e-3, not the fp32 1e-4: a K/V element that the engine's GEMMs and HF's compute
    an fp32 ulp apart can round to neighbouring 16-bit values (measured: 3.5e-4 on the tiny llama in bf16, <=
    9e-5 elsewhere). Against the unrounded fp32 forward they differ 200-11,000x more (3.5e-3 to 0.42)."""
    model = tiny_model(arch)
    llm = LLM(model, kv_cache_dtype=cache_dtype, kv_cache_memory=_blocks_bytes(model, 64),
              max_num_batched_tokens=32)
    assert llm.engine.runner.kv_cache.data.dtype == cache_dtype
    assert llm.engine.block_manager.num_blocks == 128
    prompts = make_prompts([130, 7, 60], seed=21)
    prompts.append(prompts[0][:96] + make_prompts([20], seed=22)[0])  # a prefix-cache hit on the first's blocks
    params = SamplingParams(temperature=0, max_tokens=K, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts[:3], params, use_tqdm=False) + llm.generate(prompts[3:], params, use_tqdm=False)
    assert llm.metrics()["prefix_cache_hit_rate"] > 0
    with _kv_rounded_to(model, cache_dtype):
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(model, prompt, K)
        diff = _check_logprobs(model, prompts, outs, ref_logprobs, tol=1e-3)
    unrounded = max((torch.tensor(out.outputs[0].logprobs) - ref_logprobs(model, prompt, out.outputs[0].token_ids))
                    .abs().max().item() for prompt, out in zip(prompts, outs))
    print(f"{arch} {cache_dtype} KV cache: max |logprob diff| {diff:.2e} against the rounded-K/V forward, "
          f"{unrounded:.2e} against the fp32 one")
    assert unrounded > 20 * diff


def test_16_bit_kv_cache_is_refused_by_the_triton_backend(tiny_model, monkeypatch):
    """The Triton kernels read a cache of the model's dtype: a forced Triton backend with a 16-bit cache under
    fp32 weights is refused, naming the field."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the forced Triton backend is accepted on the CPU under it
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="kv_cache_dtype=torch.float16 is invalid with attention_backend='triton'"):
        LLM(model, kv_cache_dtype="fp16", attention_backend="triton", kv_cache_memory=_blocks_bytes(model, 8))
