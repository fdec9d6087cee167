"""`kernels.sampling.sample` (the fused sampling step's torch reference) vs the engine's `Sampler`."""

import pytest
import torch

import sampling_cases as cases
from rollserve.engine.sampler import Sampler, SamplingBatch
from rollserve.kernels.sampling import sample


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_draws_the_samplers_tokens_with_its_policy_logprobs(seed):
    logits = cases.logits(seed)
    want = Sampler(seed)(logits, SamplingBatch(cases.fake_sequences(), set(), cases.VOCAB, "cpu"))
    tokens, logprobs = sample(logits, uniforms=cases.uniforms(seed), **cases.tensors("cpu"))
    assert tokens.tolist() == want.token_ids.tolist()
    torch.testing.assert_close(logprobs, want.logprobs, atol=1e-6, rtol=0)


def test_the_filters_keep_what_they_say():
    """top_k=1 is the argmax; a tiny top_p keeps only the most likely token; min_p=1 too."""
    logits = cases.logits(3)
    rows = logits.shape[0]
    argmax = logits.argmax(-1)
    ones, u = torch.ones(rows), torch.rand(rows, generator=torch.Generator().manual_seed(3))
    off = dict(temperature=ones, greedy=torch.zeros(rows, dtype=torch.bool), uniforms=u)
    for top_k, top_p, min_p in ((1, 1.0, 0.0), (0, 1e-6, 0.0), (0, 1.0, 1.0)):
        tokens, _ = sample(logits, top_k=torch.full((rows,), top_k), top_p=torch.full((rows,), top_p),
                           min_p=torch.full((rows,), min_p), **off)
        untied = torch.arange(rows) != cases.TIED_ROW
        assert torch.equal(tokens[untied], argmax[untied])
        assert logits[cases.TIED_ROW, tokens[cases.TIED_ROW]] == logits[cases.TIED_ROW].max()
