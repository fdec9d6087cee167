"""The paged attention function registered with `transformers.AttentionInterface`.

Every engine step is one packed row of tokens: first one token for each
decoding sequence, then the prefill chunks. K/V of these tokens are written
into the paged cache at `slot_mapping`; decode tokens attend to their
sequence's blocks, prefill chunks to their earlier context plus themselves,
causally. The ops themselves live in `rollserve.kernels`.
"""

from dataclasses import dataclass

import torch

from ..kernels.backend import AttentionOps
from .kv_cache import PagedKVCache

ATTENTION_NAME = "rollserve_paged"


@dataclass
class PagedAttentionMetadata:
    kv_cache: PagedKVCache
    ops: AttentionOps  # the torch references or the Triton kernels (kernels.backend)
    slot_mapping: torch.Tensor  # [num_tokens]
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor | None  # [num_decodes]
    prefill_query_lens: list[int]  # per prefill chunk, in packed order after the decodes
    prefill_context_lens: list[int]  # tokens of the chunk's sequence once the chunk is written
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks]


def paged_attention(meta: PagedAttentionMetadata, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """One layer's attention for a packed step. q: [T, Hq, D]; k, v: [T, Hkv, D]. Returns [T, Hq, D].

    Writes the step's K/V into the layer's cache at `meta.slot_mapping` first, then attends: the first
    `meta.num_decodes` tokens over their sequences' blocks, the prefill chunks causally.
    """
    k_cache, v_cache = meta.kv_cache.layer(layer_idx)
    stored_k, stored_v = k.to(k_cache.dtype), v.to(v_cache.dtype)  # rounded once for a 16-bit cache, else as is
    meta.ops.write_kv(k_cache, v_cache, stored_k, stored_v, meta.slot_mapping)
    if stored_k is not k and meta.prefill_query_lens:
        # a 16-bit cache under fp32 weights: a prefill chunk sees its own K/V as the cache holds them, so a
        # prompt's attention does not depend on whether its prefix came from the prefix cache
        k, v = stored_k.to(k.dtype), stored_v.to(v.dtype)
    nd = meta.num_decodes
    parts = []
    if nd:
        parts.append(meta.ops.decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                     scale, sliding_window, softcap))
    if meta.prefill_query_lens:
        parts.append(meta.ops.prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill_query_lens,
                                      meta.prefill_context_lens, meta.prefill_block_tables, scale, sliding_window,
                                      softcap))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, rollserve_meta: PagedAttentionMetadata = None,
                            **kwargs):
    """The `AttentionInterface` function: `paged_attention` on HF's layout.

    query: [1, Hq, T, D]; key/value: [1, Hkv, T, D]. Returns ([1, T, Hq, D], None).
    """
    if rollserve_meta is None:
        raise RuntimeError("rollserve paged attention called outside a rollserve engine step")
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H, D]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(rollserve_meta, module.layer_idx, q, k, v, scale, sliding_window, softcap)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
