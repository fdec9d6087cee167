"""The sampler against an independent float64 reference (sort-based, HF's warper order).

Statistics: N draws of one logits row; every token's count must lie within 5
standard deviations of N * p (binomial), and no token outside the reference's
support may ever be drawn. Under a correct sampler the chance that any of the
<= 128 tokens breaks the 5-sigma bound is < 128 * 5.7e-7 < 1e-4 (and the
generator is seeded, so the test is deterministic). A distribution error of a
few percent on any token with p >= 0.01 breaks it (5 sigma at N = 40000,
p = 0.05 is 0.0055 absolute).
"""

import pytest
import torch

from rollserve import SamplingParams
from rollserve.engine.sampler import Sampler, SamplingBatch, _thresholds

from reference import reference_probs as _reference_probs

VOCAB = 128
N = 40000
EOS = 3


class FakeSeq:
    def __init__(self, params, prompt=(), output=(), generator=None):
        self.params = params
        self.token_ids = list(prompt) + list(output)
        self.num_prompt_tokens = len(prompt)
        self.generator = generator

    @property
    def num_completion_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens


def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt=(), output=(), eos=(EOS,)) -> torch.Tensor:
    """The distribution a correct sampler draws from (tests/reference.py), with this file's EOS."""
    return _reference_probs(logits, p, prompt, output, eos)


def draw(logits, params, n=N, prompt=(), output=(), seed=0):
    seqs = [FakeSeq(params, prompt, output) for _ in range(n)]
    batch = SamplingBatch(seqs, {EOS}, VOCAB, "cpu")
    return Sampler(seed)(logits.expand(n, -1).contiguous(), batch)


def check_counts(tokens: torch.Tensor, ref: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=len(ref)).double()
    outside = (counts > 0) & (ref == 0)
    assert not outside.any(), f"drew tokens outside the support: {outside.nonzero().flatten().tolist()}"
    n = counts.sum()
    sigma = (n * ref * (1 - ref)).sqrt()
    z = (counts - n * ref).abs() / sigma.clamp_min(1e-12)
    worst = int(z.argmax())
    assert z.max() < 5, f"token {worst}: {int(counts[worst])} draws, expected {float(n * ref[worst]):.1f}"


def _logits(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=g) * scale


CASES = {
    "T1": dict(temperature=1.0),
    "T0.7": dict(temperature=0.7),
    "T0.7_topk5": dict(temperature=0.7, top_k=5),
    "top_p0.8": dict(top_p=0.8),
    "min_p0.1": dict(min_p=0.1),
    "T1.3_all_filters": dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
    "penalties": dict(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4),
    "min_tokens": dict(min_tokens=5, stop_token_ids=[7]),
}


@pytest.mark.parametrize("name", CASES)
def test_distribution_matches_reference(name):
    params = SamplingParams(**CASES[name])
    logits = _logits(1)
    logits[EOS] = logits.max() + 1  # EOS and token 7 likely, so min_tokens masking matters
    logits[7] = logits.max()
    prompt, output = [5, 9, 9, 40, 41], [9, 40, 100, 100, 100]
    ref = reference_probs(logits, params, prompt, output)
    out = draw(logits, params, prompt=prompt, output=output)
    check_counts(out.token_ids, ref)


def test_greedy_is_argmax_after_penalties():
    logits = _logits(2)
    best = int(logits.argmax())
    params = SamplingParams(temperature=0, repetition_penalty=3.0, n=2)
    out = draw(logits, params, n=4, prompt=[best])
    ref = reference_probs(logits, SamplingParams(repetition_penalty=3.0), prompt=[best])
    assert out.token_ids.tolist() == [int(ref.argmax())] * 4 and int(ref.argmax()) != best


@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_deep_top_p_thresholds_are_exact(top_p):
    # A flat 5000-token row: the top_p mass lies beyond the first 64 and 1024 candidates,
    # so the threshold search has to widen (down to a full sort).
    vocab = 5000
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, vocab, generator=g) * 0.3, dim=-1)
    top_k = torch.tensor([0, 0, 0, 2000, 100, 0])
    top_p_t = torch.full((6,), top_p)
    min_p = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    thr = _thresholds(probs, top_k, top_p_t, min_p)
    for i in range(6):
        params = SamplingParams(top_k=int(top_k[i]), top_p=top_p, min_p=float(min_p[i]))
        ref = reference_probs(probs[i].log(), params)
        kept = probs[i] >= thr[i]
        assert torch.equal(kept, ref > 0), f"row {i}: kept {int(kept.sum())}, reference {int((ref > 0).sum())}"


