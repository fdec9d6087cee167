"""A batch of sampling rows for the fused sampling step's tests: mixed temperatures and filters, greedy rows,
a top_k past the vocabulary, and a row of tied logits (ties at the thresholds)."""

from types import SimpleNamespace

import torch

from rollserve import SamplingParams

VOCAB = 300
ROWS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_p=0.8, top_k=50),
    dict(temperature=1.0, top_p=0.95, min_p=0.05),
    dict(temperature=0.5, min_p=0.2),
    dict(temperature=1.0, top_k=VOCAB + 10, top_p=0.6),
    dict(temperature=3.0, top_k=4, top_p=0.6),  # top_p within a top_k set of much less than all the mass
    dict(temperature=0.9, top_k=7, top_p=0.5),  # on the tied row
]
TIED_ROW = len(ROWS) - 1


def logits(seed: int) -> torch.Tensor:
    """[len(ROWS), VOCAB] float32; the last row holds few distinct values, so thresholds fall on ties."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(len(ROWS), VOCAB, generator=gen) * 3
    out[TIED_ROW] = torch.randint(0, 6, (VOCAB,), generator=gen).float()
    return out


def params() -> list[SamplingParams]:
    return [SamplingParams(**row) for row in ROWS]


def tensors(device) -> dict:
    """The per-row arguments of `kernels.sampling.sample` (uniforms aside), as the engine would give them."""
    ps = params()
    return dict(
        temperature=torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in ps], device=device),
        greedy=torch.tensor([p.temperature == 0 for p in ps], device=device),
        top_k=torch.tensor([p.top_k for p in ps], device=device),
        top_p=torch.tensor([p.top_p for p in ps], device=device),
        min_p=torch.tensor([p.min_p for p in ps], device=device),
    )


def uniforms(seed: int) -> torch.Tensor:
    """The uniforms `engine.sampler.Sampler(seed)` draws for a batch of unseeded rows."""
    return torch.rand(len(ROWS), generator=torch.Generator().manual_seed(seed))


def fake_sequences() -> list:
    """Just what `SamplingBatch` reads of a sequence: unseeded rows past min_tokens, no penalties."""
    return [SimpleNamespace(params=p, generator=None, num_completion_tokens=1, token_ids=[0, 1],
                            num_prompt_tokens=1) for p in params()]
