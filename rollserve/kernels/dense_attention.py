"""Dense attention over already-gathered K/V: SDPA, or the explicit form when logits are soft-capped."""

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query i (at position kv_len - q_len + i) may see key j.

    A sliding window of w keeps keys j with q_pos - w < j <= q_pos.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    mask = kv_pos <= q_pos
    if sliding_window:
        mask &= kv_pos > q_pos - sliding_window
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) masked) v.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (KV heads already matched to query heads; any one dtype).
    mask: bool, broadcastable to [B, H, Lq, Lk], True = attend; or None with `is_causal` (bottom-right
    aligned only when Lq == Lk). softcap: logits become `tanh(s / softcap) * softcap`; None = no cap.
    Returns [B, H, Lq, D] in q's dtype (soft-capped probabilities are computed in fp32).
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
