"""The paged attention function registered with `transformers.AttentionInterface`.

Every engine step is one packed row of tokens: first one token for each
decoding sequence, then the prefill chunks. K/V of these tokens are written
into the paged cache at `slot_mapping`; decode tokens attend to their
sequence's blocks (gathered through the block table), prefill chunks to their
earlier context plus themselves, causally.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rollserve_paged"


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx, 0], self.data[idx, 1]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.data[:, :, dst] = self.data[:, :, src]


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the packed row
    end: int
    context_len: int  # tokens of the sequence once this chunk is written
    block_table: torch.Tensor | None  # [num_blocks]; None when the chunk is the whole context


@dataclass
class PagedAttentionMetadata:
    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor  # [num_tokens]
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor | None  # [num_decodes]
    prefills: list[PrefillChunk]
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, sliding_window: int | None, length: int) -> torch.Tensor:
        key = ("decode", sliding_window)
        if key not in self._masks:
            pos = torch.arange(length, device=self.slot_mapping.device)
            ctx = self.decode_context_lens[:, None]
            mask = pos < ctx
            if sliding_window:
                mask &= pos > ctx - 1 - sliding_window
            self._masks[key] = mask[:, None, None, :]  # [num_decodes, 1, 1, length]
        return self._masks[key]


def _causal_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    mask = kv_pos <= q_pos
    if sliding_window:
        mask &= kv_pos > q_pos - sliding_window
    return mask


def _attend(q, k, v, mask, scale, softcap, is_causal=False):
    # q: [B, Hq, Lq, D], k/v: [B, Hq, Lk, D] (heads already matched)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = _causal_mask(q.shape[-2], k.shape[-2], None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    # cache: [blocks, block_size, kv_heads, D]; block_tables: [B, nb] -> [B, kv_heads, nb * block_size, D]
    b, nb = block_tables.shape
    # index_select over 2-D rows is an order of magnitude faster on the CPU than over 4-D ones
    g = cache.view(cache.shape[0], -1).index_select(0, block_tables.reshape(-1))
    return g.view(b, nb * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, rollserve_meta: PagedAttentionMetadata = None,
                            **kwargs):
    """query: [1, Hq, T, D]; key/value: [1, Hkv, T, D]. Returns ([1, T, Hq, D], None)."""
    if rollserve_meta is None:
        raise RuntimeError("rollserve paged attention called outside a rollserve engine step")
    meta = rollserve_meta
    k_cache, v_cache = meta.kv_cache.layer(module.layer_idx)
    _, num_heads, num_tokens, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, D]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k_new)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v_new)
    scale = scaling if scaling is not None else head_dim ** -0.5
    out = query.new_empty(num_tokens, num_heads, head_dim)

    nd = meta.num_decodes
    if nd:
        # Queries of one KV head's group act as a query sequence of length `group`.
        q = query[0, :, :nd].transpose(0, 1).reshape(nd, num_kv_heads, group, head_dim)
        k = _gather(k_cache, meta.decode_block_tables)
        v = _gather(v_cache, meta.decode_block_tables)
        mask = meta.decode_mask(sliding_window, k.shape[2])
        out[:nd] = _attend(q, k, v, mask, scale, softcap).reshape(nd, num_heads, head_dim)

    for chunk in meta.prefills:
        q = query[:, :, chunk.start:chunk.end]  # [1, Hq, n, D]
        n = chunk.end - chunk.start
        if chunk.block_table is None:
            k, v = key[:, :, chunk.start:chunk.end], value[:, :, chunk.start:chunk.end]
        else:
            k = _gather(k_cache, chunk.block_table[None])[:, :, :chunk.context_len]
            v = _gather(v_cache, chunk.block_table[None])[:, :, :chunk.context_len]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if chunk.block_table is None and not sliding_window:
            o = _attend(q, k, v, None, scale, softcap, is_causal=True)
        else:
            o = _attend(q, k, v, _causal_mask(n, chunk.context_len, sliding_window, q.device), scale, softcap)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
