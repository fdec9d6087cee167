"""Sampling controls and logprobs through `LLM.generate`, checked against what an RL trainer recomputes.

References are one ordinary `model(input_ids)` forward over prompt + completion (tiny random Llama, fp32 logits),
then: policy = log_softmax(logits / T), raw = log_softmax(logits), sampling = the float64 reference distribution
of tests/reference.py (penalties, min_tokens masks, top_k / top_p / min_p, renormalised). The 1e-5 bound holds
with the model in float64 (both forwards then give the same fp32 logits); with a float32 model two different
fp32 forwards already differ by ~2e-5 (see FP32_TOL), so that run prints its numbers under a noise bound. Stop strings run on
SmolLM2's real tokenizer. Seeds, greedy n > 1, min_tokens, penalties and filters, and input validation (every
`SamplingParams` / `BeamSearchParams` field, per-request rejection in a running engine) are covered too.
"""

import math

import pytest
import torch

from rollserve import LLM, BeamSearchParams, SamplingParams
from rollserve.engine.model_runner import ModelRunner

from conftest import TINY_VOCAB
from reference import reference_probs

BLOCK = 16
TOL = 1e-5


def _blocks_bytes(model, num_blocks: int) -> int:
    return num_blocks * ModelRunner.bytes_per_block(model.config, BLOCK, model.dtype)


