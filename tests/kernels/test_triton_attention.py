"""The Triton KV write and paged attention kernels vs their torch references (`rollserve.kernels`).

Runs on CPU tensors under `TRITON_INTERPRET=1` (on the GPU when there is one). Shapes are small but
cover what the kernels branch on: GQA 3:1, head_dim 64, block sizes 16 and 32, sequences of one to
several blocks, a sliding window, soft-capping on and off, decode and chunked prefill.
"""

import pytest
import torch

from triton_setup import DEVICE

from rollserve.kernels import triton_decode_attention, triton_kv_write, triton_prefill_attention  # noqa: E402
from rollserve.kernels.decode_attention import paged_decode_attention  # noqa: E402
from rollserve.kernels.kv_write import write_kv  # noqa: E402
from rollserve.kernels.prefill_attention import paged_prefill_attention  # noqa: E402

pytestmark = pytest.mark.triton

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 64
NUM_BLOCKS = 24
SCALE = HEAD_DIM ** -0.5
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _reference(op, *args):
    """`op` on fp32 copies of bf16 tensors, rounded back: the torch reference in bf16 rounds its soft-capped
    scores to bf16 before the softmax (off by up to ~2e-2), the kernels keep them in fp32."""
    up = [a.float() if torch.is_tensor(a) and a.dtype == torch.bfloat16 else a for a in args]
    return op(*up).to(args[0].dtype)
VARIANTS = [  # (block_size, sliding_window, softcap)
    (16, None, None),
    (32, None, 30.0),
    (16, 20, None),
    (32, 40, 5.0),
]


def _cache(block_size, dtype, gen):
    shape = (NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM)
    # Garbage where nothing was written: a kernel reading a wrong slot or block shows.
    return (torch.randn(shape, generator=gen).to(dtype).to(DEVICE),
            torch.randn(shape, generator=gen).to(dtype).to(DEVICE))


def _tables(lengths, block_size, gen) -> torch.Tensor:
    """Shuffled, distinct blocks per sequence, padded with the last block id."""
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    width = max(map(len, tables))
    return torch.tensor([t + [NUM_BLOCKS - 1] * (width - len(t)) for t in tables], device=DEVICE)


def _slots(tables, block_size, spans) -> torch.Tensor:
    """Slots of positions [start, end) of each sequence, packed in order."""
    return torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                         for i, (start, end) in enumerate(spans) for p in range(start, end)], device=DEVICE)


def _kv(num_tokens, dtype, gen):
    return [torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_kv_write_is_bit_equal_to_the_reference(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    k_cache, v_cache = _cache(block_size, dtype, gen)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:37].to(DEVICE)
    key, value = _kv(37, dtype, gen)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv(want_k, want_v, key, value, slots)
    triton_kv_write.write_kv(k_cache, v_cache, key, value, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,sliding_window,softcap", VARIANTS)
def test_decode_attention_matches_the_reference(dtype, block_size, sliding_window, softcap):
    gen = torch.Generator().manual_seed(block_size + (sliding_window or 0))
    lengths = [1, block_size + 3, 2 * block_size + 7]  # one, two and three blocks
    k_cache, v_cache = _cache(block_size, dtype, gen)
    tables = _tables(lengths, block_size, gen)
    key, value = _kv(sum(lengths), dtype, gen)
    write_kv(k_cache, v_cache, key, value, _slots(tables, block_size, [(0, n) for n in lengths]))
    query = torch.randn(len(lengths), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    context_lens = torch.tensor(lengths, device=DEVICE)
    args = (query, k_cache, v_cache, tables, context_lens, SCALE, sliding_window, softcap)
    got = triton_decode_attention.paged_decode_attention(*args)
    want = _reference(paged_decode_attention, *args)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,sliding_window,softcap", VARIANTS)
def test_prefill_attention_matches_the_reference(dtype, block_size, sliding_window, softcap):
    gen = torch.Generator().manual_seed(block_size + (sliding_window or 0))
    # (earlier context, chunk): a fresh prompt over two blocks, a chunk after cached context, a one-token chunk.
    spans = [(0, block_size + 5), (block_size + 2, 2 * block_size + 9), (block_size - 1, block_size)]
    lengths = [end for _, end in spans]
    query_lens = [end - start for start, end in spans]
    k_cache, v_cache = _cache(block_size, dtype, gen)
    tables = _tables(lengths, block_size, gen)
    earlier = [(0, start) for start, _ in spans]
    key, value = _kv(sum(start for start, _ in spans), dtype, gen)
    write_kv(k_cache, v_cache, key, value, _slots(tables, block_size, earlier))
    key, value = _kv(sum(query_lens), dtype, gen)
    write_kv(k_cache, v_cache, key, value, _slots(tables, block_size, spans))
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    args = (query, key, value, k_cache, v_cache, query_lens, lengths, tables, SCALE, sliding_window, softcap)
    got = triton_prefill_attention.paged_prefill_attention(*args)
    want = _reference(paged_prefill_attention, *args)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_attention_kernels_take_the_engines_strided_views():
    """The engine passes query as a transposed view of the model's [1, H, T, D] tensor."""
    gen = torch.Generator().manual_seed(7)
    block_size, lengths = 16, [9, 20]
    k_cache, v_cache = _cache(block_size, torch.float32, gen)
    tables = _tables(lengths, block_size, gen)
    key, value = _kv(sum(lengths), torch.float32, gen)
    write_kv(k_cache, v_cache, key, value, _slots(tables, block_size, [(0, n) for n in lengths]))
    query = torch.randn(1, NUM_HEADS, sum(lengths), HEAD_DIM, generator=gen).to(DEVICE)[0].transpose(0, 1)
    args = (query, key, value, k_cache, v_cache, lengths, lengths, tables, SCALE)
    got = triton_prefill_attention.paged_prefill_attention(*args)
    torch.testing.assert_close(got, paged_prefill_attention(*args), atol=1e-5, rtol=1e-5)
