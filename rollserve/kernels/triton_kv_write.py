"""Paged KV write in Triton: `kv_write.write_kv` on the GPU (or under `TRITON_INTERPRET=1`)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key, value, k_cache, v_cache, slot_mapping, row: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    cols = tl.arange(0, ROW_PAD)
    mask = cols < row
    src = token.to(tl.int64) * row + cols
    dst = slot * row + cols
    tl.store(k_cache + dst, tl.load(key + src, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(value + src, mask=mask), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as `kv_write.write_kv`; one program per token copies its [num_kv_heads, head_dim] row."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](key.contiguous(), value.contiguous(), k_cache, v_cache, slot_mapping,
                                    row=row, ROW_PAD=triton.next_power_of_2(row))