def _forward(model, token_ids: list[int]) -> torch.Tensor:
    """The trainer's forward: fp32 logits [len, vocab] of one ordinary full forward."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, kv_cache_memory=_blocks_bytes(model, 128), block_size=BLOCK)


# -- 1. completion logprobs, top logprobs and ranks in each mode -----------------------------------------------

# 8 prompts x n=8 = 64 samples; mixed temperatures, filters and penalties in one batch.
MIXED = [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_p=0.8, top_k=50),
    dict(temperature=0.7, top_k=10, repetition_penalty=1.3),
    dict(temperature=1.0, top_p=0.95, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3),
    dict(temperature=1.3, top_k=40),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=0.7, top_k=30, top_p=0.9, repetition_penalty=0.9),
]
MAX_TOKENS = 12
TOP = 5


def _close(a: float, b: float, tol: float) -> bool:
    return (a == b) if math.isinf(a) or math.isinf(b) else abs(a - b) < tol


# float64 model: the engine's and the trainer's forwards agree to ~1e-12 before both round logits to fp32, so any
# error in the logprob computation itself (mode, temperature, penalties, filters, renormalisation) shows at 1e-5.
# float32 model: two different fp32 forwards (paged packed attention vs HF sdpa) already differ; measured on this
# tiny Llama, HF's own fp32 logprobs are up to 5e-5 (sampled tokens) / 2.8e-4 (whole vocab) from float64, the
# engine's 4.6e-5 (sampled). 1e-5 is out of reach there; the bound is that noise, and the numbers are printed.
FP32_TOL = 2e-4


@pytest.fixture(scope="module")
def llm64(model):
    import copy

    m = copy.deepcopy(model).to(torch.float64)
    return LLM(m, kv_cache_memory=_blocks_bytes(m, 128), block_size=BLOCK), m


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logprobs_equal_trainer_recompute(llm, model, llm64, make_prompts, dtype):
    """One batch of 3 x 64 samples: the 8 prompts x n=8 once per logprobs mode, with the same seeds, so each mode
    covers the same 64 samples (the mode must not change what is sampled) and the modes are mixed in one batch."""
    if dtype == "float64":
        llm, model = llm64
    strict = dtype == "float64"
    tol = TOL if strict else FP32_TOL
    modes = ["policy", "sampling", "raw"]
    prompts = make_prompts([5, 17, 30, 9, 44, 23, 2, 12], seed=40)
    params = {m: [SamplingParams(n=8, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP, seed=100 + i,
                                 logprobs_mode=m, **kw) for i, kw in enumerate(MIXED)] for m in modes}
    outs = llm.generate([p for p in prompts for _ in modes], [params[m][i] for i in range(8) for m in modes],
                        use_tqdm=False)
    assert sum(len(o.outputs) for o in outs) == 3 * 64
    max_diff = {m: 0.0 for m in modes}
    max_top_diff = {m: 0.0 for m in modes}
    num_tokens = 0
    for i, prompt in enumerate(prompts):
        by_mode = dict(zip(modes, outs[3 * i:3 * i + 3]))
        for s in range(8):
            toks = by_mode["policy"].outputs[s].token_ids
            assert len(toks) == MAX_TOKENS
            logits = _forward(model, prompt + toks)[len(prompt) - 1:-1]  # fp32 logits, as the trainer has them
            for j, tok in enumerate(toks):
                p = params["sampling"][i]
                dist = reference_probs(logits[j], p, prompt, toks[:j])
                if strict:  # the sampled token lies in the support of the distribution actually drawn from
                    assert dist[tok] > 0, f"token {tok} was filtered out"
                for m in modes:
                    comp = by_mode[m].outputs[s]
                    assert comp.token_ids == toks, "the logprobs mode must not change the sampled tokens"
                    if m == "policy":
                        ref = torch.log_softmax(logits[j] / p.temperature, dim=-1)
                    elif m == "raw":
                        ref = torch.log_softmax(logits[j], dim=-1)
                    else:
                        ref = dist.log()
                    diff = abs(comp.logprobs[j] - ref[tok].item())
                    max_diff[m] = max(max_diff[m], diff)
                    assert diff < tol, f"{m} T={p.temperature}: |logprob diff| {diff:.2e} at step {j}"
                    top = comp.top_logprobs[j]
                    assert top[tok] == comp.logprobs[j]
                    assert len(top) in (TOP, TOP + 1) and (len(top) == TOP + 1 or tok in top)
                    for t, v in top.items():
                        r = ref[t].item()
                        if math.isfinite(v) and math.isfinite(r):
                            max_top_diff[m] = max(max_top_diff[m], abs(v - r))
                        if strict or (math.isfinite(v) and math.isfinite(r)):
                            assert _close(v, r, tol), f"{m}: top logprob of {t}: {v} vs {r}"
                    # The k alternatives are the k best of the reference (up to float noise at ties).
                    kth = torch.topk(ref, TOP).values[-1].item()
                    assert all(v >= kth - tol or (math.isinf(v) and math.isinf(kth)) for v in top.values()
                               if v != comp.logprobs[j] or len(top) == TOP)
                    sel = ref[tok].item()
                    lo, hi = int((ref > sel + tol).sum()) + 1, int((ref > sel - tol).sum()) + 1
                    assert lo <= comp.token_ranks[j] <= hi, f"{m}: rank {comp.token_ranks[j]}, reference {lo}..{hi}"
                num_tokens += 1
            for m in modes:
                comp = by_mode[m].outputs[s]
                assert comp.cumulative_logprob == pytest.approx(sum(comp.logprobs), abs=1e-4)
    assert num_tokens == 64 * MAX_TOKENS
    print(f"{dtype}: max |logprob - trainer recompute| over {num_tokens} tokens per mode: "
          + ", ".join(f"{m} {max_diff[m]:.2e} (top {max_top_diff[m]:.2e})" for m in modes))


def test_top_logprobs_when_the_batch_width_changes(llm, model, make_prompts):
    """A request with logprobs=2 next to one with logprobs=4 that finishes first: the top ids the batch computes are
    4 wide for a few steps, then 2 (regression: stacking them crashed the whole generate call)."""
    prompts = make_prompts([6, 11], seed=50)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=8, logprobs=2, ignore_eos=True, seed=1),
                                  SamplingParams(max_tokens=3, logprobs=4, ignore_eos=True, seed=2)], use_tqdm=False)
    for out, k in zip(outs, (2, 4)):
        comp = out.outputs[0]
        assert all(len(d) in (k, k + 1) for d in comp.top_logprobs)
        ref = torch.log_softmax(_forward(model, out.prompt_token_ids + comp.token_ids)[len(out.prompt_token_ids) - 1:-1],
                                dim=-1)
        for j, d in enumerate(comp.top_logprobs):
            assert sorted(d, key=d.get, reverse=True)[:k] == torch.topk(ref[j], k).indices.tolist()


# -- 2. prompt logprobs with prefix caching, chunked prefill and n > 1 -------------------------------------------


def _check_prompt_logprobs(model, prompt, got, temperature: float, k: int) -> float:
    assert got is not None and len(got) == len(prompt), f"{len(got or [])} entries for a {len(prompt)}-token prompt"
    assert got[0] is None
    ref = torch.log_softmax(_forward(model, prompt)[:-1] / temperature, dim=-1)
    worst = 0.0
    for i in range(1, len(prompt)):
        entry, row = got[i], ref[i - 1]
        assert prompt[i] in entry
        assert len(entry) in (k, k + 1)
        for t, v in entry.items():
            worst = max(worst, abs(v - row[t].item()))
        if k:
            kth = torch.topk(row, k).values[-1].item()
            assert all(v >= kth - TOL for t, v in entry.items() if t != prompt[i])
    assert worst < FP32_TOL, f"prompt of {len(prompt)} tokens: max |prompt logprob diff| {worst:.2e}"
    return worst


def test_prompt_logprobs_prefix_cache_chunked_prefill(model, make_prompts):
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK, max_num_batched_tokens=32)
    prompts = make_prompts([70, 37, 5, 1], seed=41)
    sched = llm.engine.scheduler.stats
    # A first pass without prompt logprobs puts the prompts' full blocks in the prefix cache.
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    cases = [(SamplingParams(n=3, temperature=0.8, max_tokens=4, prompt_logprobs=3, logprobs=0), 0.8),
             (SamplingParams(n=2, temperature=0.8, max_tokens=4, prompt_logprobs=0, logprobs_mode="raw"), 1.0),
             (SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2), 1.0)]
    worst, first = 0.0, None
    for p, temperature in cases:
        for rep in range(2):  # the same prompts again: their blocks are cached, the results must not change
            steps0 = llm.stats.num_steps
            outs = llm.generate(prompts, p, use_tqdm=False)
            assert llm.stats.num_steps - steps0 > sum(map(len, prompts)) // 32  # prefill really was chunked
            for prompt, out in zip(prompts, outs):
                assert len(out.outputs) == p.n
                worst = max(worst, _check_prompt_logprobs(model, prompt, out.prompt_logprobs, temperature,
                                                          p.prompt_logprobs))
            got = [o.prompt_logprobs for o in outs]
            if rep == 0:
                first = got
            else:
                assert got == first
    for prompt, comp in ((prompts[0], c) for c in outs[0].outputs):
        assert len(comp.token_ids) == 4
    # Plain requests still hit the cache afterwards (prompt logprobs only bypass it for themselves).
    hits0 = sched.prefix_cache_hits
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert sched.prefix_cache_hits > hits0
    print(f"prompt logprobs: max |diff| {worst:.2e}")


def test_prompt_logprobs_with_sample_logprobs_n_gt_1(llm, model, make_prompts, ref_logprobs):
    """n > 1 samples of a prompt whose logprobs are wanted too: the samples' logprobs stay right."""
    prompt = make_prompts([50], seed=42)[0]
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.3, max_tokens=6, prompt_logprobs=1, logprobs=0,
                                                seed=3), use_tqdm=False)[0]
    _check_prompt_logprobs(model, prompt, out.prompt_logprobs, 1.3, 1)
    assert len(out.outputs) == 4
    for comp in out.outputs:
        ref = ref_logprobs(model, prompt, comp.token_ids, 1.3)
        assert (torch.tensor(comp.logprobs) - ref).abs().max().item() < FP32_TOL


