"""Turns logits into sampled tokens and their logprobs.

Reported logprobs are `log_softmax(logits / T)` over the full vocabulary
(T = 1 when greedy): the number an RL trainer recomputes. Sampling draws one
uniform number per row (from the row's own generator when the request is
seeded) and inverts the row's CDF, so a seeded row's draw does not depend on
the rest of the batch.
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] long
    logprobs: torch.Tensor  # [rows] float32


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
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)  # [rows, vocab]
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            cdf = logp[idx].exp().cumsum(dim=-1)  # [sampled, vocab]
            u = self._uniforms([generators[i] for i in sampled]).to(logits.device)
            target = (u * cdf[:, -1])[:, None]
            draw = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)
            tokens[idx] = draw
        return SamplerOutput(tokens, logp.gather(1, tokens[:, None]).squeeze(1))
