"""The one tile step both Triton attention kernels share: scores of a query tile against one cache block,
masked, soft-capped, folded into a running (online) softmax."""

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot needs every dimension >= 16 on the GPU: small query tiles and head dims are padded up


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (the GPU default, tf32, would miss the references by ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def tanh(x):
    # tl.math has no tanh on every backend (the interpreter included); exp(2x) -> inf gives 1 exactly.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attend_block(q, acc, m_i, l_i, k_cache, v_cache, block_id, kv_head, first_pos, q_pos, offs_d,
                 scale, softcap, window,
                 BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Folds cache block `block_id` (positions first_pos + [0, BLOCK_SIZE)) into (acc, m_i, l_i).

    q: [M, D_PAD] queries at positions q_pos [M]; acc: [M, D_PAD] fp32; m_i, l_i: [M] fp32 running max / sum.
    A query at position p sees keys j <= p (and j > p - window under USE_WINDOW).
    UPCAST (under TRITON_INTERPRET=1, whose `tl.dot` gets bf16/fp16 inputs wrong: triton 3.9 multiplies their
    bit patterns): q arrives in fp32 and K, V and the probabilities are upcast, exactly, before each dot.
    """
    offs_n = tl.arange(0, BLOCK_SIZE)
    kv_pos = first_pos + offs_n
    row = (block_id * BLOCK_SIZE + offs_n).to(tl.int64) * NUM_KV_HEADS + kv_head
    ptrs = row[:, None] * HEAD_DIM + offs_d[None, :]
    d_mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(k_cache + ptrs, mask=d_mask, other=0.0)  # [BLOCK_SIZE, D_PAD]
    v = tl.load(v_cache + ptrs, mask=d_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, BLOCK_SIZE] fp32
    if USE_SOFTCAP:
        s = tanh(s / softcap) * softcap
    allowed = kv_pos[None, :] <= q_pos[:, None]
    if USE_WINDOW:
        allowed &= kv_pos[None, :] > q_pos[:, None] - window
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 there so no inf - inf appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)  # probabilities in the model's dtype, as the reference multiplies them with V
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i
