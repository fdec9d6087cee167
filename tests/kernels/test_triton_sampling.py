"""The Triton fused sampling step vs its torch reference (`kernels.sampling.sample`), same uniforms.

Runs on CPU tensors under `TRITON_INTERPRET=1` (on the GPU when there is one).
"""

import pytest
import torch

from triton_setup import DEVICE

import sampling_cases as cases  # noqa: E402
from rollserve.kernels import triton_sampling  # noqa: E402
from rollserve.kernels.sampling import sample  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_draws_the_references_tokens_and_logprobs(seed):
    logits = cases.logits(seed).to(DEVICE)
    args = dict(uniforms=cases.uniforms(seed).to(DEVICE), **cases.tensors(DEVICE))
    want_tokens, want_logprobs = sample(logits, **args)
    tokens, logprobs = triton_sampling.sample(logits, **args)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("row", [2, cases.TIED_ROW - 1])
def test_kernel_follows_the_uniform_across_the_whole_distribution(row):
    """One row at many uniforms: every draw equals the reference's (the CDF inversion and the edges of the
    kept set, not only one draw per row)."""
    logits = cases.logits(5)[row:row + 1].expand(8, -1).contiguous().to(DEVICE)
    args = {name: t[row:row + 1].expand(8).contiguous() for name, t in cases.tensors(DEVICE).items()}
    args["uniforms"] = torch.linspace(0, 0.999, 8, device=DEVICE)
    want_tokens, _ = sample(logits, **args)
    tokens, _ = triton_sampling.sample(logits, **args)
    assert tokens.tolist() == want_tokens.tolist()
    assert len(set(tokens.tolist())) > 1
