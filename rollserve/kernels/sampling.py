"""The fused sampling step: temperature, policy logprob, top-k/top-p/min-p threshold, one draw per row.

This is the torch reference of `triton_sampling.sample` (a full sort per row: plain, not fast), with the
semantics of `engine.sampler.Sampler` for rows without penalties and in the "policy" logprobs mode:
the filters are thresholds on the temperature-scaled probabilities p (top_k keeps p >= the k-th largest;
top_p keeps the smallest most-likely set whose mass within the top_k set reaches top_p; min_p keeps
p >= min_p * max p), and the row's uniform u picks the first token whose running sum of kept p exceeds
u * (their total), in vocabulary order.
"""

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and their policy logprobs `log_softmax(logits / T)[token]`.

    logits: [rows, vocab] float32. temperature: [rows] float32 (> 0; the engine gives greedy rows 1.0).
    greedy: [rows] bool, rows that take the argmax of `logits`. top_k: [rows] int (0 = off); top_p: [rows]
    float32 (1 = off); min_p: [rows] float32 (0 = off); uniforms: [rows] float32 in [0, 1).
    Returns ([rows] int64, [rows] float32).
    """
    rows, vocab = logits.shape
    policy = torch.log_softmax(logits / temperature[:, None], dim=-1)
    probs = policy.exp()
    ranked = torch.sort(probs, dim=-1, descending=True).values
    top_k_on = top_k > 0
    k = torch.where(top_k_on, top_k.clamp_max(vocab), vocab).long()
    thr_k = torch.where(top_k_on, ranked.gather(1, (k - 1)[:, None]).squeeze(1), 0.0)
    inside = torch.arange(vocab, device=logits.device)[None, :] < k[:, None]
    v = torch.where(inside, ranked, 0.0)
    cs = v.cumsum(-1)
    mass = torch.where(top_k_on, cs[:, -1], 1.0)
    count = (((cs - v) / mass[:, None] < top_p[:, None]) & inside).sum(-1).clamp_min(1)
    thr_p = torch.where(top_p < 1, ranked.gather(1, (count - 1)[:, None]).squeeze(1), 0.0)
    thr = torch.maximum(torch.maximum(thr_k, thr_p), min_p * ranked[:, 0])
    kept = torch.where(probs >= thr[:, None], probs, 0.0)
    running = kept.cumsum(-1)
    target = uniforms * running[:, -1]
    first = (running <= target[:, None]).sum(-1)  # first token whose running sum exceeds the target
    last = vocab - 1 - (kept > 0).flip(-1).int().argmax(-1)  # rounding can leave the target past the end
    tokens = torch.where(greedy, logits.argmax(-1), torch.minimum(first, last))
    return tokens, policy.gather(1, tokens[:, None]).squeeze(1)
