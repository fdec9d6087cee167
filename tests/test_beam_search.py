"""Beam search in the engine vs a plain beam search over full `model(input_ids)` forwards (tiny models, fp32)."""

import pytest
import torch

from rollserve import LLM, BeamSearchParams, SamplingParams

from rollserve.engine.model_runner import ModelRunner


def _blocks_bytes(model, num_blocks: int, block: int) -> int:
    return num_blocks * ModelRunner.bytes_per_block(model.config, block, model.dtype)


def plain_beam_search(model, prompt, width, max_tokens, eos=(), length_penalty=1.0):
    """The algorithm of rollserve.engine.beam_search written plainly: full forwards, no cache, no sharing."""
    live = [([], [], 0.0)]  # (tokens, logprobs, cumulative)
    finished = []
    for _ in range(max_tokens):
        cands = []
        for tokens, lps, cum in live:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            vals, ids = torch.topk(logp, min(2 * width, logp.shape[0]))
            cands += [(cum + v, t, v, tokens, lps) for v, t in zip(vals.tolist(), ids.tolist())]
        cands.sort(key=lambda c: c[0], reverse=True)
        new = []
        for rank, (cum, t, v, tokens, lps) in enumerate(cands):
            if t in eos:
                if rank < width:
                    finished.append((tokens + [t], lps + [v], cum))
                continue
            new.append((tokens + [t], lps + [v], cum))
            if len(new) == width:
                break
        if len(finished) >= width or not new:
            break
        live = new
    else:
        finished += live
    score = lambda h: h[2] / len(h[0]) ** length_penalty  # noqa: E731
    return sorted(finished, key=score, reverse=True)[:width]


def _check(outs, refs):
    for out, ref in zip(outs, refs):
        assert [s.token_ids for s in out.sequences] == [r[0] for r in ref]
        for s, r in zip(out.sequences, ref):
            assert s.cumulative_logprob == pytest.approx(r[2], abs=1e-4)
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(r[1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_beam_search_matches_plain_reference(arch, tiny_model, make_prompts):
    model = tiny_model(arch)
    prompts = make_prompts([5, 19, 33], seed=7)
    llm = LLM(model, block_size=8)
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=10), use_tqdm=False)
    refs = [plain_beam_search(model, p, 4, 10) for p in prompts]
    _check(outs, refs)
    # Every block went back: beams shared and freed theirs.
    bm = llm.engine.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks) and bm.num_free_blocks == bm.num_blocks
    # Width 4 finds a sequence at least as likely as greedy's (within fp32 noise: the two runs batch
    # differently, which moves a 10-token sum by ~1e-5).
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=0), use_tqdm=False)
    for out, g in zip(outs, greedy):
        assert out.sequences[0].cumulative_logprob >= g.outputs[0].cumulative_logprob - 1e-4


def test_width_one_is_greedy(tiny_model, make_prompts):
    model = tiny_model("qwen2")
    prompts = make_prompts([4, 12, 40], seed=8)
    llm = LLM(model, block_size=8)
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=12), use_tqdm=False)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [o.sequences[0].token_ids for o in outs] == [g.outputs[0].token_ids for g in greedy]


@pytest.mark.parametrize("eos_choice", ["greedy-third-token", "stop-ids-ranked-0-and-3"])
def test_eos_length_penalty_and_preemption(eos_choice, tiny_model, make_prompts):
    model = tiny_model("llama")
    prompts = make_prompts([6, 21], seed=9)
    stop_ids = []
    if eos_choice == "greedy-third-token":  # an EOS the search meets and keeps
        probe = LLM(model, block_size=8).generate(prompts[:1], SamplingParams(temperature=0, max_tokens=3),
                                                  use_tqdm=False)
        eos = probe[0].outputs[0].token_ids[2]
        penalty = 0.7
        model.generation_config.eos_token_id = eos
        ends = (eos,)
    else:
        # Stop ids ranked 0 and 3 at the first step of prompt 0 (beam width 3): the first ends a beam,
        # the second is visited before the third live beam is found but ranks >= the width, so it must
        # not become a finished beam (with a negative length penalty it would otherwise win).
        with torch.no_grad():
            top = torch.topk(model(torch.tensor([prompts[0]])).logits[0, -1], 4).indices.tolist()
        stop_ids, penalty, ends = [top[0], top[3]], -1.0, (top[0], top[3])
    try:
        params = BeamSearchParams(beam_width=3, max_tokens=9, length_penalty=penalty, stop_token_ids=stop_ids)
        refs = [plain_beam_search(model, p, 3, 9, eos=ends, length_penalty=penalty) for p in prompts]
        assert any(r[0][-1] in ends for ref in refs for r in ref), "the reference never meets EOS"
        big = LLM(model, block_size=4).beam_search(prompts, params, use_tqdm=False)
        _check(big, refs)
        for out in big:
            for s in out.sequences:
                assert s.finish_reason == ("stop" if s.token_ids[-1] in ends else "length")
                assert s.score == pytest.approx(s.cumulative_logprob / len(s.token_ids) ** penalty, abs=1e-6)
        # A cache of 12 blocks of 4 tokens cannot hold 2 prompts x 3 beams at once: beams get preempted,
        # keep their candidates, and the result is the same.
        small = LLM(model, block_size=4, kv_cache_memory=_blocks_bytes(model, 12, block=4))
        _check(small.beam_search(prompts, params, use_tqdm=False), refs)
        assert small.engine.scheduler.stats.num_preemptions > 0
    finally:
        model.generation_config.eos_token_id = None


def test_beam_search_bad_input(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=64)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.beam_search([[1, 2], [1] * 64], BeamSearchParams(beam_width=2))
    assert not llm.engine.has_unfinished_requests()
    for kwargs, name in [({"beam_width": 0}, "beam_width"), ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
                         ({"beam_width": 2, "length_penalty": float("nan")}, "length_penalty"),
                         ({"beam_width": 2, "stop_token_ids": [-1]}, "stop_token_ids")]:
        with pytest.raises(ValueError, match=rf"BeamSearchParams\.{name}="):
            BeamSearchParams(**kwargs)
    out = llm.beam_search([[1, 2, 3]], BeamSearchParams(beam_width=2, max_tokens=3), use_tqdm=False)
    assert len(out[0].sequences) == 2


def test_abort_mid_search_frees_every_beam(tiny_model, make_prompts):
    """Aborting a beam request returns its live beams (finish_reason "abort") and gives every block back;
    the tokens the beams took so far are counted as generated."""
    model = tiny_model("llama")
    prompt = make_prompts([11], seed=10)[0]
    llm = LLM(model, block_size=4)
    engine, width = llm.engine, 3
    llm.add_request(prompt, BeamSearchParams(beam_width=width, max_tokens=20), request_id="beams")
    llm.add_request(prompt, BeamSearchParams(beam_width=2, max_tokens=3), request_id="other")
    rounds = 5  # each step is one selection round (the first one's logits come with the prefill)
    for _ in range(rounds):
        assert not any(out.request_id == "beams" for out in llm.step())
    ref = plain_beam_search(model, prompt, width, rounds)  # no EOS: its result is the live beams after `rounds`
    out = llm.abort("beams").output
    _check([out], [ref])
    assert all(s.finish_reason == "abort" for s in out.sequences)
    assert llm.abort("beams") is None
    while llm.has_unfinished():
        llm.step()
    assert engine.stats.num_generated_tokens == rounds * width + 3 * 2  # one token per live beam per round
    bm = engine.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks) and bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.has_unfinished()