# -- 3. seeds --------------------------------------------------------------------------------------------------


# Token ids must be identical. Logprobs: a sequence's fp32 logits depend slightly on what else is packed in
# the forward (GEMM blocking over the batch rows); measured 4.8e-7 here. Bitwise equality would need
# batch-invariant kernels.
SEED_LOGPROB_TOL = 2e-6


def _assert_same(got, alone, what):
    assert [g[0] for g in got] == [a[0] for a in alone], f"{what}: other token ids"
    for (_, lp, top), (_, lp0, top0) in zip(got, alone):
        assert max(abs(x - y) for x, y in zip(lp, lp0)) < SEED_LOGPROB_TOL, what
        assert [list(d) for d in top] == [list(d) for d in top0], f"{what}: other top-logprob ids"


def test_seed_invariance_alone_in_batch_and_fresh_engine(tiny_model, make_prompts):
    model = tiny_model("llama")
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 128), block_size=BLOCK)
    prompt = make_prompts([21], seed=43)[0]
    seeded = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_tokens=10, seed=777, logprobs=2)

    def result(out):
        return [(o.token_ids, o.logprobs, o.top_logprobs) for o in out.outputs]

    alone = result(llm.generate([prompt], seeded, use_tqdm=False)[0])
    samples = [tuple(t) for t, _, _ in alone]
    assert all(len(s) == 10 for s in samples)
    assert len(set(samples)) == 4, "the n samples of a seeded request must differ"

    others = make_prompts([3 + 5 * i for i in range(31)], seed=44)
    other_params = [SamplingParams(temperature=[0.5, 1.0, 1.5, 0][i % 4], top_k=[0, 7][i % 2],
                                   n=1 + i % 3, max_tokens=4 + i % 9, seed=i if i % 5 == 0 else None,
                                   repetition_penalty=1.2 if i % 7 == 0 else 1.0, logprobs=[None, 0, 3][i % 3])
                    for i in range(31)]
    for position, order in ((0, 1), (13, -1), (31, 1)):
        ps, qs = others[::order], other_params[::order]
        batch = ps[:position] + [prompt] + ps[position:]
        params = qs[:position] + [seeded] + qs[position:]
        outs = llm.generate(batch, params, use_tqdm=False)
        assert outs[position].prompt_token_ids == prompt
        _assert_same(result(outs[position]), alone, f"seeded request at position {position} of 32")

    fresh = LLM(tiny_model("llama"), kv_cache_memory=_blocks_bytes(model, 32), block_size=BLOCK, seed=12345)
    _assert_same(result(fresh.generate([prompt], seeded, use_tqdm=False)[0]), alone, "fresh engine")


