"""The torch reference ops of `rollserve.kernels` vs naive dense computations on small shapes.

Each case scatters per-sequence K/V into a paged cache through shuffled block tables (so a wrong slot or
block reads someone else's keys) and compares against plain float64 attention over the unpaged K/V.
Faster kernels are tested against these references.
"""

import pytest
import torch
import torch.nn.functional as F

from rollserve.kernels.decode_attention import paged_decode_attention
from rollserve.kernels.kv_write import write_kv
from rollserve.kernels.prefill_attention import paged_prefill_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4
NUM_BLOCKS = 32


def naive_attention(q, k, v, scale, sliding_window=None, softcap=None) -> torch.Tensor:
    """q: [Lq, Hq, D] at the last Lq of Lk positions; k, v: [Lk, Hkv, D]. Float64, causal. -> [Lq, Hq, D]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    lq, lk = q.shape[0], k.shape[0]
    q_pos = torch.arange(lk - lq, lk)[:, None]
    kv_pos = torch.arange(lk)[None, :]
    allowed = kv_pos <= q_pos
    if sliding_window:
        allowed &= kv_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def _cache(dtype):
    shape = (NUM_BLOCKS, BLOCK, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)  # garbage where nothing was written


def _paged(lengths, dtype, gen):
    """Per-sequence K/V [L, Hkv, D] written into a fresh cache at shuffled blocks. Returns caches, K/V, tables."""
    k_cache, v_cache = _cache(dtype)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    keys, values, tables = [], [], []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // BLOCK))]
        k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        write_kv(k_cache, v_cache, k, v, slots)
        keys.append(k)
        values.append(v)
        tables.append(table)
    return k_cache, v_cache, keys, values, tables


def _padded(tables) -> torch.Tensor:
    width = max(map(len, tables))
    return torch.tensor([t + [NUM_BLOCKS - 1] * (width - len(t)) for t in tables])


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_is_bit_equal_and_touches_only_its_slots(dtype):
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = _cache(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    num_tokens = 11
    slots = torch.randperm(NUM_BLOCKS * BLOCK, generator=gen)[:num_tokens]
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    write_kv(k_cache, v_cache, key, value, slots)
    for cache, before, new in ((k_cache, k_before, key), (v_cache, v_before, value)):
        flat, flat_before = cache.view(-1, NUM_KV_HEADS, HEAD_DIM), before.view(-1, NUM_KV_HEADS, HEAD_DIM)
        assert torch.equal(flat[slots], new)
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert torch.equal(flat[untouched], flat_before[untouched])
        # Slot s is block s // BLOCK, offset s % BLOCK.
        s = int(slots[0])
        assert torch.equal(cache[s // BLOCK, s % BLOCK], new[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (5, None), (None, 3.0), (6, 2.0)])
def test_decode_attention_matches_dense(sliding_window, softcap, dtype):
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 4, 7, 13, 20]  # a single token, a full block, partial blocks, beyond the window
    k_cache, v_cache, keys, values, tables = _paged(lengths, dtype, gen)
    query = torch.randn(len(lengths), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    scale = HEAD_DIM ** -0.5
    out = paged_decode_attention(query, k_cache, v_cache, _padded(tables), torch.tensor(lengths), scale,
                                 sliding_window, softcap)
    assert out.shape == query.shape and out.dtype == dtype
    for i in range(len(lengths)):
        ref = naive_attention(query[i:i + 1], keys[i], values[i], scale, sliding_window, softcap)[0]
        torch.testing.assert_close(out[i].double(), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (5, None), (None, 3.0), (6, 2.0)])
def test_prefill_attention_matches_dense(sliding_window, softcap, dtype):
    """Whole prompts (no earlier context) and chunks continuing from context already in the cache."""
    gen = torch.Generator().manual_seed(2)
    context_lens = [9, 16, 21, 6, 13]
    query_lens = [9, 5, 8, 6, 2]  # chunks 0 and 3 are whole prompts; 1, 2 and 4 continue earlier context
    k_cache, v_cache, keys, values, tables = _paged(context_lens, dtype, gen)
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    # The chunks' own K/V, packed: the last query_lens[i] tokens of sequence i (already in the cache).
    key = torch.cat([k[-n:] for k, n in zip(keys, query_lens)])
    value = torch.cat([v[-n:] for v, n in zip(values, query_lens)])
    scale = 0.3
    out = paged_prefill_attention(query, key, value, k_cache, v_cache, query_lens, context_lens, _padded(tables),
                                  scale, sliding_window, softcap)
    assert out.shape == query.shape and out.dtype == dtype
    start = 0
    for n, k, v in zip(query_lens, keys, values):
        ref = naive_attention(query[start:start + n], k, v, scale, sliding_window, softcap)
        torch.testing.assert_close(out[start:start + n].double(), ref, **_tol(dtype))
        start += n


def test_prefill_without_context_is_plain_causal_sdpa():
    gen = torch.Generator().manual_seed(3)
    n = 10
    k_cache, v_cache, keys, values, tables = _paged([n], torch.float32, gen)
    query = torch.randn(n, NUM_HEADS, HEAD_DIM, generator=gen)
    out = paged_prefill_attention(query, keys[0], values[0], k_cache, v_cache, [n], [n], _padded(tables), 0.25)
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (keys[0], values[0]))
    ref = F.scaled_dot_product_attention(query.transpose(0, 1), k, v, is_causal=True, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
