"""Plain float64 references shared by the sampler unit tests and the engine-level sampling tests."""

from collections import Counter

import torch


def reference_probs(logits: torch.Tensor, p, prompt=(), output=(), eos=()) -> torch.Tensor:
    """The distribution a correct sampler draws from for one row of `logits` [vocab], written plainly in float64.

    HF's warper order: penalties (repetition on prompt + output tokens, presence/frequency on output tokens) and
    `min_tokens` masking of `eos` and `stop_token_ids` -> temperature (1 when greedy) -> top_k -> top_p (the
    smallest most-likely set whose mass within the top_k set reaches top_p) -> min_p (relative to the most likely
    token) -> renormalise.
    """
    z = logits.double().clone()
    if p.repetition_penalty != 1:
        for t in set(prompt) | set(output):
            z[t] = z[t] / p.repetition_penalty if z[t] > 0 else z[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        z[t] -= p.frequency_penalty * c + p.presence_penalty
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            z[t] = float("-inf")
    t = p.temperature if p.temperature > 0 else 1.0
    probs = torch.softmax(z / t, dim=-1)
    order = torch.argsort(probs, descending=True)
    kept = order[:p.top_k] if p.top_k > 0 else order
    # Running mass within the top_k set, in the same sequential float64 order as a plain loop.
    running = (probs[kept] / probs[kept].sum()).cumsum(0)
    count = min(int((running < p.top_p).sum()) + 1, len(kept))
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[kept[:count]] = True
    keep &= probs >= p.min_p * probs.max()
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()