# -- 4. greedy with n > 1 ------------------------------------------------------------------------------------


def test_greedy_n_samples_are_identical(llm, model, make_prompts, hf_greedy):
    prompt = make_prompts([19], seed=45)[0]
    out = llm.generate([prompt], SamplingParams(n=5, temperature=0, max_tokens=10, logprobs=2), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == list(range(5))
    ref = hf_greedy(model, prompt, 10)
    for o in out.outputs:
        assert o.token_ids == ref
        assert o.logprobs == out.outputs[0].logprobs and o.top_logprobs == out.outputs[0].top_logprobs


# -- 5. stop strings (SmolLM2's real tokenizer) ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(smollm2_path, dtype="float32", kv_cache_memory=32 * 1024**2)


def _token_ends(tok, ids: list[int]) -> list[int]:
    """ends[j]: length of the decoded text of ids[:j + 1]."""
    return [len(tok.decode(ids[:j + 1], skip_special_tokens=True)) for j in range(len(ids))]


def _token_at(ends: list[int], char_end: int) -> int:
    """Index of the token whose text completes the first `char_end` characters."""
    return next(j for j, e in enumerate(ends) if e >= char_end)


def test_stop_strings(smol):
    tok = smol.get_tokenizer()
    text_in = tok.apply_chat_template([{"role": "user", "content": "List the days of the week."}], tokenize=False,
                                      add_generation_prompt=True)
    prompt = tok(text_in, add_special_tokens=False).input_ids
    K = 24
    base = dict(temperature=0, max_tokens=K, ignore_eos=True)
    ref = smol.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    ids, text = ref.token_ids, ref.text
    assert text == tok.decode(ids, skip_special_tokens=True)
    ends = _token_ends(tok, ids)
    assert ends[-1] == len(text)

    # A stop string spanning a token boundary (2 characters each side where possible), first found there.
    span = None
    for j in range(2, K - 4):
        for a, b in ((2, 2), (1, 2), (2, 1), (1, 1)):
            if ends[j - 1] - ends[j - 2] >= a and ends[j] - ends[j - 1] >= b:
                s = text[ends[j - 1] - a:ends[j - 1] + b]
                if text.find(s) == ends[j - 1] - a and s.strip():
                    span = (s, j, ends[j - 1] - a)
                    break
        if span:
            break
    assert span, f"no spanning stop string in {text!r}"
    stop, j, pos = span
    # A stop string that occurs twice, the first time before min_tokens, the second time after.
    twice = None
    for length in (3, 2, 4):
        for p1 in range(len(text) - length):
            s = text[p1:p1 + length]
            p2 = text.find(s, p1 + length)
            a = _token_at(ends, p1 + length)
            if s.strip() and p2 > 0 and text.find(s) == p1 and _token_at(ends, p2 + length) >= a + 1:
                twice = (s, a)
                break
        if twice:
            break
    assert twice, f"no repeated substring in {text!r}"
    s2, a2 = twice
    min_tokens = a2 + 2  # the first occurrence ends at token a2 (the (a2+1)-th): not looked for yet
    # Expected: the earliest occurrence that ends at or after token min_tokens - 1.
    p2 = next(p for p in range(len(text)) if text.startswith(s2, p) and _token_at(ends, p + len(s2)) >= min_tokens - 1)
    t2 = _token_at(ends, p2 + len(s2))
    later = next(text[p:p + 3] for p in range(pos + len(stop), len(text) - 3) if text[p:p + 3].strip())

    cases = [
        SamplingParams(stop=[stop], **base),
        SamplingParams(stop=stop, include_stop_str_in_output=True, **base),
        SamplingParams(stop=["\u2603never", later, stop[1:], stop], **base),  # stop[1:] completes with the same token
        SamplingParams(stop=[s2], min_tokens=min_tokens, **base),
        SamplingParams(stop=[s2], min_tokens=min_tokens, include_stop_str_in_output=True, **base),
    ]
    outs = [o.outputs[0] for o in smol.generate([prompt] * len(cases), cases, use_tqdm=False)]
    print(f"completion {text!r}: stop {stop!r} over tokens {j - 1}/{j}, {s2!r} twice (min_tokens={min_tokens})")
    for o in outs:
        assert o.finish_reason == "stop", o
    assert outs[0].text == text[:pos] and outs[0].token_ids == ids[:j + 1] and outs[0].stop_reason == stop
    assert outs[1].text == text[:pos + len(stop)] and outs[1].token_ids == ids[:j + 1]
    assert outs[2].stop_reason == stop and outs[2].text == text[:pos] and outs[2].token_ids == ids[:j + 1]
    assert outs[3].token_ids == ids[:t2 + 1] and len(outs[3].token_ids) >= min_tokens
    assert outs[3].stop_reason == s2 and outs[3].text == text[:p2], (outs[3].text, text[:p2])
    assert outs[4].text == text[:p2 + len(s2)]


# -- 6. min_tokens against EOS and stop ids ----------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_ids(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("llama")
    prompt = make_prompts([20], seed=46)[0]
    ref = hf_greedy(model, prompt, 16)
    p = next(i for i in range(2, 8) if ref[i] not in ref[:i])
    eos = ref[p]
    model.generation_config.eos_token_id = eos
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK)
    m = p + 4
    outs = llm.generate([prompt] * 4, [
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=m),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[eos]),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[eos], min_tokens=m),
    ], use_tqdm=False)
    plain, held, plain_id, held_id = (o.outputs[0] for o in outs)
    assert plain.token_ids == ref[:p + 1] and plain.finish_reason == "stop"
    assert plain_id.token_ids == ref[:p + 1] and plain_id.stop_reason == eos
    for o in (held, held_id):
        assert len(o.token_ids) >= m and eos not in o.token_ids[:m]
        assert o.token_ids[:p] == ref[:p]
        assert o.token_ids[p] != eos  # the argmax was EOS there: masked
        assert o.finish_reason == "length" or o.token_ids[-1] == eos

    # Sampling: EOS / the stop id is likely at every step once it was the argmax; none of 16 samples ends early.
    sampled = llm.generate([prompt] * 2, [
        SamplingParams(n=16, temperature=1.5, max_tokens=16, seed=5),
        SamplingParams(n=16, temperature=1.5, max_tokens=16, seed=5, min_tokens=m, stop_token_ids=[ref[0]]),
    ], use_tqdm=False)
    early = [o for o in sampled[0].outputs if len(o.token_ids) < m]
    assert early, "without min_tokens some sample should stop before m (else this test shows nothing)"
    for o in sampled[1].outputs:
        assert len(o.token_ids) >= m and eos not in o.token_ids[:m] and ref[0] not in o.token_ids[:m]