@pytest.mark.parametrize("mode", ["policy", "sampling", "raw"])
def test_logprob_modes_and_top_logprobs(mode):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(40, VOCAB, generator=g) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, logprobs=5, logprobs_mode=mode,
                             repetition_penalty=1.2 if i % 3 == 0 else 1.0)
              for i, (t, k, p) in enumerate([(0.7, 0, 1.0), (1.0, 10, 0.9), (1.3, 0, 0.8), (0.0, 0, 1.0)] * 10)]
    seqs = [FakeSeq(p, prompt=[1, 2, 3], output=[4, 5]) for p in params]
    out = Sampler(0)(logits, SamplingBatch(seqs, {EOS}, VOCAB, "cpu"))
    for i, p in enumerate(params):
        t = p.temperature or 1.0
        if mode == "policy":
            full = torch.log_softmax(logits[i] / t, dim=-1)  # bit-equal: the trainer's op
            assert out.logprobs[i].item() == full[out.token_ids[i]].item()
        elif mode == "raw":
            full = torch.log_softmax(logits[i], dim=-1)
            assert out.logprobs[i].item() == full[out.token_ids[i]].item()
        else:
            full = reference_probs(logits[i], p, [1, 2, 3], [4, 5]).log()
            assert abs(out.logprobs[i].item() - full[out.token_ids[i]].item()) < 1e-5
        ref_vals, ref_ids = torch.topk(full.float(), 5)
        torch.testing.assert_close(out.top_logprobs[i], ref_vals, atol=1e-5, rtol=0)
        assert set(out.top_ids[i].tolist()) == set(ref_ids.tolist()) or mode == "sampling"
        rank = int((full > full[out.token_ids[i]]).sum()) + 1
        assert out.ranks[i].item() == rank


def test_plain_batch_logprob_is_logit_minus_logsumexp():
    """No top logprobs, penalties or filters: the fast path's sampled-token logprob against float64 log_softmax,
    in every mode that equals the policy's there, greedy rows included; the draws are the full path's."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(64, VOCAB, generator=g) * 4
    temps = [0.0, 0.5, 0.7, 1.0, 1.3, 2.0, 1.0, 0.0] * 8
    modes = ["policy", "sampling", "raw"]
    params = [SamplingParams(temperature=t, logprobs=0, logprobs_mode=modes[i % 3] if t in (0, 1) else modes[i % 2])
              for i, t in enumerate(temps)]
    batch = SamplingBatch([FakeSeq(p) for p in params], {EOS}, VOCAB, "cpu")
    assert batch.plain
    out = Sampler(0)(logits, batch)
    for i, p in enumerate(params):
        tok = out.token_ids[i]
        ref = torch.log_softmax(logits[i].double() / (p.temperature or 1.0), dim=-1)[tok].item()
        assert abs(out.logprobs[i].item() - ref) < 2e-6, f"row {i} T={p.temperature} {p.logprobs_mode}"
        if p.temperature == 0:
            assert tok == logits[i].argmax()
    full = [SamplingParams(temperature=p.temperature, logprobs=1, logprobs_mode=p.logprobs_mode) for p in params]
    full_batch = SamplingBatch([FakeSeq(p) for p in full], {EOS}, VOCAB, "cpu")
    assert not full_batch.plain
    assert torch.equal(Sampler(0)(logits, full_batch).token_ids, out.token_ids)


def test_seeded_row_ignores_the_rest_of_the_batch():
    logits = _logits(5)
    p_seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)

    def run(others, position):
        seqs = [FakeSeq(SamplingParams(temperature=0.5 + 0.1 * i)) for i in range(others)]
        gen = torch.Generator().manual_seed(11)
        seqs.insert(position, FakeSeq(p_seeded, generator=gen))
        return int(Sampler(others)(logits.expand(len(seqs), -1).contiguous(),
                                   SamplingBatch(seqs, {EOS}, VOCAB, "cpu")).token_ids[position])

    first = [run(0, 0)] + [run(31, pos) for pos in (0, 17, 31)]
    assert len(set(first)) == 1
