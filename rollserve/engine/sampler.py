"""Turns logits into sampled tokens and their logprobs.

Reported logprobs are `log_softmax(logits / T)` over the full vocabulary
(T = 1 when greedy): the number an RL trainer recomputes. Sampling inverts
each row's CDF with one uniform number (drawn from the row's own generator
when the request is seeded), so a seeded row's draw does not depend on the
rest of the batch. Rows are processed a few at a time so the [rows, vocab]
temporaries stay in cache: on the CPU these passes are memory-bound.
"""

from dataclasses import dataclass

import torch

ROWS_PER_CHUNK = 16
CDF_BLOCK = 128  # the CDF is inverted in two levels: blocks of the vocabulary, then tokens within a block


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] long
    logprobs: torch.Tensor  # [rows] float32


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    # e: [rows, vocab] -> [rows, ceil(vocab / CDF_BLOCK)]
    rows, vocab = e.shape
    full = vocab // CDF_BLOCK * CDF_BLOCK
    sums = e[:, :full].view(rows, -1, CDF_BLOCK).sum(-1)
    if full < vocab:
        sums = torch.cat([sums, e[:, full:].sum(-1, keepdim=True)], dim=1)
    return sums


def _invert_cdf(e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First token whose running sum of `e` exceeds `target` (never a zero-weight token). e: [rows, vocab]."""
    vocab = e.shape[1]
    csum = _block_sums(e).cumsum(-1)  # [rows, blocks]
    block = torch.searchsorted(csum, target[:, None], right=True).clamp_max(csum.shape[1] - 1)
    before = torch.where(block > 0, csum.gather(1, (block - 1).clamp_min(0)), torch.zeros_like(target[:, None]))
    idx = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=e.device)  # [rows, CDF_BLOCK]
    valid = idx < vocab
    cs = torch.where(valid, e.gather(1, idx.clamp_max(vocab - 1)), 0.0).cumsum(-1)
    j = torch.searchsorted(cs, target[:, None] - before, right=True)
    last = (cs < cs[:, -1:]).sum(-1, keepdim=True)  # where the block's mass is reached: a non-zero token
    return (block * CDF_BLOCK + torch.minimum(j, last)).squeeze(1)


class Sampler:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def _uniforms(self, generators: list) -> torch.Tensor:
        u = torch.rand(len(generators), generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand((), generator=g)
        return u

    def __call__(self, logits: torch.Tensor, params: list, generators: list) -> SamplerOutput:
        """logits: [rows, vocab] float32; `params[i]`/`generators[i]` belong to row i."""
        rows = logits.shape[0]
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
        u = self._uniforms(generators).to(logits.device)
        tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for s in range(0, rows, ROWS_PER_CHUNK):
            e = slice(s, s + ROWS_PER_CHUNK)
            # The trainer's own op on the trainer's own division, so the numbers match bit for bit.
            logp = torch.log_softmax(logits[e] / temps[e, None], dim=-1)  # [chunk, vocab]
            probs = logp.exp()
            tok = torch.where(greedy[e], logits[e].argmax(dim=-1), _invert_cdf(probs, u[e] * probs.sum(-1)))
            tokens[e] = tok
            logprobs[e] = logp.gather(1, tok[:, None]).squeeze(1)
        return SamplerOutput(tokens, logprobs)