# -- 7. penalties and filters through the engine ---------------------------------------------------------


def test_filters_that_leave_one_token_equal_greedy(llm, model, make_prompts, hf_greedy):
    prompts = make_prompts([7, 33], seed=47)
    cases = [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, temperature=1.7)]
    params = [SamplingParams(n=3, max_tokens=10, ignore_eos=True, **kw) for kw in cases]
    outs = llm.generate([pr for pr in prompts for _ in cases], params * len(prompts), use_tqdm=False)
    for i, out in enumerate(outs):
        ref = hf_greedy(model, prompts[i // len(cases)], 10)
        assert all(o.token_ids == ref for o in out.outputs), cases[i % len(cases)]


def test_penalties_change_greedy_as_the_reference_predicts(llm, model, make_prompts, hf_greedy):
    prompts = make_prompts([12, 4], seed=48)
    K = 10
    cases = [dict(repetition_penalty=2.0), dict(repetition_penalty=0.5), dict(frequency_penalty=1.5),
             dict(presence_penalty=2.0, repetition_penalty=1.3)]
    params = [SamplingParams(temperature=0, max_tokens=K, ignore_eos=True, **kw) for kw in cases]
    outs = llm.generate([pr for pr in prompts for _ in cases], params * len(prompts), use_tqdm=False)
    changed = 0
    for i, out in enumerate(outs):
        prompt, p = prompts[i // len(cases)], params[i % len(cases)]
        toks = out.outputs[0].token_ids
        changed += toks != hf_greedy(model, prompt, K)
        logits = _forward(model, prompt + toks)[len(prompt) - 1:-1]
        for j, t in enumerate(toks):
            probs = reference_probs(logits[j], p, prompt, toks[:j])
            top2 = torch.topk(probs, 2).values
            assert t == int(probs.argmax()) or top2[0] - top2[1] < 1e-6, f"{cases[i % len(cases)]}: step {j}"
    assert changed >= len(outs) // 2, "penalties should change greedy completions (else this shows little)"


# -- 8. validation ---------------------------------------------------------------------------------------------

# Cases not already in tests/test_errors.py.
BAD_SAMPLING = [
    ({"n": True}, "n"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": None}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": 1.0}, "min_tokens"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": None}, "stop_token_ids"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"ignore_eos": None}, "ignore_eos"),
    ({"skip_special_tokens": 0}, "skip_special_tokens"),
    ({"logprobs": 1.5}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": "3"}, "prompt_logprobs"),
    ({"logprobs_mode": "greedy"}, "logprobs_mode"),
    ({"logprobs_mode": None}, "logprobs_mode"),
]


@pytest.mark.parametrize("kwargs, name", BAD_SAMPLING, ids=[f"{n}={v!r}" for (k, n) in BAD_SAMPLING
                                                                for v in [k[n]]])
def test_bad_sampling_params_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}=.*must be"):
        SamplingParams(**kwargs)


BAD_BEAM = [
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 2.0}, "beam_width"),
    ({"beam_width": True}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
    ({"beam_width": 2, "max_tokens": 1.5}, "max_tokens"),
    ({"beam_width": 2, "length_penalty": math.nan}, "length_penalty"),
    ({"beam_width": 2, "length_penalty": "long"}, "length_penalty"),
    ({"beam_width": 2, "ignore_eos": 1}, "ignore_eos"),
    ({"beam_width": 2, "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"beam_width": 2, "stop_token_ids": [2.0]}, "stop_token_ids"),
]


@pytest.mark.parametrize("kwargs, name", BAD_BEAM, ids=[f"{n}={k[n]!r}" for k, n in BAD_BEAM])
def test_bad_beam_search_params_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"BeamSearchParams\.{name}=.*must be"):
        BeamSearchParams(**kwargs)


def test_good_edge_values_are_accepted():
    p = SamplingParams(top_k=-1, stop="x", min_tokens=16, max_tokens=16, top_p=1.0, min_p=1.0, presence_penalty=-2,
                       frequency_penalty=2, logprobs=0, prompt_logprobs=0, seed=-5)
    assert p.top_k == 0 and p.stop == ["x"]
    BeamSearchParams(beam_width=1, length_penalty=-1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"logprobs": TINY_VOCAB + 1}, rf"prompts\[1\]: logprobs={TINY_VOCAB + 1} exceeds the vocabulary"),
    ({"prompt_logprobs": TINY_VOCAB + 1}, rf"prompts\[1\]: prompt_logprobs={TINY_VOCAB + 1} exceeds"),
    ({"stop_token_ids": [3, TINY_VOCAB]}, rf"prompts\[1\]: stop_token_ids \[{TINY_VOCAB}\]"),
])
def test_generate_refuses_values_beyond_the_vocab(llm, model, kwargs, match):
    engine = llm.engine
    steps0 = llm.stats.num_steps
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kwargs)],
                     use_tqdm=False)
    assert llm.stats.num_steps == steps0, "nothing may run when one prompt is refused"
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_vocab_sized_logprobs_are_accepted(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, logprobs=TINY_VOCAB, prompt_logprobs=TINY_VOCAB,
                                                   stop_token_ids=[TINY_VOCAB - 1], ignore_eos=True),
                       use_tqdm=False)[0]
    assert all(len(d) == TINY_VOCAB for d in out.outputs[0].top_logprobs)
    assert all(len(d) == TINY_VOCAB for d in out.prompt_logprobs[1:])


def test_invalid_request_in_a_running_engine_is_rejected_alone(tiny_model, make_prompts, hf_greedy):
    model = tiny_model("llama")
    llm = LLM(model, kv_cache_memory=_blocks_bytes(model, 64), block_size=BLOCK)
    engine = llm.engine
    prompts = make_prompts([9, 40, 15], seed=49)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.add_request(prompts[0], greedy, request_id="a")
    llm.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=2), request_id="b")
    finished = {}

    def step():
        finished.update((o.request_id, o.output) for o in llm.step() if o.finished)

    for _ in range(3):
        step()
    bad = [
        ("b", prompts[2], greedy, "already in use"),
        ("bad-logprobs", prompts[2], SamplingParams(logprobs=TINY_VOCAB + 1), "logprobs"),
        ("bad-prompt-logprobs", prompts[2], SamplingParams(prompt_logprobs=TINY_VOCAB + 5), "prompt_logprobs"),
        ("bad-stop-ids", prompts[2], SamplingParams(stop_token_ids=[TINY_VOCAB + 2]), "stop_token_ids"),
        ("bad-prompt", [1, TINY_VOCAB], greedy, "vocabulary"),
        ("bad-empty", [], greedy, "empty"),
    ]
    for rid, prompt, params, match in bad:
        with pytest.raises(ValueError, match=match):
            llm.add_request(prompt, params, request_id=rid)
        step()  # the others keep running
    llm.add_request(prompts[2], greedy, request_id="c")  # a valid request after the refusals
    while llm.has_unfinished():
        step()
    assert set(finished) == {"a", "b", "c"}
    for rid, prompt, k in zip("abc", prompts, (8, 16, 8)):
        ref = hf_greedy(model, prompt, k)
        assert all(o.token_ids == ref and o.finish_reason == "length" for o in finished[rid].outputs)
    assert len(finished["b"].outputs) == 2
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
